"""Why a run stops before its last step, and how every rank agrees on it.

Three ways, each recorded as `stop_reason` in summary.json (`completed` when none applies):

- `walltime`: the batch allocation ends soon. The job scripts export `HARNESS_JOB_END_TIME` (epoch
  seconds: `SLURM_JOB_END_TIME` where Slurm sets it (23.02+), else `squeue -o %e`; on PBS and LSF, the
  script's start plus the requested wall-time, since neither exports an end time). Rank 0 decides after
  each step whether another step and the margin still fit, and the per-step all-gather carries its
  decision to every rank, so all leave the loop after the same step and the summary is written normally.
- `watchdog`: no step finished within `launcher.watchdog_s` (a hang that no collective timeout sees).
  The watchdog thread writes a failed summary (rank 0), leaves the reason for the launcher and ends the
  process, so the launcher (`srun --kill-on-bad-exit`, the elastic agent, mpiexec) ends the job.
- `interrupted`: Ctrl-C or SIGTERM (turned into an exception so the summary is still written; status
  `interrupted`, exit 128 + the signal's number). A sweep stops with the point it was running.
- `diverged`: the loss (or, outside fp16's loss scaling, the gradient norm) was not finite; every rank sees the
  same all-gathered values and stops after the same step (status `diverged`, exit 1).
- `failed`: an exception or a dead peer.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Mapping, Optional

STOP_REASONS = ("completed", "walltime", "watchdog", "interrupted", "diverged", "failed")


def job_end_time(env: Mapping[str, str]) -> Optional[float]:
    """Epoch seconds at which the batch allocation ends, or None outside a time-limited job."""
    for name in ("HARNESS_JOB_END_TIME", "SLURM_JOB_END_TIME"):
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return float(value)
    return None


def out_of_time(end_time_s: Optional[float], now_s: float, last_step_s: float, margin_s: float) -> bool:
    """True when one more step like the last would end within `margin_s` of the allocation's end."""
    return end_time_s is not None and now_s + last_step_s + margin_s >= end_time_s


class StalledRun(RuntimeError):
    """No step finished within the watchdog's limit."""


class Terminated(BaseException):
    """The launcher asked this rank to stop (SIGTERM): raised so the summary is still written."""


class Interrupted(BaseException):
    """A run stopped by Ctrl-C or SIGTERM, its summary written (status interrupted): raised past Hydra's
    sweep, so that no further point runs. A BaseException, as KeyboardInterrupt is: Hydra's job runner catches
    an Exception and goes on to the next point."""

    def __init__(self, signum: int, run_dir: Optional[str] = None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.run_dir, self.sweeping = signum, run_dir, False


INTERRUPTING = {"Terminated": signal.SIGTERM, "KeyboardInterrupt": signal.SIGINT}
"""The exceptions a stopping signal becomes in a rank, and which signal each stands for."""


def raise_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise Terminated(f"received {signal.Signals(signum).name} from the launcher")

    signal.signal(signal.SIGTERM, handler)


def stop_on_signals() -> None:
    """The launching process's own handlers (again after each run: torch's elastic agent installs its own):
    SIGTERM and Ctrl-C raise, so whatever is running ends cleanly and the command says so."""
    raise_on_sigterm()
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Watchdog:
    """Calls `on_stall(error)` and ends the process if `beat()` is not called for `timeout_s` seconds."""

    def __init__(self, timeout_s: float, on_stall: Callable[[StalledRun], None]) -> None:
        self.timeout_s, self.on_stall = timeout_s, on_stall
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="harness-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            stalled_s = time.monotonic() - self._last
            if stalled_s > self.timeout_s:
                error = StalledRun(f"no step finished in {stalled_s:.0f} s (launcher.watchdog_s={self.timeout_s:g})")
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # torch: only here

                try:
                    self.on_stall(error)
                    ErrorHandler().record_exception(error)  # the elastic agent reports it as this rank's error
                finally:
                    print(f"harness: watchdog: {error}; ending this rank", file=sys.stderr, flush=True)
                    os._exit(1)
