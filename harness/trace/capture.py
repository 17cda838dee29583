"""torch.profiler around the step loop: one window of steps per run, one Chrome trace per rank.

The window is `profile.*` (harness.config.checks.profile_window), given to torch.profiler as a schedule
function of the step index, so the trace's `ProfilerStep#<k>` is the run's step k. The trace is written
after the loop ends, not at the window's end, so that exporting it (seconds for a large GPU trace)
falls into no step's time. Every rank writes into rank 0's run directory (ranks that srun or mpiexec
started elsewhere learn it by broadcast), as torchtitan's `profile_traces/` does: on a cluster that
directory must be on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist

from harness.core.layout import ProfileWindow, profile_window

MEMORY_HISTORY_ENTRIES = 100_000
"""Allocator events kept by the CUDA memory snapshot (torchtitan's default)."""


def phase(name: str) -> ContextManager[Any]:
    """A `record_function` range named `name` (one of `events.PHASES`) while a profiler records, else nothing:
    an idle `record_function` still costs ~8 µs of CPU per use on this repository's CI host, the check 0.5 µs
    (benchmarks/profile_overhead.py)."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


def trace_path(profile_dir: Path, rank: int) -> Path:
    return profile_dir / f"rank{rank}.json.gz"


class TraceCapture:
    """The profiler of one rank over `profile.*`'s window; a no-op when profiling is off."""

    def __init__(self, cfg: Any, rank: int, run_dir: Path, device: torch.device) -> None:
        train = cfg.train
        self.window: Optional[ProfileWindow] = profile_window(cfg.profile, train.warmup_steps,
                                                              train.warmup_steps + train.steps)
        self.cfg, self.rank, self.device = cfg.profile, rank, device
        self.profiler: Optional[torch.profiler.profile] = None
        self.saved = False
        self.done = -1  # the last step that ended
        self.memory_recording = False
        self.memory_snapshot: Optional[Path] = None
        self.dir_note: Optional[str] = None
        self.dir = self._shared_dir(run_dir) if self.window else run_dir / "profile"

    def _shared_dir(self, run_dir: Path) -> Path:
        """Rank 0's `<run dir>/profile`; other ranks of a cluster launch only know a scratch directory. A rank
        that cannot create it (rank 0's filesystem not mounted on its node) writes beside its own run files
        and says so: the breakdown does not need the file to be shared."""
        local = run_dir / "profile"
        where = [str(local.absolute())]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(where, src=0)
        try:
            Path(where[0]).mkdir(parents=True, exist_ok=True)
            return Path(where[0])
        except OSError as exc:
            self.dir_note = f"trace written to {local.absolute()} on {os.uname().nodename}: {where[0]}: {exc}"
            local.mkdir(parents=True, exist_ok=True)
            return local

    def label(self, step: int) -> Optional[str]:
        return self.window.label(step) if self.window else None

    def _schedule(self, step: int) -> torch.profiler.ProfilerAction:
        actions = torch.profiler.ProfilerAction
        assert self.window is not None
        if step in self.window.warmup:
            return actions.WARMUP
        if step in self.window.recorded:
            return actions.RECORD_AND_SAVE if step == self.window.recorded.stop - 1 else actions.RECORD
        return actions.NONE

    def __enter__(self) -> "TraceCapture":
        if self.window is None:
            return self
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        elif self.device.type == "xpu":
            activities.append(torch.profiler.ProfilerActivity.XPU)
        self.profiler = torch.profiler.profile(
            activities=activities, schedule=self._schedule, on_trace_ready=self._ready,
            record_shapes=self.cfg.record_shapes, with_stack=self.cfg.with_stack)
        self.profiler.__enter__()
        self._memory(0)
        return self

    def _ready(self, profiler: torch.profiler.profile) -> None:
        """The window closed; its events stay in the profiler until `export` (after the loop)."""
        self.saved = True

    def step(self, step: int) -> None:
        """Step `step` has ended (call after its time was taken): move the profiler to the next step."""
        self.done = step
        if self.profiler is not None:
            self.profiler.step()
            self._memory(step + 1)

    @property
    def completed(self) -> range:
        """The recorded steps that ended (fewer than the window when the run stopped inside it)."""
        assert self.window is not None
        return range(self.window.recorded.start, min(self.window.recorded.stop, self.done + 1))

    def _memory(self, step: int) -> None:
        """CUDA memory history over the recorded steps, dumped as the window closes."""
        if not self.cfg.memory or self.window is None or self.device.type != "cuda":
            return
        if step == self.window.recorded.start:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self.memory_recording = True
        elif step == self.window.recorded.stop:
            self.memory_snapshot = self.dir / f"memory_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(self.memory_snapshot))
            self._stop_memory()

    def _stop_memory(self) -> None:
        if self.memory_recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory_recording = False

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):  # an earlier error is the one to report
            self._stop_memory()  # the run ended inside the window: no snapshot, history off
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)

    def export(self) -> Optional[Path]:
        """Write this rank's trace (gzipped Chrome trace JSON) if the window was recorded; its path."""
        if self.profiler is None or not self.saved:
            return None
        path = trace_path(self.dir, self.rank)
        self.profiler.export_chrome_trace(str(path))
        return path
