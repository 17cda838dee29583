"""What a person reads: the live progress line during a run and the result table after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from harness.core.layout import cp_text
from harness.core.stats import plus_minus

console = Console()


def _fmt(value: Optional[float], spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _step_text(record: dict[str, Any]) -> str:
    loss = _fmt(record["loss"], ".4f", (record.get("nonfinite") or {}).get("loss", "n/a"))
    return (f"loss {loss}  {record['iter_time_ms']:.1f} ms/step  "
            f"{record['tokens_per_s']:,.0f} tok/s  {record['model_tflops_per_device']:.3g} TFLOP/s/dev")


class Progress:
    """A live bar on a terminal; one plain line per step otherwise (CI logs, files)."""

    def __init__(self, total: int, warmup: int) -> None:
        self.warmup = warmup
        self.live = console.is_terminal
        if self.live:
            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("warm-up" if warmup else "train", total=total, stats="")
            self.bar.start()

    def update(self, record: dict[str, Any]) -> None:
        phase = "warm-up" if record["warmup"] else "train"
        if self.live:
            self.bar.update(self.task, advance=1, description=phase, stats=_step_text(record))
        else:
            console.print(f"step {record['step']:>4} {phase:<7} {_step_text(record)}", highlight=False)

    def close(self) -> None:
        if self.live:
            self.bar.stop()


NOTE_WIDTH = 40
"""Notes longer than this become numbered footnotes under the table: a long reason (why a figure was
not measured) is printed once, whole, instead of wrapped into every row it applies to."""

RSS_NOTE = ("cpu_peak_rss: the process's resident memory (Python, torch, allocator caches included); "
            "the prediction, which counts model state, activations and buffers, is set beside the tensor peak")


def summary_table(summary: dict[str, Any]) -> tuple[Table, list[str]]:
    """The result table and its footnotes."""
    m, layout, model = summary["metrics"], summary["layout"], summary["model"]
    title = (f"{model.get('name')} ({_fmt(model.get('params'), ',')} params) · "
             f"{summary['config']['backend']['name']} · world {layout['world_size']} (dp {layout['dp']}, "
             f"tp {layout['tp']}, pp {layout['pp']}{cp_text(layout.get('cp', 1))}) · "
             f"batch {layout['global_batch_size']} "
             f"= {layout['micro_batch_size']} x {layout['dp']} x {layout['grad_accum']} accum")
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("measured (median ± half IQR)", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("error", justify="right")
    table.add_column("note")
    predicted = summary.get("prediction") or {}
    spreads = summary.get("statistics") or {}
    util_std = _fmt(m.get("gpu_util_pct_std"), ".0f")
    rss = m.get("peak_memory_kind") == "cpu_peak_rss"
    rows = [  # label, metrics key, format, unit, note
        ("iteration time", "iter_time_ms", ".2f", " ms", _interval_note(spreads.get("iter_time_ms"), m)),
        ("tokens/s", "tokens_per_s", ",.0f", "", ""),
        ("model TFLOP/s per device", "model_tflops_per_device", ".4g", "", ""),
        ("hardware TFLOP/s per device", "hardware_tflops_per_device", ".4g", "", "with recompute"),
        ("MFU", "mfu", ".1%", "", m.get("mfu_reason") or f"peak {m.get('peak_tflops')} TFLOP/s"),
        ("HFU", "hfu", ".1%", "", m.get("hfu_reason") or ""),
        *([("peak tensor memory", "tensor_peak_mb", ",.0f", " MB", m.get("tensor_peak_mb_reason")
            or f"live tensors at their peak in step {m.get('tensor_peak_step')} (torch.profiler), max over ranks")]
          if rss else []),
        ("peak memory" if not rss else "peak RSS", "peak_memory_mb", ",.0f", " MB",
         RSS_NOTE if rss else m.get("peak_memory_kind") or ""),
        ("power per device", "power_w", ".1f", " W", m.get("power_w_reason") or "time-weighted mean"),
        ("idle power per device", "idle_power_w", ".1f", " W", m.get("idle_power_w_reason") or ""),
        ("energy per step", "energy_j_per_step", ".4g", " J",
         m.get("energy_j_per_step_reason") or "all devices, all nodes"),
        ("tokens per joule", "tokens_per_joule", ",.1f", "", m.get("tokens_per_joule_reason") or ""),
        ("GPU usage", "gpu_util_pct_mean", ".0f", " %", f"mean over timed steps, std {util_std} %"),
        ("process CPU", "process_cpu_pct", ".0f", " %", "of one core, mean over ranks (psutil)"),
        ("loss", "loss", ".4f", "", "median over timed steps"),
    ]
    footnotes: list[str] = []
    for label, key, spec, unit, note in rows:
        measured, guess = m.get(key), predicted.get("peak_memory_mb" if key == "tensor_peak_mb" else key)
        if rss and key == "peak_memory_mb":
            guess = None  # the prediction stands beside the tensor peak, not the process's RSS
        spread = plus_minus(spreads.get(key))
        spread_spec = ".2g" if spec.endswith("g") else spec
        shown = _fmt(measured, spec) + (f" ± {format(spread, spread_spec)}" if spread and measured is not None else "")
        comparable = guess is not None and measured
        error = _fmt(guess / measured - 1 if comparable else None, "+.0%", "")
        if len(note) > NOTE_WIDTH:
            if note not in footnotes:
                footnotes.append(note)
            note = f"see ({footnotes.index(note) + 1})"
        table.add_row(label, shown + unit, _fmt(guess, spec, "") + (unit if guess is not None else ""), error, note)
    _breakdown_rows(table, summary)
    return table, footnotes


def _interval_note(stats: Optional[dict[str, Any]], m: dict[str, Any]) -> str:
    """n timed steps, and the mean's 95% interval where there are enough of them."""
    if not stats or not stats.get("ci95"):
        return f"{m['timed_steps']} timed steps"
    low, high = stats["ci95"]
    return f"{stats['n']} timed steps; 95% CI of the mean {low:.2f}-{high:.2f} ms"


def _breakdown_rows(table: Table, summary: dict[str, Any]) -> None:
    """Where a profiled run's traced step went (summary's `breakdown`, harness/trace/)."""
    b, profile = summary.get("breakdown"), summary.get("profile") or {}
    if not b:
        return
    steps = f"steps {b['steps'][0]}-{b['steps'][-1]}" if len(b["steps"]) > 1 else f"step {b['steps'][0]}"
    table.add_section()
    for label, key, note in (("traced step", "step_ms", f"profiled {steps}, mean over ranks"),
                             ("  compute", "compute_ms", ""),
                             ("  communication", "comm_ms", f"{_fmt(b.get('overlap_ms'), '.2f')} ms overlapped"),
                             ("  exposed communication", "exposed_comm_ms", ""),
                             ("  memory copies", "memcpy_ms", ""),
                             ("  idle", "idle_ms", "no operator, collective or kernel running")):
        if b.get(key) is not None:
            table.add_row(label, _fmt(b[key], ".2f") + " ms", "", "", note)
    table.add_row("profiler overhead", _fmt(profile.get("overhead_pct"), "+.0f") + " %", "", "",
                  "recorded steps vs unprofiled")


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    table, footnotes = summary_table(summary)
    console.print(table)
    for number, note in enumerate(footnotes, 1):
        console.print(f"({number}) {note}", highlight=False, soft_wrap=True)
    for warning in summary.get("warnings") or []:
        console.print(f"harness: warning: {warning}", highlight=False, soft_wrap=True)
    if summary.get("stop_reason", "completed") != "completed":
        console.print(f"stopped early: {summary['stop_reason']}", highlight=False)
    console.print(f"run directory: {run_dir}", highlight=False)
