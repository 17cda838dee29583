"""The run directory: `config.yaml`, `steps.jsonl` (one line per finished step), `summary.json`.

A run directory belongs to one run (`harness.run.claim` decides which directories a run may take, and locks
them); nothing here ever deletes a file it did not write. Rank 0 writes each step line
with one `write` call and flushes it as the step ends, so a crash keeps every finished step; a
reader skips a torn last line (a kill or a full disk mid-write) and says so. A write error ends the
run `failed` with the OS error, and the summary is still written (smaller, or to stderr).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import shutil
import socket
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from harness.core.errors import RunError
from harness.core.stats import HIGH_CV, MIN_INTERVAL, describe, inverted, noisy
from harness.run.environment import environment
from harness.telemetry.summary import NO_REPORT, energy_metrics, telemetry_block, timed_steps, write_power_csv

SCHEMA = "harness.run/1"
ENERGY_KEYS = ("power_w", "idle_power_w", "energy_j_per_step", "tokens_per_joule", "tflops_per_watt")
NOT_PREDICTED = "not predicted: the job ended before a rank ran the cost model (invalid config or failed launch)"
SUMMARY_RESERVE = ".summary-reserve"
SUMMARY_RESERVE_BYTES = 256 * 2**10
"""Room kept for summary.json (and power.csv) while steps are written; a summary is a few KiB."""
MIN_FREE_BYTES = 320 * 2**10
"""Free space a run needs to start: the summary's reserve (SUMMARY_RESERVE_BYTES), its config and Hydra's record."""
LOW_DISK_BYTES = 256 * 2**20
"""Free space below which a run warns before it starts: steps.jsonl and the traces need a few MB."""


@dataclass(frozen=True)
class RankReport:
    """What each rank tells rank 0 at the end: where it ran, its telemetry report and its profiler trace's
    analysis (harness.trace; None: none)."""

    host: str
    device: str
    telemetry: Optional[dict[str, Any]]
    trace: Optional[dict[str, Any]] = None
    tensor_peak_mb: Optional[float] = None
    """CPU: the peak of live tensor memory in the measured step (run.metrics.TensorPeak)."""


def _free_bytes(run_dir: Path) -> tuple[int, Path]:
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def check_space(run_dir: Path) -> None:
    """Refuse, before anything is written, a directory whose filesystem has no room for a run's first files
    (config, Hydra's record, the summary's reserve): they would be left empty or torn."""
    free, probe = _free_bytes(run_dir)
    if free < MIN_FREE_BYTES:
        raise RunError(f"no room for a run under {probe} ({free // 1024} KiB free, {MIN_FREE_BYTES // 1024} KiB "
                       "needed to start); free some space or give another directory")


def disk_warning(run_dir: Path) -> Optional[str]:
    """A one-line warning when the run directory's filesystem is nearly full."""
    free, probe = _free_bytes(run_dir)
    if free < LOW_DISK_BYTES:
        return (f"only {free / 2**20:.0f} MiB free under {probe}; steps.jsonl and summary.json may not fit "
                "(a full disk ends the run `failed`)")
    return None


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """config.yaml, whole or not at all (a full disk leaves no empty file behind); RunError in one line."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    except OSError as exc:
        raise RunError(f"writing {run_dir / 'config.yaml'} failed ({os_error(exc)}); free some space or give "
                       "another hydra.run.dir") from None


def write_run_files(run_dir: Path, files: dict[str, Any]) -> None:
    """Files a backend generated (e.g. `ds_config.json`)."""
    for name, content in files.items():
        (run_dir / name).write_text(json.dumps(content, indent=2) + "\n")


class StepLog:
    """`steps.jsonl`, created for this run: each finished step is one whole line, written by one call and
    flushed at once; fsync'd at the end. A write that fails part-way is cut back to the last whole line,
    and the error is kept and raised: the run ends there.

    A reserve file of SUMMARY_RESERVE_BYTES is allocated beside it at the start and released at `close`,
    so a disk the steps filled up still has room for the summary that says so.
    """

    def __init__(self, run_dir: Path, attempt: int = 0) -> None:
        # O_EXCL: a file that appeared since the lock was taken belongs to someone else; never append to it. An
        # attempt after a restart (torch elastic's) continues this run's own file, after its last whole line.
        path = run_dir / "steps.jsonl"
        if attempt:
            self._fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._size = _whole_lines(path, self._fd)
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._size = 0
        self._reserve = run_dir / SUMMARY_RESERVE
        if attempt:
            self._reserve.unlink(missing_ok=True)  # left by an attempt that died before its close
        self.error: Optional[str] = None
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.posix_fallocate(fd, 0, SUMMARY_RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"preparing {run_dir} failed: {os_error(exc)}") from exc

    def write(self, record: dict[str, Any]) -> None:
        assert self._fd is not None
        line = (json.dumps(record) + "\n").encode()
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # a short write is how a full disk shows itself first
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._size += written
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # no torn line: readers see whole steps only
            self.error = f"writing steps.jsonl failed: {os_error(exc)}"
            raise OSError(exc.errno, self.error) from exc

    def close(self) -> Optional[str]:
        """fsync and close, then release the reserve; returns the write error, if there was one (a failed
        fsync is one too)."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self.error = self.error or f"writing steps.jsonl failed: {os_error(exc)}"
            finally:
                os.close(self._fd)
                self._fd = None
        self._reserve.unlink(missing_ok=True)  # our own file, made in __init__
        return self.error


def _whole_lines(path: Path, fd: int) -> int:
    """Cut a line torn by a killed attempt back to the last whole one; the file's size after."""
    data = path.read_bytes()
    size = data.rfind(b"\n") + 1
    if size != len(data):
        os.ftruncate(fd, size)
    return size


def os_error(exc: OSError) -> str:
    """`ENOSPC: No space left on device`, the way the OS names it."""
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name}: {exc.strerror or exc}"


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """The finished steps; a torn last line (a kill or a full disk mid-write) is skipped and reported."""
    steps, _ = read_steps_checked(run_dir)
    return steps


SUMMARY_KEYS = ("loss", "iter_time_ms", "tokens_per_s", "model_tflops_per_device", "hardware_tflops_per_device",
                "mfu", "hfu", "peak_memory_mb", "data_time_ms")
RATES = ("tokens_per_s", "model_tflops_per_device", "hardware_tflops_per_device", "mfu", "hfu")
"""Per-step rates: a fixed amount of work per step (tokens, FLOPs) over the step's time."""
TIMED_RULE = ("timed steps: every step after the train.warmup_steps warm-up steps that ran without the profiler "
              "(profiled steps are listed in steps.jsonl, not in these figures)")


def summarize_steps(steps: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Medians over the timed steps (neither warm-up nor profiled); peak memory is the maximum; each rate is the
    step's work over the median step time, so tokens/s and ms/step agree. Power and energy are summarised by
    harness.telemetry.summary.energy_metrics, the spreads by step_statistics."""
    timed = timed_steps(steps)
    out: dict[str, Optional[float]] = {}
    for key in SUMMARY_KEYS:
        values = [s[key] for s in timed if s.get(key) is not None]
        if not values:
            out[key] = None
        else:
            out[key] = max(values) if key == "peak_memory_mb" else statistics.median(values)
    median_ms = out["iter_time_ms"]
    for key in RATES:
        work = _work_per_step(timed, key)
        if work is not None and median_ms:
            out[key] = work / (median_ms / 1e3)
    retries = [s["alloc_retries"] for s in timed if s.get("alloc_retries") is not None]
    # Total over the timed steps; each retry is a cache flush and a second cudaMalloc.
    out["alloc_retries"] = sum(retries) if retries else None
    out["timed_steps"] = len(timed)
    return out


def _work_per_step(timed: list[dict[str, Any]], key: str) -> Optional[float]:
    """The work behind a rate (tokens, FLOPs, peak fractions of FLOPs) per step: the same every step."""
    works = [s[key] * s["iter_time_ms"] / 1e3 for s in timed if s.get(key) is not None and s.get("iter_time_ms")]
    return statistics.median(works) if works else None


def step_statistics(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """n, median, spread and 95% interval of each per-step figure over the timed steps (harness.core.stats); a
    rate's figures are its step's work over the step time's (the fastest step the highest rate)."""
    timed = timed_steps(steps)
    out: dict[str, Any] = {"rule": TIMED_RULE, "timed_steps": len(timed)}
    for key in ("iter_time_ms", "loss", "data_time_ms", "peak_memory_mb", "power_w", "energy_j"):
        out[key] = describe([s[key] for s in timed if s.get(key) is not None])
    time_stats = out["iter_time_ms"]
    for key in RATES:
        work = _work_per_step(timed, key)
        out[key] = None if work is None or not time_stats else inverted(time_stats, work * 1e3)
    return out


def run_warnings(statistics_: dict[str, Any], host: dict[str, Any], warmup_steps: int) -> list[str]:
    """What makes this run's figures less trustworthy: too few timed steps, a noisy step time, a busy host."""
    from harness.telemetry.summary import busy_host_warnings

    out = []
    n = statistics_["timed_steps"]
    if n < MIN_INTERVAL:
        out.append(f"{n} timed step(s) after {warmup_steps} warm-up: too few for a 95% interval "
                   f"({MIN_INTERVAL} needed); raise train.steps")
    step = statistics_.get("iter_time_ms")
    if noisy(step):
        out.append(f"the step time varies: coefficient of variation {step['cv']:.0%} over {n} steps (above "
                   f"{HIGH_CV:.0%}); rerun on a quiet host or with more steps")
    out += busy_host_warnings(host.get("during") or {}, host.get("before"))
    return out


def read_steps_checked(run_dir: Path) -> tuple[list[dict[str, Any]], Optional[str]]:
    """(steps, note): the note says which torn or unreadable lines were skipped."""
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return [], None
    steps, skipped = [], []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            steps.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            skipped.append(number)
    note = f"skipped unreadable line(s) {', '.join(map(str, skipped))} of {path} (torn by a kill or a full disk)" \
        if skipped else None
    if note:
        print(f"harness: warning: {note}", file=sys.stderr)
    return steps, note


def build_summary(
    *,
    status: str,
    error: Optional[str],
    config: dict[str, Any],
    layout: dict[str, int],
    model: dict[str, Any],
    steps: list[dict[str, Any]],
    env: dict[str, Any],
    extra_metrics: Optional[dict[str, Any]] = None,
    stop_reason: Optional[str] = None,
    prediction: Optional[dict[str, Any]] = None,
    prediction_reason: str = NOT_PREDICTED,
    telemetry: Optional[dict[str, Any]] = None,
    host_before: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """`telemetry` is the block from harness.telemetry.summary.telemetry_block (None: no rank reported);
    `host_before` the host's CPU just before the ranks started (telemetry.process.host_load_now)."""
    metrics: dict[str, Any] = summarize_steps(steps)
    metrics.update(energy_metrics(steps, layout.get("world_size", 1)))
    metrics.update(extra_metrics or {})
    telemetry = telemetry or {"source": None, "reason": NO_REPORT}
    metrics["idle_power_w"] = telemetry.get("idle_power_w")
    for key in ENERGY_KEYS:
        if metrics.get(key) is None:
            metrics[f"{key}_reason"] = _energy_reason(key, telemetry)
    stats = step_statistics(steps)
    host = {"before": host_before, "during": telemetry.get("host_load") or {}}
    warmup = ((config.get("train") or {}).get("warmup_steps") or 0) if isinstance(config, dict) else 0
    return {
        "schema": SCHEMA,
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": status,
        "stop_reason": stop_reason or ("completed" if status == "ok" else "failed"),
        "error": error,
        "config": config,
        "env": env,
        "layout": layout,
        "model": model,
        "metrics": metrics,
        "statistics": stats,
        "host_load": host,
        "warnings": run_warnings(stats, host, warmup),
        "prediction": prediction,
        "prediction_reason": None if prediction is not None else prediction_reason,
        "telemetry": telemetry,
    }


def _energy_reason(key: str, telemetry: dict[str, Any]) -> str:
    if telemetry.get("reason"):
        return f"not measured: {telemetry['reason']}"
    if key == "idle_power_w":
        return "not measured: telemetry.idle_s=0 or no device reported power while idle"
    return "not measured: some device reported neither energy nor power (see telemetry.devices)"


def failed_summary(run_dir: Path, *, config: dict[str, Any], error: str, status: str = "failed",
                   layout: Optional[dict[str, int]] = None, stop_reason: str = "failed",
                   launcher: str = "none") -> dict[str, Any]:
    """The summary of a run no rank could report on (a config error in a sweep point, a killed rank),
    from the steps already on disk."""
    steps, note = read_steps_checked(run_dir)
    layout = layout or {}
    summary = build_summary(
        status=status, error=error, config=config, layout=layout, model={}, steps=steps,
        env=environment(world_size=layout.get("world_size", 0), hostnames=[hostname()], devices=[],
                        launcher=launcher, accelerator=False),
        stop_reason=stop_reason)
    if note:
        summary["steps_note"] = note
    write_summary(run_dir, summary)
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a summary. On a write error (a full disk), try once more
    with only the status and the error, then give up to stderr: the summary is never silently lost."""
    text = json.dumps(summary, indent=2) + "\n"
    try:
        write_atomic(run_dir / "summary.json", text)
        return
    except OSError as exc:
        small = {key: summary.get(key) for key in ("schema", "status", "stop_reason", "error", "layout")}
        small["status"] = "failed"
        small["error"] = f"{summary.get('error') or ''}{'; ' if summary.get('error') else ''}writing summary.json " \
                         f"failed: {os_error(exc)}"
        try:
            write_atomic(run_dir / "summary.json", json.dumps(small) + "\n")
        except OSError:
            print(f"harness: error: could not write {run_dir / 'summary.json'} ({os_error(exc)}); "
                  f"the summary follows\n{text}", file=sys.stderr)


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all (a temporary file beside it, fsync'd, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # our own temporary file, never the user's
        raise


def hostname() -> str:
    return socket.gethostname()


def write_run_summary(run_dir: Path, *, cfg: Any, layout: Any, info: Any, device: Any, status: str,
                      error: Optional[str], stop_reason: str, ranks: list[RankReport], backend: Any,
                      n_params: Optional[int], throughput: Any, memory_kind: Optional[str],
                      kernels: Optional[dict[str, Any]] = None, prediction: Optional[dict[str, Any]] = None,
                      host_before: Optional[dict[str, Any]] = None) -> None:
    """Rank 0's summary of a run it took part in: measured metrics, the prediction, telemetry, the table."""
    from harness.config.compose import to_container
    from harness.models.config import GPTConfig
    from harness.run.checkpoint import checkpoint_summary, surviving_steps
    from harness.run.live import print_summary
    from harness.trace.analyse import summary_blocks

    reports = [r.telemetry for r in ranks if r.telemetry is not None]
    steps, note = read_steps_checked(run_dir)
    steps, resilience = surviving_steps(run_dir, steps)  # a restarted job: each step's last attempt
    notes = backend.summary_notes() if backend is not None else {}
    model = {"name": cfg.model.name, "params": n_params, **dataclasses.asdict(GPTConfig.from_section(cfg.model))}
    power_csv = None
    if reports:
        try:
            power_csv = write_power_csv(run_dir, reports)
        except OSError as exc:
            error = error or f"writing power.csv failed: {os_error(exc)}"
            status = "failed"
    summary = build_summary(
        status=status,
        error=error,
        config=to_container(cfg),
        layout={**layout.as_dict(), **notes.get("layout", {})},
        model={**model, **notes.get("model", {})},
        steps=steps,
        env=environment(world_size=info.world_size, hostnames=[r.host for r in ranks],
                        devices=[r.device for r in ranks], launcher=info.launcher),
        extra_metrics={**_metric_notes(backend, throughput, memory_kind), **_tensor_peak(ranks, cfg, memory_kind),
                       **notes.get("metrics", {})},
        stop_reason=stop_reason,
        prediction=_on_this_device(prediction, cfg, layout, device, kernels),
        telemetry=telemetry_block(reports, power_csv) if reports else None,
        host_before=host_before,
    )
    predicted = (summary["prediction"] or {}).get("estimate", {}).get("collectives")
    summary["kernels"] = kernels
    if (checkpoints := checkpoint_summary(run_dir)) is not None:
        summary["checkpoints"] = checkpoints
    if resilience is not None:
        from harness.core.console import say

        summary["resilience"] = resilience
        say(f"job restarted {resilience['restarts']} time(s): {resilience['lost_steps']} step(s) redone, goodput "
            f"{resilience['goodput']:.1%} of {resilience['wall_s']:.1f} s wall time")
    if note:
        summary["steps_note"] = note
    if status == "ok":
        try:
            summary.update(summary_blocks(cfg, device.type, [r.trace for r in ranks], steps, run_dir, predicted))
        except Exception as exc:  # noqa: BLE001 - the run's own measurements must reach summary.json
            summary["breakdown_reason"] = f"not measured: summarising the traces failed: {type(exc).__name__}: {exc}"
    lagging = (summary.get("breakdown") or {}).get("straggler") or {}
    if lagging.get("flagged"):
        host = ranks[lagging["rank"]].host if lagging["rank"] < len(ranks) else None  # gathered in rank order
        lagging["host"] = host
        summary["warnings"].append(
            f"straggler: rank {lagging['rank']}{f' on {host}' if host else ''} made the others wait "
            f"{lagging['lag_ms']:.1f} ms per traced step ({lagging['lag_share']:.0%} of it) in their collectives")
    write_summary(run_dir, summary)
    if status == "ok":
        print_summary(summary, run_dir)


def _on_this_device(prediction: Optional[dict[str, Any]], cfg: Any, layout: Any, device: Any,
                    kernels: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """The prediction the launching process's checks computed, computed again where the GPU it ran on says more:
    for a profile that names no accelerator (system=cuda), with the GPU torch reports here, whose peak times it;
    for SDPA, with the kernel PyTorch's dispatcher picked here (the run's `kernels`), where the cost model prices
    it and the config did not say (cuDNN's on Hopper with a recent PyTorch, where the profile says FlashAttention)."""
    from harness.costmodel.estimate import estimate, predicted_metrics
    from harness.run.metrics import device_name

    if device.type != "cuda":
        return prediction
    changes: dict[str, Any] = {}
    if cfg.system.accelerator is None:
        changes["system"] = {"accelerator": device_name(device)}
    if (kernel := sdpa_ran(cfg, kernels)) is not None:
        changes["costmodel"] = {"attention_kernel": kernel}
    if not changes:
        return prediction
    try:
        again = predicted_metrics(estimate(OmegaConf.merge(cfg, changes), layout))
    except Exception as exc:  # noqa: BLE001 - the run's own measurements must reach summary.json
        return {**(prediction or {}), "priced_here_reason": f"not repriced for this GPU: {type(exc).__name__}: {exc}"}
    return {**again, "priced_here": changes}


def sdpa_ran(cfg: Any, kernels: Optional[dict[str, Any]]) -> Optional[str]:
    """The attention kernel the run's SDPA ran, where the cost model prices it, the config names none
    (`costmodel.attention_kernel`) and it is not the software profile's already; None otherwise."""
    from harness.costmodel.software import SDPA_BACKENDS, software_for

    if cfg.model.attention != "sdpa" or cfg.costmodel.get("attention_kernel") is not None:
        return None
    kernel = SDPA_BACKENDS.get(((kernels or {}).get("attention") or {}).get("sdpa_kernel"))
    return kernel if kernel is not None and kernel != software_for(cfg).attention_kernel else None


def _tensor_peak(ranks: list[RankReport], cfg: Any, memory_kind: Optional[str]) -> dict[str, Any]:
    """CPU runs: the largest peak of live tensor memory of any rank (the figure the prediction counts)."""
    if memory_kind != "cpu_peak_rss":
        return {}
    peaks = [r.tensor_peak_mb for r in ranks if r.tensor_peak_mb is not None]
    if peaks:
        return {"tensor_peak_mb": max(peaks), "tensor_peak_step": int(cfg.train.warmup_steps) - 1}
    reason = ("not measured: profile.enabled=true holds the profiler" if cfg.profile.enabled
              else "not measured: it is taken in the last warm-up step and train.warmup_steps=0")
    return {"tensor_peak_mb": None, "tensor_peak_mb_reason": reason}


def _metric_notes(backend: Any, throughput: Any, memory_kind: Optional[str]) -> dict[str, Any]:
    notes: dict[str, Any] = {"peak_memory_kind": memory_kind}
    if backend is not None:  # set up: how much of the model rank 0 holds
        notes["params_on_rank0"] = backend.local_params()
    if memory_kind == "cpu_peak_rss":
        notes["alloc_retries_reason"] = "no caching allocator on a CPU (retries are a CUDA statistic)"
    if throughput is not None:
        notes.update(
            model_flops_per_step=throughput.flops.model,
            hardware_flops_per_step=throughput.flops.hardware,
            peak_tflops=throughput.peak.tflops,
            peak_tflops_source=throughput.peak.source,
        )
        if throughput.peak.tflops is None:
            notes["mfu_reason"] = notes["hfu_reason"] = throughput.peak.reason
    return notes
