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

    def due(self, step: int) -> bool:
        """Whether to save after `step` (numbered from the first step of the first run)."""
        return bool(self.every) and (step + 1) % self.every == 0

    def save(self, backend: Any, step: int) -> dict[str, Any]:
        """Save the state after `step` into step-<step+1>; returns the record written to checkpoints.jsonl."""
        path = step_dir(self.root, step + 1)
        if self.rank == 0:
            if path.exists() and self.overwrite:
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=False)
        self._barrier()
        started = time.perf_counter()
        backend.save_state(path)
        torch.save(_rng_state(), path / f"rng-rank{self.rank:05d}.pt")
        seconds = self._gather(time.perf_counter() - started)
        record = None
        if self.rank == 0:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            (path / META).write_text(json.dumps(self._meta(step + 1), indent=1))
            record = self._record("save", step + 1, path, size, seconds)
        self._barrier()
        return record or {}

    def load(self, backend: Any) -> int:
        """Load `checkpoint.resume_from` into the set-up backend; returns the step to continue from."""
        assert self.resume_from is not None
        meta = read_meta(self.resume_from)
        started = time.perf_counter()
        backend.load_state(self.resume_from)
        rng = self.resume_from / f"rng-rank{self.rank:05d}.pt"
        if rng.exists():  # a run with another number of ranks starts those without one from its seed
            _set_rng_state(torch.load(rng, weights_only=False))
        seconds = self._gather(time.perf_counter() - started)
        if self.rank == 0:
            size = sum(f.stat().st_size for f in self.resume_from.rglob("*") if f.is_file())
            self._record("load", int(meta["next_step"]), self.resume_from, size, seconds)
        return int(meta["next_step"])

    def _meta(self, next_step: int) -> dict[str, Any]:
        model = self.cfg.model
        return {"complete": True, "next_step": next_step, "backend": self.cfg.backend.name,
                "model": {"name": model.name, **{k: model.get(k) for k in MODEL_KEYS}},
                "layout": {k: getattr(self.layout, k) for k in (*LAYOUT_KEYS, "world_size")},
                "seed": self.cfg.train.seed, "saved_unix_s": time.time()}

    def _record(self, kind: str, step: int, path: Path, size: int, seconds: list[float]) -> dict[str, Any]:
        slowest = max(seconds)
        record = {"kind": kind, "step": step, "path": str(path), "bytes": size,
                  "seconds": {"min": min(seconds), "median": statistics.median(seconds), "max": slowest},
                  "slowest_rank": seconds.index(slowest), "ranks": len(seconds),
                  "gb_per_s": size / slowest / 1e9 if slowest > 0 else None}
        with open(self.run_dir / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        say(f"checkpoint {kind} {path.name}: {size / 1e6:,.1f} MB in {slowest:.2f} s (slowest of {len(seconds)} "
            f"rank(s)), {record['gb_per_s'] or 0:.3g} GB/s")
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
                   save_gb_per_s=statistics.median(r["gb_per_s"] or 0.0 for r in saves), last=saves[-1]["path"])
    if loads:
        out.update(resumed_from=loads[0]["path"], resumed_at_step=loads[0]["step"],
                   load_s=loads[0]["seconds"]["max"], load_gb_per_s=loads[0]["gb_per_s"])
    return out
