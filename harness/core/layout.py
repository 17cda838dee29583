"""The value types every layer passes around: how ranks are arranged (`Layout`) and which steps a profiler
records (`ProfileWindow`). They sit on the bottom floor, so the backends, the traces and the cost model take
them without importing the config checks that derive them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from harness.core.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """How the ranks are arranged and how a global batch is split over them."""

    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum: int
    cp: int = 1
    """Ranks sharing each sequence (context parallelism); dp = world_size / (tp · pp · cp)."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def cp_text(cp: int) -> str:
    """A layout's context-parallel size for its one-line description, where it splits sequences (most do not)."""
    return f", cp {cp}" if cp > 1 else ""


@dataclass(frozen=True)
class ProfileWindow:
    """The steps a profiled run traces: `warmup` steps run under the profiler and discarded, then `recorded`."""

    warmup: range
    recorded: range

    @property
    def touched(self) -> range:
        """Every step whose time the profiler changes: its warm-up and recorded steps, and the step after them,
        which pays for stopping the trace (torch.profiler collects its events at that transition)."""
        return range(self.warmup.start, self.recorded.stop + 1)

    def label(self, step: int) -> Optional[str]:
        """What the profiler did in `step` (steps.jsonl's `profiler` field): warmup | record | stop, or None."""
        if step in self.warmup:
            return "warmup"
        if step in self.recorded:
            return "record"
        return "stop" if step == self.recorded.stop else None


def profile_window(p: Any, warmup_steps: int, total_steps: int) -> Optional[ProfileWindow]:
    """The window of `profile.*` (None when profiling is off); ConfigError when it does not fit the run or
    leaves no unprofiled timed step to measure the profiler's overhead against."""
    if not p.enabled:
        if p.memory:
            raise ConfigError("profile.memory=true records the profiled window's memory; add profile.enabled=true")
        return None
    if p.steps:
        steps = sorted(int(s) for s in p.steps)
        if steps != list(range(steps[0], steps[0] + len(steps))) or steps[0] < 0:
            raise ConfigError(f"profile.steps={list(p.steps)}: give consecutive steps (one trace window), "
                              "e.g. profile.steps=[4,5]")
        first, active = steps[0], len(steps)
        warmup = min(p.warmup, first)
    else:
        bounds = (("warmup", 0, "0 or more"), ("active", 1, "at least 1 recorded step"), ("wait", 0, "0 or more"))
        for key, low, what in bounds:
            if p[key] is not None and p[key] < low:
                raise ConfigError(f"profile.{key}={p[key]}: must be {what}")
        warmup, active = p.warmup, p.active
        first = (warmup_steps if p.wait is None else p.wait) + warmup
    window = ProfileWindow(range(first - warmup, first), range(first, first + active))
    if not any(s not in window.touched for s in range(warmup_steps, total_steps)) or window.recorded.stop > total_steps:
        need = window.touched.stop + 1 - warmup_steps
        raise ConfigError(f"profile: steps {window.touched.start}..{window.touched.stop - 1} run under the profiler "
                          f"(recorded {first}..{first + active - 1}); set train.steps={need} or more so that the "
                          "window fits and an unprofiled timed step remains to compare with")
    return window
