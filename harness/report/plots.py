"""One PNG per view (matplotlib, Agg: no display needed on a login node or in CI)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from harness.core.registry import REPORT_VIEWS, load
from harness.report.load import read_power, read_steps
from harness.report.views import View

MAX_POWER_RUNS = 4
"""Power traces drawn (one panel pair each); the table lists every run."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(frame: pd.DataFrame, group: list[str]) -> list[tuple[str, pd.DataFrame]]:
    if not group:
        return [("", frame)]
    return [(", ".join(f"{k}={v}" for k, v in zip(group, key if isinstance(key, tuple) else (key,))), members)
            for key, members in frame.groupby(group, dropna=False, sort=False)]


def _integer_axis(axis: Any) -> None:
    """Counts (devices, batch sizes, steps) get whole-number ticks, never 1.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(fig: Any, *axes: Any) -> None:
    """One legend for the figure, below the panels, never over the data; `plot` leaves it its room."""
    pairs = [pair for ax in axes for pair in zip(*ax.get_legend_handles_labels())]
    if pairs:
        rows = (len(pairs) + 3) // 4
        fig.legend(*zip(*pairs), fontsize=7, loc="lower center", ncols=min(4, len(pairs)), frameon=False)
        fig.harness_legend_room = 0.06 + 0.05 * rows


def plot_sweep(view: View, plt: Any) -> Any:
    from harness.report.views import SPREAD_STATS, half_spread

    data, vs = view.data, view.meta["vs"]
    panels = [(k, h) for k, h in (("metrics.tokens_per_s", "tokens/s"), ("metrics.model_tflops_per_device",
              "TFLOP/s per device"), ("metrics.iter_time_ms", "ms per step"), ("metrics.peak_memory_mb",
              "peak memory (MB)")) if k in data.columns and data[k].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    numeric = pd.api.types.is_numeric_dtype(data["_x"])
    positions = {v: i for i, v in enumerate(dict.fromkeys(data["_x"]))}
    for ax, (key, label) in zip(axes[0], panels):
        for name, members in _curves(data, view.meta["group"]):
            x = members["_x"] if numeric else members["_x"].map(positions)
            ok = members["status"] == "ok"
            spread = half_spread(members, SPREAD_STATS[key]) if key in SPREAD_STATS else None
            bars = spread[ok] if spread is not None and spread[ok].notna().any() else None
            line = ax.errorbar(x[ok], members.loc[ok, key], yerr=bars, marker="o", capsize=3,
                               label=name or None).lines[0]
            for xi, status in zip(x[~ok], members.loc[~ok, "status"]):
                ax.axvline(xi, color=line.get_color(), linestyle=":", alpha=0.6)
                ax.annotate(status.upper(), (xi, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=8, color=line.get_color())
        if not numeric:
            ax.set_xticks(list(positions.values()), [str(v) for v in positions], rotation=30)
        elif pd.api.types.is_integer_dtype(data["_x"]):
            ax.set_xticks(sorted(positions))  # batch sizes, device counts: no 1.2
        if not vs:
            _integer_axis(ax.xaxis)
        ax.set_xlabel(vs or "run")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if view.meta["group"]:
        _legend_outside(fig, axes[0][0])
    return fig


def plot_compare(view: View, plt: Any) -> Any:
    from harness.report.views import half_spread

    data = view.data[view.data["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(data) + 1.4))
    spread = half_spread(data, "tokens_per_s") * data["_ratio"] / data["metrics.tokens_per_s"]
    ax.barh(range(len(data)), data["_ratio"], xerr=spread if spread.notna().any() else None, capsize=3,
            color="tab:blue")
    ax.set_yticks(range(len(data)), data["_label"], fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("tokens/s relative to the baseline")
    ax.invert_yaxis()
    return fig


def plot_scaling(view: View, plt: Any) -> Any:
    """Speed-up on log-log axes with the ideal line, efficiency on a linear one; 95% error bars; suspect points
    (efficiency above SUSPECT_EFFICIENCY) ringed in red."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from harness.report.views import SPREAD

    fig, (speed, eff) = plt.subplots(1, 2, figsize=(9.5, 3.9))
    for name, members in _curves(view.data, view.meta["group"]):
        line = speed.errorbar(members["devices"], members["speed-up"], yerr=members["speed-up" + SPREAD],
                              marker="o", capsize=3, label=name or "measured").lines[0]
        if members["predicted speed-up"].notna().any():
            speed.plot(members["devices"], members["predicted speed-up"], linestyle=":", marker="x",
                       color=line.get_color(), label=f"{name} predicted".strip())
        eff.errorbar(members["devices"], members["efficiency"], yerr=members["efficiency" + SPREAD], marker="o",
                     capsize=3, color=line.get_color())
        odd = members[members["suspect"].map(lambda v: isinstance(v, str))]
        if len(odd):
            eff.scatter(odd["devices"], odd["efficiency"], s=160, facecolors="none", edgecolors="red",
                        label="suspect (efficiency > 1.05)")
    devices = np.array(sorted(view.data["devices"].unique()))
    speed.plot(devices, devices / devices[0], color="grey", linestyle="--", label="ideal (linear)")
    speed.set_xscale("log", base=2)
    speed.set_yscale("log", base=2)
    eff.axhline(1.0, color="grey", linestyle="--")
    for ax, label in ((speed, "speed-up"), (eff, "parallel efficiency")):
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.set_xticks(devices, [str(d) for d in devices])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    speed.yaxis.set_major_formatter(ScalarFormatter())
    _legend_outside(fig, speed, eff)
    return fig


def plot_context(view: View, plt: Any) -> Any:
    """Tokens/s and memory per device against sequence length (log axes), a curve per context-parallel degree and
    kind; predicted dotted; 95% error bars."""
    from harness.report.views import SPREAD

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9.5, 3.9))
    data = view.data[view.data["status"] == "ok"]
    for (cp, kind), members in data.groupby(["cp", "cp kind"], sort=True):
        name = "cp 1" if cp == 1 else f"cp {cp} {kind}"
        line = speed.errorbar(members["seq_len"], members["tokens/s"], yerr=members["tokens/s" + SPREAD],
                              marker="o", capsize=3, label=name).lines[0]
        memory.plot(members["seq_len"], members["memory MB"], marker="o", color=line.get_color())
        for ax, key in ((speed, "predicted tokens/s"), (memory, "predicted memory MB")):
            if members[key].notna().any():
                ax.plot(members["seq_len"], members[key], linestyle=":", marker="x", color=line.get_color(),
                        label=f"{name} predicted" if ax is speed else None)
    for ax, label in ((speed, "tokens/s"), (memory, "memory per device (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legend_outside(fig, speed, memory)
    return fig


def plot_prediction(view: View, plt: Any) -> Any:
    data = view.data.dropna(subset=["measured", "predicted"])
    metrics = list(dict.fromkeys(data["metric"]))
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.6 * max(1, len(metrics)), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        points = data[data["metric"] == metric]
        ax.scatter(points["measured"], points["predicted"])
        low = min(points["measured"].min(), points["predicted"].min())
        high = max(points["measured"].max(), points["predicted"].max())
        ax.plot([low, high], [low, high], color="grey", linestyle="--")
        if low > 0 and high / low > 20:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted")
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no run has both a prediction and a measurement", ha="center")
    return fig


def plot_power(view: View, plt: Any) -> Any:
    runs = view.data.head(MAX_POWER_RUNS)
    fig, axes = plt.subplots(2, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 5.5), squeeze=False)
    for column, (_, run) in enumerate(runs.iterrows()):
        trace, steps = read_power(run["path"], run["telemetry.power_csv"]), read_steps(run["path"])
        top, bottom = axes[0][column], axes[1][column]
        start = float(trace["time_unix_s"].min()) if trace is not None else 0.0
        if trace is not None:
            for device, samples in trace.groupby(["host", "device"]):
                top.plot(samples["time_unix_s"] - start, samples["power_w"], linewidth=0.8, label=str(device[1])[:12])
        if "end_unix_s" in steps.columns:
            for i, step in steps.iterrows():
                end = step["end_unix_s"] - start
                top.axvspan(end - step["iter_time_ms"] / 1e3, end, color="grey", alpha=0.25 if i % 2 else 0.1)
        if pd.notna(run.get("metrics.idle_power_w")):
            top.axhline(run["metrics.idle_power_w"], color="black", linestyle="--", linewidth=0.8, label="idle")
        top.set_title(run["run"], fontsize=8)
        top.set_xlabel("s since the first sample (shaded: steps)")
        top.set_ylabel("power per device (W)")
        top.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        if "energy_j" in steps.columns:
            bottom.plot(steps["step"], steps["energy_j"], marker=".")
        bottom.set_xlabel("step")
        _integer_axis(bottom.xaxis)
        bottom.set_ylabel("energy per step (J)")
    return fig


def plot_projection(view: View, plt: Any) -> Any:
    data = view.data.dropna(subset=["days"])
    labels = list(dict.fromkeys(data["run"]))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.6))
    for offset, source in ((-0.2, "measured"), (0.2, "predicted")):
        rows = data[data["from"] == source].set_index("run").reindex(labels)
        ax.barh(np.arange(len(labels)) + offset, rows["days"], height=0.4, label=source)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("days to train (6·P·D at the run's rate, linear scaling)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.invert_yaxis()
    return fig


def plot_breakdown(view: View, plt: Any) -> Any:
    from harness.report.views import SPLIT_PARTS

    data = view.data
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(data) + 2.0))
    left = np.zeros(len(data))
    colours = {"compute": "tab:blue", "overlap": "tab:purple", "exposed_comm": "tab:red", "memcpy": "tab:olive",
               "idle": "lightgrey"}
    for key, heading in SPLIT_PARTS.items():
        values = data[heading].fillna(0.0).to_numpy(dtype=float)
        if not values.any():
            continue
        ax.barh(range(len(data)), values, left=left, color=colours[key], label=heading)
        left += values
    ax.set_yticks(range(len(data)), data["run"], fontsize=8)
    ax.set_xlabel("ms per step (profiled steps)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.6 / (len(data) + 2)),
              frameon=False)
    return fig


def plot_comm(view: View, plt: Any) -> Any:
    from harness.trace.comm import BOOKKEEPING

    data = view.data[view.data["collective"] != BOOKKEEPING]
    labels = [f"{r} · {c}" for r, c in zip(data["run"], data["collective"])]
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(data) + 1.6))
    y = np.arange(len(data))
    ax.barh(y - 0.2, data["MB/step"], height=0.4, label="measured", color="tab:blue")
    ax.barh(y + 0.2, data["predicted MB"], height=0.4, label="predicted", color="tab:orange")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("MB per rank per step")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def context_line(frame: pd.DataFrame) -> str:
    """What the plotted runs were: models, systems, backends and the dates they finished."""
    def values(key: str) -> str:
        found = [str(v) for v in dict.fromkeys(frame[key].dropna())] if key in frame.columns else []
        return ", ".join(found[:3]) + (f" (+{len(found) - 3})" if len(found) > 3 else "") if found else "?"

    dates = sorted({str(v)[:10] for v in frame["finished_utc"].dropna()}) if "finished_utc" in frame.columns else []
    when = (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}") if dates else "date not recorded"
    return (f"model {values('model.name')} · system {values('system.name')} · backend {values('backend.name')} · "
            f"{when}")


def plot_ranks(view: View, plt: Any) -> Any:
    """Stacked bars per rank (compute, in collectives, idle), one group per run, the straggler's label in red;
    beside them, where the traces give it step by step, a heat map of each rank's wait by step."""
    data = view.data
    labels = [f"{run} · rank {rank}" for run, rank in zip(data["run"], data["rank"])]
    steps = sorted({s for waits in data["wait by step"] if isinstance(waits, dict) for s in waits})
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(12.0 if steps else 7.0, 0.4 * len(data) + 1.8),
                             squeeze=False)
    ax = axes[0][0]
    if steps:
        heat = axes[0][1]
        grid = np.array([[waits.get(s, np.nan) if isinstance(waits, dict) else np.nan for s in steps]
                         for waits in data["wait by step"]], dtype=float)
        image = heat.imshow(grid, aspect="auto", cmap="viridis")
        heat.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=8)
        heat.set_yticks(range(len(data)), labels, fontsize=8)
        heat.set_xlabel("traced step")
        heat.set_title("ms in collectives (the straggler's row is the darkest)", fontsize=8)
        fig.colorbar(image, ax=heat)
    left = np.zeros(len(data))
    for key, colour in (("compute ms", "tab:blue"), ("in collectives ms", "tab:red"), ("idle ms", "lightgrey")):
        values = data[key].fillna(0.0).to_numpy(dtype=float)
        ax.barh(range(len(data)), values, left=left, color=colour, label=key.removesuffix(" ms"))
        left += values
    ax.set_yticks(range(len(data)), labels, fontsize=8)
    for tick, flag in zip(ax.get_yticklabels(), data["straggler"]):
        if flag == "yes":
            tick.set_color("red")
    ax.set_xlabel("ms per traced step (red label: the straggler)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_checkpoint(view: View, plt: Any) -> Any:
    data = view.data
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(data) + 1.8))
    y = np.arange(len(data))
    worst = (data["save s (worst)"] - data["save s"]).fillna(0.0).clip(lower=0.0)
    ax.barh(y - 0.2, data["save s"].fillna(0.0), height=0.4, xerr=[np.zeros(len(data)), worst], capsize=3,
            label="save, measured (bar: median; whisker: worst save)", color="tab:blue")
    ax.barh(y + 0.2, data["load s"].fillna(0.0), height=0.4, label="load, measured", color="tab:green")
    if data["predicted write s"].notna().any():
        ax.scatter(data["predicted write s"], y - 0.2, marker="x", color="black", zorder=3, label="predicted write")
    ax.set_yticks(y, data["run"], fontsize=8)
    ax.set_xlabel("seconds (the slowest rank)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot(view: View, out_dir: Path, frame: Optional[pd.DataFrame] = None) -> Optional[Path]:
    """Write `<view>.png`, titled with what the runs in `frame` were; None when the view has nothing to draw."""
    if view.data.empty:
        return None
    plt = _pyplot()
    fig = load(REPORT_VIEWS[view.name].plot)(view, plt)
    lines = [view.title, *([context_line(frame)] if frame is not None else [])]
    fig.suptitle("\n".join(textwrap.fill(line, 100) for line in lines), fontsize=9)
    fig.tight_layout(rect=(0, getattr(fig, "harness_legend_room", 0.0), 1, 1))
    path = out_dir / f"{view.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
