"""Saving and resuming the whole training state, each save and load a timed phase.

The state is the backend's own checkpoint (torch.distributed.checkpoint for DDP and FSDP2, sharded, every rank
writing its part; DeepSpeed's save_checkpoint for ZeRO and 3D), each rank's random state beside it, and the next
step's number, which fixes the data position (every sample is a function of its step: run/data.py). Rank 0 writes
harness-checkpoint.json last, marked complete, so a save cut short is never resumed from. Every rank times its own
save or load; checkpoints.jsonl in the run directory holds, per save and load, the bytes, the slowest, median and
fastest rank's seconds and the aggregate GB/s.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from harness.config.checks.checkpoint import LAYOUT_KEYS, META, MODEL_KEYS, read_meta, step_dir
from harness.core.console import say

LOG = "checkpoints.jsonl"


class Checkpointer:
    """Saves every `checkpoint.every` steps into `checkpoint.dir` (default <run>/checkpoints) and resumes."""

    def __init__(self, cfg: Any, rank: int, world_size: int, run_dir: Path, layout: Any) -> None:
        c = cfg.checkpoint
        self.cfg, self.rank, self.world_size, self.run_dir, self.layout = cfg, rank, world_size, run_dir, layout
        self.every, self.overwrite = int(c.every), bool(c.overwrite)
        self.root = Path(c.dir).expanduser() if c.dir else run_dir / "checkpoints"
        self.resume_from = Path(c.resume_from).expanduser() if c.resume_from else None
        self.async_save = bool(c.get("async_save"))
        self.pending: Optional[tuple[Any, Path, int, float, float, dict[str, float]]] = None
        """An asynchronous save still writing: (future, path, next step, start, blocking seconds, when written)."""
        self._group: Any = None

    def due(self, step: int) -> bool:
        """Whether to save after `step` (numbered from the first step of the first run)."""
        return bool(self.every) and (step + 1) % self.every == 0

    def save(self, backend: Any, step: int) -> dict[str, Any]:
        """Save the state after `step` into step-<step+1>; returns the record written to checkpoints.jsonl (an
        asynchronous save's once it has been written: at the next save or the end of the loop)."""
        record = self.wait()  # one write at a time: the previous asynchronous save finishes first
        path = step_dir(self.root, step + 1)
        if self.rank == 0:
            if path.exists() and self.overwrite:
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=False)
        self._barrier()
        started = time.perf_counter()
        torch.save(_rng_state(), path / f"rng-rank{self.rank:05d}.pt")
        if self.async_save:
            if self._group is None and self.world_size > 1:
                self._group = dist.new_group(backend="gloo")  # every rank reaches its first save together
            future = backend.save_state_async(path, self._group)
            written: dict[str, float] = {}  # when the write finished, not when the loop next looked
            future.add_done_callback(lambda _: written.setdefault("at", time.perf_counter()))
            self.pending = (future, path, step + 1, started, time.perf_counter() - started, written)
            return record
        backend.save_state(path)
        return self._finish(path, step + 1, [time.perf_counter() - started], None)

    def wait(self) -> dict[str, Any]:
        """Finish the asynchronous save in flight, if any (every rank calls it at the same point)."""
        if self.pending is None:
            return {}
        future, path, next_step, started, blocking, written = self.pending
        self.pending = None
        future.result()
        return self._finish(path, next_step, [written.get("at", time.perf_counter()) - started], blocking)

    def _finish(self, path: Path, next_step: int, seconds: list[float], blocking: Optional[float]) -> dict[str, Any]:
        """Gather every rank's seconds, then rank 0 marks the checkpoint complete and records it."""
        totals = self._gather(seconds[0])
        stalls = self._gather(blocking) if blocking is not None else None
        record = None
        if self.rank == 0:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            (path / META).write_text(json.dumps(self._meta(next_step), indent=1))
            record = self._record("save", next_step, path, size, totals, stalls)
        self._barrier()
        return record or {}

    def job_start(self) -> int:
        """The step the job began at: 0, or the next step of the checkpoint the user resumed from."""
        return int(read_meta(self.resume_from)["next_step"]) if self.resume_from is not None else 0

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint in this run's checkpoint directory (what a restart continues from)."""
        done = [p for p in sorted(self.root.glob("step-*")) if (p / META).exists()
                and json.loads((p / META).read_text()).get("complete")]
        return done[-1] if done else None

    def load(self, backend: Any, path: Path) -> int:
        """Load the checkpoint at `path` into the set-up backend; returns the step to continue from."""
        meta = read_meta(path)
        started = time.perf_counter()
        backend.load_state(path)
        rng = path / f"rng-rank{self.rank:05d}.pt"
        if rng.exists():  # a run with another number of ranks starts those without one from its seed
            _set_rng_state(torch.load(rng, weights_only=False))
        seconds = self._gather(time.perf_counter() - started)
        if self.rank == 0:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self._record("load", int(meta["next_step"]), path, size, seconds)
        return int(meta["next_step"])

    def _meta(self, next_step: int) -> dict[str, Any]:
        model = self.cfg.model
        return {"complete": True, "next_step": next_step, "backend": self.cfg.backend.name,
                "model": {"name": model.name, **{k: model.get(k) for k in MODEL_KEYS}},
                "layout": {k: getattr(self.layout, k) for k in (*LAYOUT_KEYS, "world_size")},
                "seed": self.cfg.train.seed, "saved_unix_s": time.time()}

    def _record(self, kind: str, step: int, path: Path, size: int, seconds: list[float],
                blocking: Optional[list[float]] = None) -> dict[str, Any]:
        """`seconds`: each rank's time to the checkpoint on disk; `blocking`: the part training waited for (all of
        it for a synchronous save or a load)."""
        slowest = max(seconds)
        stalls = blocking or seconds
        record = {"kind": kind, "step": step, "path": str(path), "bytes": size, "async": blocking is not None,
                  "seconds": {"min": min(seconds), "median": statistics.median(seconds), "max": slowest},
                  "blocking_seconds": {"min": min(stalls), "median": statistics.median(stalls), "max": max(stalls)},
                  "slowest_rank": seconds.index(slowest), "ranks": len(seconds),
                  "gb_per_s": size / slowest / 1e9 if slowest > 0 else None}
        with open(self.run_dir / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        stalled = f"; training waited {max(stalls):.2f} s (asynchronous)" if blocking is not None else ""
        say(f"checkpoint {kind} {path.name}: {size / 1e6:,.1f} MB in {slowest:.2f} s (slowest of {len(seconds)} "
            f"rank(s)), {record['gb_per_s'] or 0:.3g} GB/s{stalled}")
        return record

    def _gather(self, seconds: float) -> list[float]:
        if self.world_size == 1:
            return [seconds]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, seconds)
        return [float(s) for s in out]

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """The summary's `checkpoints` block from checkpoints.jsonl: saves and loads with their cost."""
    path = run_dir / LOG
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    saves = [r for r in records if r["kind"] == "save"]
    loads = [r for r in records if r["kind"] == "load"]
    out: dict[str, Any] = {"saves": len(saves), "loads": len(loads), "log": LOG}
    if saves:
        out.update(save_bytes=saves[-1]["bytes"], save_s_median=statistics.median(r["seconds"]["max"] for r in saves),
                   save_s_max=max(r["seconds"]["max"] for r in saves),
                   save_blocking_s_median=statistics.median(r.get("blocking_seconds", r["seconds"])["max"]
                                                            for r in saves),
                   save_gb_per_s=statistics.median(r["gb_per_s"] or 0.0 for r in saves), last=saves[-1]["path"])
    if loads:
        out.update(resumed_from=loads[0]["path"], resumed_at_step=loads[0]["step"],
                   load_s=loads[0]["seconds"]["max"], load_gb_per_s=loads[0]["gb_per_s"])
    return out


ATTEMPTS = "attempts.jsonl"
"""One line per attempt of the job (torch elastic restarts): when it started and where it resumed."""


def record_attempt(run_dir: Path, attempt: int, started_unix_s: float, start_step: int,
                   resumed_from: Optional[Path]) -> None:
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps({"attempt": attempt, "started_unix_s": started_unix_s, "start_step": start_step,
                            "resumed_from": str(resumed_from) if resumed_from else None}) + "\n")


def surviving_steps(run_dir: Path, steps: list[dict[str, Any]]
                    ) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """The steps that made it into the final trajectory (each step number's last line: a restarted attempt redoes
    the steps after its checkpoint) and the job's `resilience` block: restarts, lost steps, the time each restart
    took to detect and relaunch and to resume, and the goodput — time in surviving steps over the job's wall time
    from its first attempt's start. None for a job that never restarted."""
    path = run_dir / ATTEMPTS
    attempts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if len(attempts) < 2:
        return steps, None
    last: dict[int, dict[str, Any]] = {}
    for s in steps:
        last[s["step"]] = s
    surviving = [last[k] for k in sorted(last)]
    restarts = []
    for previous, current in zip(attempts, attempts[1:]):
        before = [s for s in steps if s.get("attempt", 0) == previous["attempt"]]
        after = [s for s in steps if s.get("attempt", 0) == current["attempt"]]
        failed_at = max((s["end_unix_s"] for s in before), default=previous["started_unix_s"])
        first = min((s["end_unix_s"] - s["iter_time_ms"] / 1e3 for s in after), default=None)
        restarts.append({"attempt": current["attempt"], "resumed_at_step": current["start_step"],
                         "resumed_from": current["resumed_from"],
                         "lost_steps": sum(1 for s in before if s["step"] >= current["start_step"]),
                         "detect_and_relaunch_s": current["started_unix_s"] - failed_at,
                         "resume_s": None if first is None else first - current["started_unix_s"]})
    useful = sum(s["iter_time_ms"] for s in surviving) / 1e3
    wall = max(s["end_unix_s"] for s in steps) - attempts[0]["started_unix_s"]
    return surviving, {"attempts": len(attempts), "restarts": len(attempts) - 1,
                       "lost_steps": len(steps) - len(surviving), "restart_events": restarts,
                       "useful_s": useful, "wall_s": wall, "goodput": useful / wall if wall > 0 else None,
                       "rule": "goodput = time in the steps that survived / wall time from the first attempt's start "
                               "to the last step (failed steps, detection, relaunch, loading and set-up are lost)"}
