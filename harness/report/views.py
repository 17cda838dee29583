"""The studies' views over a DataFrame of runs (`harness.report.load`): each is a table, notes, and the
numbers its plot draws.

Formulas, with the study that uses each:
- speed-up g→n = tokens_per_s(n) / tokens_per_s(g), g the smallest device count of a curve; with a
  fixed global batch (strong scaling) this is t_iter(g) / t_iter(n); efficiency = speed-up / (n/g).
- communication efficiency eff_g→n = t_comm(g) / t_comm(n), and the iteration-time ratio it implies,
  (r_comp + r_comm) / (c·r_comp + r_comm / eff) with r = t / t_iter at g and c = t_comp(n) / t_comp(g);
  g is the curve's smallest device count that communicates (one device does not)
  (c = 1 in weak scaling, where this is Cheng et al.'s formula, "Thorough Characterization and Analysis
  of Large Transformer Model Training At-Scale", Proc. ACM Meas. Anal. Comput. Syst. 8(1), 2024).
- time to train t = T / (R·N) with T = 6·P·D FLOPs, D tokens (default 20·P), R the per-device model
  FLOP rate and N devices; energy E = t · power per device · N (Yin et al., "Evaluation of pre-training
  large language models on leadership-class supercomputers", J. Supercomputing 2023,
  https://doi.org/10.1007/s11227-023-05479-7); the ALCF figure of merit (6sd² + s²d)·b·L / T_step
  (https://github.com/argonne-lcf/alcf4_aibenchmarks); the bandwidth for linear scaling C / t_step,
  C the bytes each device sends per step (Yin et al.).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pandas as pd

from harness.core.errors import ConfigError
from harness.core.registry import REPORT_VIEWS, load
from harness.costmodel.timing import alcf_fom

RESULT_PREFIXES = ("run", "path", "status", "error", "stop_reason", "finished_utc", "warnings", "statistics.",
                   "checkpoints.", "resilience.",
                   "model.params", "layout.", "metrics.",
                   "prediction.", "telemetry.", "env.", "profile.", "breakdown.")
IGNORED_KEYS = ("name", "sweep.", "report.", "launcher.watchdog_s", "launcher.monitor_interval_s",
                "telemetry.", "profile.", "train.fault_inject_", "checkpoint.dir", "checkpoint.resume_from",
                "checkpoint.overwrite", "launcher.max_restarts")
"""Config keys that never define a point of a study (labels, bookkeeping, sampling settings, testing faults)."""
WORLD_KEYS = ("launcher.nproc", "parallel.world_size", "train.global_batch_size")
"""Keys that change with the device count along a scaling curve."""
CONTEXT_KEYS = ("model.name", "system.name")
"""Runs that differ in these are never drawn as one curve."""

METRICS = {  # summary column: table heading
    "metrics.tokens_per_s": "tokens/s",
    "metrics.model_tflops_per_device": "TFLOP/s/dev",
    "metrics.mfu": "MFU",
    "metrics.iter_time_ms": "ms/step",
    "metrics.data_time_ms": "data ms",
    "metrics.peak_memory_mb": "peak MB",
    "metrics.alloc_retries": "alloc retries",
    "gpu_use": "GPU use %",
    "metrics.energy_j_per_step": "J/step",
    "metrics.tokens_per_joule": "tokens/J",
}
SPREAD = " ±"
"""Suffix of a column holding the spread of the column before it (half the interquartile range of the timed
steps, half the min-max range below 4 steps); tables print the two as `median ± spread`, CSV and JSON keep both."""
SPREAD_STATS = {"metrics.tokens_per_s": "tokens_per_s", "metrics.model_tflops_per_device": "model_tflops_per_device",
                "metrics.mfu": "mfu", "metrics.iter_time_ms": "iter_time_ms", "metrics.data_time_ms": "data_time_ms"}
"""Metrics whose spread the summary's `statistics` section holds, by its key there."""
SUSPECT_EFFICIENCY = 1.05
"""A parallel efficiency above this (a speed-up beyond the ideal) is flagged: more devices rarely make each one
faster, so noise, a busy baseline or a cache effect is the likelier cause."""
PREDICTED = ("iter_time_ms", "tokens_per_s", "model_tflops_per_device", "mfu", "peak_memory_mb", "power_w",
             "energy_j_per_step", "tokens_per_joule")


@dataclass
class Options:
    """What the user asked for; None lets the runs' `report` config or what varies decide."""

    views: list[str] = field(default_factory=list)
    vs: Optional[str] = None
    by: list[str] = field(default_factory=list)
    baseline: Optional[str] = None
    tokens: Optional[float] = None
    devices: Optional[int] = None


@dataclass
class View:
    """One view: the table printed and written to report.md, notes under it, the numbers for its plot."""

    name: str
    title: str
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    data: pd.DataFrame = field(default_factory=pd.DataFrame)
    meta: dict[str, Any] = field(default_factory=dict)


def column(frame: pd.DataFrame, key: str) -> pd.Series:
    """A column, or NaN for runs written before the key existed."""
    return frame[key] if key in frame.columns else pd.Series(np.nan, index=frame.index)


def config_keys(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if not c.startswith(RESULT_PREFIXES) and not c.startswith(IGNORED_KEYS)]


def varying(frame: pd.DataFrame, keys: Optional[list[str]] = None) -> list[str]:
    """Config keys whose value differs between runs, less those a section's name already implies (two
    systems differ in every system.* figure: system.name says it)."""
    keys = config_keys(frame) if keys is None else keys
    changing = [k for k in keys if k in frame.columns and frame[k].astype(str).nunique() > 1]
    return [k for k in changing if not _implied_by_name(frame, k, changing)]


def _implied_by_name(frame: pd.DataFrame, key: str, changing: list[str]) -> bool:
    name = f"{key.rpartition('.')[0]}.name"
    if key == name or name not in changing:
        return False
    return bool((frame.groupby(frame[name].astype(str))[key].agg(lambda s: s.astype(str).nunique()) <= 1).all())


def check_key(frame: pd.DataFrame, key: str, option: str) -> None:
    if key not in frame.columns:
        hint = ", ".join(varying(frame)) or "none (every run has the same config)"
        raise ConfigError(f"report: {option}={key}: no such key in these runs; keys that vary: {hint}")


def _consensus(frame: pd.DataFrame, key: str) -> Any:
    """The runs' `report.*` setting when they agree on it (an experiment sets it for all its points)."""
    values = [v for v in column(frame, key).dropna() if not (isinstance(v, list) and not v)]
    distinct = {repr(v) for v in values}
    return values[0] if len(distinct) == 1 else None


def resolve(frame: pd.DataFrame, options: Options) -> Options:
    """Fill what the user left open from the runs' report config, then from which keys vary."""
    views = options.views or list(_consensus(frame, "report.views") or []) or default_views(frame)
    if not options.views and column(frame, "breakdown.step_ms").isna().all():  # an experiment's views,
        views = [v for v in views if v not in PROFILED_VIEWS] or ["sweep"]  # its runs not profiled after all
    for view in views:
        if view not in REPORT_VIEWS:
            raise ConfigError(f"report: --view={view}: unknown view; choose from {', '.join(REPORT_VIEWS)}")
    by = options.by or list(_consensus(frame, "report.by") or [])
    vs = options.vs or _consensus(frame, "report.vs")
    baseline = options.baseline or _consensus(frame, "report.baseline")
    for key in [*by, *([vs] if vs else [])]:
        check_key(frame, key, "--by" if key in by else "--vs")
    return Options(views=views, vs=vs, by=by, baseline=baseline, tokens=options.tokens, devices=options.devices)


def default_views(frame: pd.DataFrame) -> list[str]:
    """scaling when the device count varies, compare when backends or layouts vary, else a sweep; then
    prediction where the cost model predicted, power where power was sampled."""
    keys = varying(frame)
    views = []
    if _curves_over_devices(frame, [k for k in keys if k not in WORLD_KEYS]):
        views.append("scaling")
    if any(k.startswith(("backend.", "parallel.")) for k in keys) and "scaling" not in views:
        views.append("compare")
    if not views:
        views.append("sweep")
    if column(frame, "prediction.iter_time_ms").notna().any():
        views.append("prediction")
    if column(frame, "telemetry.power_csv").notna().any():
        views.append("power")
    if column(frame, "breakdown.step_ms").notna().any():
        views += ["breakdown", "comm"]
    if column(frame, "breakdown.straggler.rank").notna().any():
        views.append("ranks")
    if column(frame, "checkpoints.log").notna().any():
        views.append("checkpoint")
    return views


def _curves_over_devices(frame: pd.DataFrame, group: list[str]) -> bool:
    """Whether some set of runs equal in everything but the device count spans two or more device counts."""
    worlds = column(frame, "layout.world_size")
    if not group:
        return worlds.nunique() > 1
    return bool((worlds.groupby([frame[k].astype(str) for k in group]).nunique() > 1).any())


def short_labels(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    """`zero_stage=1 micro_batch_size=2`: the last part of each key, for plot labels."""
    if not keys:
        return frame["run"]
    def short(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]  # backend.name → backend

    return frame[keys].astype(str).apply(lambda row: " ".join(f"{short(k)}={v}" for k, v in row.items()), axis=1)


def context_notes(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    mixed = [k for k in CONTEXT_KEYS if k in frame.columns and frame[k].nunique() > 1]
    return [f"runs differ in {k} ({', '.join(map(str, frame[k].unique()))}): drawn as separate curves, never one"
            for k in mixed if k not in keys]


def _gpu_use(frame: pd.DataFrame) -> pd.Series:
    mean, std = column(frame, "metrics.gpu_util_pct_mean"), column(frame, "metrics.gpu_util_pct_std")
    return pd.Series([None if pd.isna(m) else f"{m:.1f} ± {0.0 if pd.isna(s) else s:.1f}" for m, s in zip(mean, std)],
                     index=frame.index, dtype=object)


def half_spread(frame: pd.DataFrame, stat: str) -> pd.Series:
    """Half the interquartile range (or the min-max range below 4 values) of a per-step figure per run."""
    q1, q3 = column(frame, f"statistics.{stat}.q1"), column(frame, f"statistics.{stat}.q3")
    low, high = column(frame, f"statistics.{stat}.min"), column(frame, f"statistics.{stat}.max")
    return ((q3 - q1) / 2).where(q1.notna(), (high - low) / 2)


def ci_half(frame: pd.DataFrame, stat: str) -> pd.Series:
    """Half the 95% confidence interval of a per-step figure's mean per run; NaN where too few steps gave none,
    infinite where a rate's interval has no upper end (the step time's reached zero: too noisy to bound)."""
    def half(ci: Any) -> float:
        if not (isinstance(ci, list) and len(ci) == 2):
            return np.nan
        return np.inf if None in ci else (ci[1] - ci[0]) / 2

    return column(frame, f"statistics.{stat}.ci95").map(half)


def relative_half(frame: pd.DataFrame) -> pd.Series:
    """Half the 95% interval of each run's mean step time over the mean: the relative spread of its rates, to first
    order, and finite even where a noisy run's interval reaches zero step time (a rate's then has no upper end)."""
    return ci_half(frame, "iter_time_ms") / column(frame, "statistics.iter_time_ms.mean")


def warning_notes(frame: pd.DataFrame) -> list[str]:
    """Each run's own warnings (a busy host, a noisy step time, too few steps), named by run."""
    return [f"{run['run']}: warning: {w}" for _, run in frame.iterrows()
            for w in (run.get("warnings") if isinstance(run.get("warnings"), list) else [])]


def metric_table(frame: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """`keys`, status, the timed steps and every measured metric some run has, each with its spread; a metric no
    run measured is left out with the runs' reason as a note (never a zero or a guess)."""
    table = frame[keys].copy() if keys else pd.DataFrame(index=frame.index)
    table["status"] = frame["status"]
    notes = []
    steps = column(frame, "statistics.timed_steps")
    if steps.notna().any():
        table["n"] = steps.astype("Int64")
        notes.append("n: timed steps (warm-up and profiled steps excluded); ± half the interquartile range over "
                     "them (half the min-max range below 4 steps); rates are each step's work over its time")
    for key, heading in METRICS.items():
        values = _gpu_use(frame) if key == "gpu_use" else column(frame, key)
        if values.notna().any():
            table[heading] = values
            if key in SPREAD_STATS and half_spread(frame, SPREAD_STATS[key]).notna().any():
                table[heading + SPREAD] = half_spread(frame, SPREAD_STATS[key])
            continue
        reason = column(frame, f"{key}_reason" if key != "gpu_use" else "metrics.power_w_reason").dropna()
        if key.startswith("metrics.") and len(reason):
            notes.append(f"{heading}: not measured ({reason.iloc[0].removeprefix('not measured: ')})")
    notes += warning_notes(frame)
    failed = frame[frame["status"] != "ok"]
    for _, run in failed.iterrows():
        notes.append(f"{run['run']}: {run['status']}: {str(run.get('error') or '')[:200]}")
    return table, notes


def sweep_view(frame: pd.DataFrame, options: Options) -> View:
    """Throughput, time, memory, utilisation and energy against the swept key, a row per run."""
    keys = varying(frame)
    vs = options.vs or next((k for k in keys if k not in options.by), None)
    group = [*options.by, *[k for k in keys if k != vs and k not in options.by]]  # one curve per other setting
    shown = list(dict.fromkeys([*group, *([vs] if vs else [])]))
    ordered = frame.sort_values(shown, kind="stable") if shown else frame
    table, notes = metric_table(ordered, shown)
    data = ordered.assign(_x=ordered[vs] if vs else range(len(ordered)))
    title = f"Sweep over {vs}" if vs else "Runs"
    return View("sweep", title, table, [*context_notes(frame, group), *notes], data, {"vs": vs, "group": group})


def _baseline_mask(frame: pd.DataFrame, baseline: Optional[str]) -> pd.Series:
    if not baseline:
        return pd.Series(False, index=frame.index)
    key, _, value = baseline.partition("=")
    check_key(frame, key, "--baseline")
    return frame[key].astype(str) == value


def compare_view(frame: pd.DataFrame, options: Options) -> View:
    """Backends or layouts side by side on the same model, system and device count, each divided by a baseline."""
    context = [k for k in (*CONTEXT_KEYS, "layout.world_size") if k in frame.columns]
    others = [k for k in varying(frame) if k not in context and k not in WORLD_KEYS]
    compared = list(dict.fromkeys([*options.by, *others]))  # every differing key, so rows can be told apart
    table, notes = metric_table(frame, [*[k for k in context if frame[k].nunique() > 1], *compared])
    is_base = _baseline_mask(frame, options.baseline)
    throughput, memory = column(frame, "metrics.tokens_per_s"), column(frame, "metrics.peak_memory_mb")
    ratio, mem_ratio, base_label = [], [], []
    groups = frame.groupby(context, dropna=False, sort=False).groups if context else {(): frame.index}
    for index in groups.values():
        members = frame.loc[index]
        ok = members[members["status"] == "ok"]
        chosen = ok[is_base.loc[ok.index]] if is_base.loc[ok.index].any() else ok
        base = chosen.index[0] if len(chosen) else None
        for i in index:
            ratio.append(throughput[i] / throughput[base] if base is not None else np.nan)
            mem_ratio.append(memory[i] / memory[base] if base is not None else np.nan)
            base_label.append(frame.at[base, "run"] if base is not None else None)
    order = [i for index in groups.values() for i in index]
    table = table.loc[order]
    table.insert(list(table.columns).index("status") + 1, "× tokens/s", ratio)
    table["× memory"] = mem_ratio
    if options.baseline and not is_base.any():
        notes.insert(0, f"no run matches baseline {options.baseline}; each group's first ok run is the baseline")
    notes.insert(0, "ratios divide by the baseline run of the same "
                 + "/".join(context) + f" ({options.baseline or 'the first ok run'}): "
                 + ", ".join(sorted(set(filter(None, base_label)))))
    shown_context = [k for k in context if frame[k].nunique() > 1]
    data = frame.loc[order].assign(_ratio=ratio, _label=short_labels(frame.loc[order], [*shown_context, *compared]))
    return View("compare", "Side by side: " + (", ".join(compared) or "runs"), table,
                [*context_notes(frame, context), *notes], data, {"context": context, "compared": compared})


def _split(run: pd.Series) -> tuple[Optional[float], Optional[float], str]:
    """(compute s, communication s, source) of one step: a profiler trace's breakdown where the run has
    one, else the cost model's (all communication counted, overlapped or not, as Cheng et al. do)."""
    if pd.notna(run.get("breakdown.step_ms")) and pd.notna(run.get("breakdown.comm_ms")):
        step_ms, comm_ms = run["breakdown.step_ms"], min(run["breakdown.comm_ms"], run["breakdown.step_ms"])
        return (step_ms - comm_ms) / 1e3, comm_ms / 1e3, "trace"
    comm = [run.get(f"prediction.estimate.breakdown_s.comm.{d}") for d in ("dp", "tp", "pp")]
    cp = run.get("prediction.estimate.breakdown_s.comm.cp")  # absent from runs predicted before cp existed
    comm.append(0.0 if cp is None or pd.isna(cp) else cp)
    step = run.get("prediction.estimate.step_time_s")
    if step is None or pd.isna(step) or any(c is None or pd.isna(c) for c in comm):
        return None, None, "none"
    comm_s = min(float(sum(comm)), float(step))
    return float(step) - comm_s, comm_s, "cost model"


def _mode(points: pd.DataFrame) -> str:
    world, batch = points["layout.world_size"], points["layout.global_batch_size"]
    if batch.nunique() == 1:
        return "strong"
    if (batch / world).nunique() == 1:
        return "weak"
    return "mixed"


def _suspect(efficiency: float, half: float, base: pd.Series) -> Optional[tuple[str, str]]:
    """(tag, explanation) of why an efficiency above SUSPECT_EFFICIENCY is likelier an artefact than a result:
    every cause that applies; None when it is not above."""
    if not efficiency > SUSPECT_EFFICIENCY:
        return None
    causes = []
    if pd.notna(half) and efficiency - half <= SUSPECT_EFFICIENCY:
        causes.append(("noise", f"noise: its 95% interval reaches {efficiency - half:.2f}"))
    elif pd.isna(half):
        causes.append(("noise?", "noise cannot be ruled out: too few timed steps for an interval (raise train.steps)"))
    base_warnings = base.get("warnings") if isinstance(base.get("warnings"), list) else []
    busy = [w for w in base_warnings if "busy" in w] or base_warnings
    if busy:
        causes.append(("busy baseline", f"a busy or noisy baseline ({base['run']}: {busy[0][:140]})"))
    if not causes:
        causes.append(("cache?", "a cache effect or a slow baseline: with n devices each holds 1/n of the batch or "
                                 "model, which may fit a faster cache level; rerun the baseline on a quiet host"))
    return ", ".join(t for t, _ in causes), "; ".join(e for _, e in causes)


def scaling_view(frame: pd.DataFrame, options: Options) -> View:
    """Speed-up and parallel efficiency over device counts, measured beside predicted, and the speed-up
    implied by the compute/communication split and the communication efficiency."""
    group = list(dict.fromkeys([*options.by, *[k for k in varying(frame) if k not in WORLD_KEYS]]))
    if not _curves_over_devices(frame, group):
        raise ConfigError("report: the scaling view needs runs that differ only in their device count, at two or "
                          "more counts (e.g. harness run -m launcher.nproc=1,2,4)")
    rows, notes = [], context_notes(frame, group)
    grouped = frame.groupby(group, dropna=False, sort=False) if group else [((), frame)]
    for key, members in grouped:
        points = members[members["status"] == "ok"].sort_values("layout.world_size")
        if points.empty:
            continue
        base = points.iloc[0]
        splits = {i: _split(run) for i, run in points.iterrows()}
        # Cheng et al.'s analysis needs communication at its base: one device has none, so it starts at the
        # curve's smallest count that communicates, g_c, and is chained to g by the measured speed-up g→g_c.
        comm_base = next((points.loc[i] for i, (_, comm, _) in splits.items() if comm), None)
        mode = _mode(points)
        predicted = pd.to_numeric(column(points, "prediction.tokens_per_s"), errors="coerce")  # None → NaN
        rel = relative_half(points)  # each run's; combined in quadrature, the speed-up's relative error
        for i, run in points.iterrows():
            n, g = run["layout.world_size"], base["layout.world_size"]
            speedup = run["metrics.tokens_per_s"] / base["metrics.tokens_per_s"]
            half = speedup * float(np.hypot(rel[i], rel[base.name])) if i != base.name else 0.0
            pred_speedup = predicted[i] / predicted[base.name]  # NaN where either run has no prediction
            comp_n, comm_n, source = splits[i]
            tag, why = _suspect(speedup / (n / g), half / (n / g), base) or (None, None)
            comm_eff = implied = r_comm = np.nan
            if comm_base is not None and comm_n and n >= comm_base["layout.world_size"]:
                comp_c, comm_c, _ = splits[comm_base.name]
                r_comp, r_comm = comp_c / (comp_c + comm_c), comm_c / (comp_c + comm_c)
                comm_eff = comm_c / comm_n
                c = comp_n / comp_c if comp_c else 1.0
                ratio = (r_comp + r_comm) / (c * r_comp + r_comm / comm_eff)
                implied = (ratio * run["layout.global_batch_size"] / comm_base["layout.global_batch_size"]
                           * comm_base["metrics.tokens_per_s"] / base["metrics.tokens_per_s"])
            rows.append({**dict(zip(group, key if isinstance(key, tuple) else (key,))),
                         "devices": int(n), "mode": mode, "ms/step": run["metrics.iter_time_ms"],
                         "n": run.get("statistics.timed_steps"), "tokens/s": run["metrics.tokens_per_s"],
                         "speed-up": speedup, "speed-up" + SPREAD: half, "ideal": n / g,
                         "efficiency": speedup / (n / g), "efficiency" + SPREAD: half / (n / g),
                         "suspect": tag, "_why": why,
                         "predicted speed-up": pred_speedup,
                         "predicted efficiency": pred_speedup / (n / g),
                         "split from": source, "comm base": int(comm_base["layout.world_size"])
                         if comm_base is not None else None, "r_comm(g_c)": r_comm,
                         "comm eff g_c→n": comm_eff, "speed-up from split": implied})
        skipped = members[members["status"] != "ok"]
        notes += [f"{r['run']}: {r['status']}, left out of the curve" for _, r in skipped.iterrows()]
    table = pd.DataFrame(rows)
    notes += [f"{row['devices']} devices: efficiency {row['efficiency']:.2f} > {SUSPECT_EFFICIENCY} (beyond the ideal "
              f"speed-up), suspect: {row['_why']}" for _, row in table.iterrows() if isinstance(row.get("_why"), str)]
    table = table.drop(columns=["_why"], errors="ignore")
    notes += warning_notes(frame)
    if not table.empty and table["split from"].eq("none").all():
        notes.append("no compute/communication split: no run has a profiler trace breakdown or a timed "
                     "prediction (calibrate the system: harness calibrate)")
    notes.append("speed-up = tokens/s(n) / tokens/s(g) at the curve's smallest device count g; efficiency = "
                 "speed-up / (n/g); strong = fixed global batch, weak = fixed batch per device")
    notes.append("speed-up ± and efficiency ±: half the 95% interval, from each run's t-based interval of its mean "
                 "step time, the two runs' relative widths combined in quadrature (NaN where a run had < 3 steps)")
    notes.append("comm eff g_c→n = t_comm(g_c) / t_comm(n) from the smallest count g_c that communicates; speed-up "
                 "from split = measured speed-up g→g_c × (r_comp + r_comm) / (c·r_comp + r_comm / eff) × batch "
                 "ratio (Cheng et al.; c = compute time ratio n/g_c)")
    return View("scaling", "Scaling over device counts", table, notes, table, {"group": group})


def prediction_view(frame: pd.DataFrame, options: Options) -> View:
    """The cost model's prediction next to the measurement, per run and metric, with the relative error."""
    rows, notes = [], []
    for _, run in frame[frame["status"] == "ok"].iterrows():
        for key in PREDICTED:
            measured, predicted = run.get(f"metrics.{key}"), run.get(f"prediction.{key}")
            if key == "peak_memory_mb" and run.get("metrics.peak_memory_kind") == "cpu_peak_rss":
                continue  # a process's whole RSS, not the model's device memory
            if pd.isna(measured) and pd.isna(predicted):
                continue
            error = (predicted - measured) / measured if pd.notna(measured) and pd.notna(predicted) and measured \
                else np.nan
            rows.append({"run": run["run"], "metric": key, "measured": measured, "predicted": predicted,
                         "error": error})
            reason = run.get(f"prediction.{key}_reason")
            if pd.isna(predicted) and isinstance(reason, str) and reason not in notes:
                notes.append(reason)
    if (column(frame, "metrics.peak_memory_kind") == "cpu_peak_rss").any():
        notes.append("peak memory on CPU is the process's peak RSS (Python, libraries, buffers), not scored "
                     "against the model's predicted device memory")
    table = pd.DataFrame(rows, columns=["run", "metric", "measured", "predicted", "error"])
    notes.insert(0, "error = (predicted − measured) / measured")
    return View("prediction", "Predicted vs measured", table, [f"not predicted: {n}" if i else n
                                                             for i, n in enumerate(notes)], table)


def context_view(frame: pd.DataFrame, options: Options) -> View:
    """Tokens/s and memory per device against sequence length, one curve per context-parallel degree and kind: how
    the s² attention and the activations grow with the sequence, and what splitting each sequence over cp devices
    buys; measured beside predicted."""
    seq = pd.to_numeric(column(frame, "model.seq_len"), errors="coerce")
    if seq.nunique() < 2:
        raise ConfigError("report: the context view needs runs at two or more sequence lengths (e.g. harness run -m "
                          "+experiment=long-context-cpu)")
    cp = pd.to_numeric(column(frame, "layout.cp").fillna(column(frame, "parallel.cp")), errors="coerce").fillna(1)
    kind = column(frame, "parallel.cp_kind").where(cp > 1, "none").fillna("ulysses")
    rate = column(frame, "metrics.tokens_per_s")
    tensors = column(frame, "metrics.tensor_peak_mb")  # a CPU's live tensors (torch.profiler), not its RSS
    measured = tensors.where(tensors.notna(), column(frame, "metrics.peak_memory_mb"))
    table = pd.DataFrame({
        "seq_len": seq.astype("Int64"), "cp": cp.astype(int), "cp kind": kind, "devices": column(frame,
        "layout.world_size"), "status": frame["status"], "n": column(frame, "statistics.timed_steps"),
        "tokens/s": rate, "tokens/s" + SPREAD: rate * relative_half(frame),
        "predicted tokens/s": pd.to_numeric(column(frame, "prediction.tokens_per_s"), errors="coerce"),
        "memory MB": measured, "memory from": np.where(tensors.notna(), "live tensors",
                                                        column(frame, "metrics.peak_memory_kind").fillna("")),
        "predicted memory MB": pd.to_numeric(column(frame, "prediction.peak_memory_mb"), errors="coerce"),
        "run": frame["run"]}).sort_values(["cp", "cp kind", "seq_len"], kind="stable")
    notes = [f"{r['run']}: {r['status']} at seq_len {r['seq_len']} with cp {r['cp']}"
             + (f" ({r['error'][:120]})" if isinstance(r.get("error"), str) else "")
             for _, r in frame.assign(seq_len=seq, cp=cp).iterrows() if r["status"] != "ok"]
    notes += warning_notes(frame)
    notes.append("tokens/s ±: half the 95% interval, from the run's mean step time; memory: per device, the live "
                 "tensors at their peak where the profiler measured them (a CPU, whose resident memory is mostly the "
                 "interpreter), else the allocator's peak; predicted: the cost model's per-device total")
    notes.append("cp: devices sharing each sequence (ulysses: all-to-all over heads; ring: K/V passed around); each "
                 "holds 1/cp of the activations and does 1/cp of the attention")
    return View("context", "Tokens/s and memory against sequence length, per context-parallel degree", table, notes,
                table, {})


def power_view(frame: pd.DataFrame, options: Options) -> View:
    """Power per run: source, mean and idle power, energy per step; the plot draws the traces."""
    table = pd.DataFrame({
        "run": frame["run"], "source": column(frame, "telemetry.source"),
        "devices": column(frame, "telemetry.devices").map(lambda d: len(d) if isinstance(d, list) else np.nan),
        "power W": column(frame, "metrics.power_w"), "idle W": column(frame, "metrics.idle_power_w"),
        "J/step": column(frame, "metrics.energy_j_per_step"), "tokens/J": column(frame, "metrics.tokens_per_joule"),
    })
    notes = [f"{r['run']}: no power: {r.get('telemetry.reason')}" for _, r in frame.iterrows()
             if pd.isna(r.get("telemetry.power_csv")) and isinstance(r.get("telemetry.reason"), str)]
    data = frame[column(frame, "telemetry.power_csv").notna()]
    return View("power", "Power and energy", table, notes, data)


def projection_view(frame: pd.DataFrame, options: Options) -> View:
    """Time and energy to train each run's model on N devices, from the measured rate and from the predicted
    one side by side, with the ALCF figure of merit and the bandwidth linear scaling would need."""
    rows = []
    for _, run in frame[frame["status"] == "ok"].iterrows():
        params = float(run["model.params"])
        tokens = options.tokens or 20 * params
        devices = options.devices or int(run["layout.world_size"])
        model = SimpleNamespace(seq_len=run["model.seq_len"], d_model=run["model.d_model"],
                                n_layers=run["model.n_layers"])
        comm_bytes = run.get("prediction.comm_bytes_per_device")
        for source, prefix in (("measured", "metrics"), ("predicted", "prediction")):
            rate = run.get(f"{prefix}.model_tflops_per_device")
            step_ms, power = run.get(f"{prefix}.iter_time_ms"), run.get(f"{prefix}.power_w")
            seconds = 6 * params * tokens / (rate * 1e12 * devices) if pd.notna(rate) and rate else np.nan
            bandwidth = (comm_bytes / (step_ms / 1e3) / 1e9 if source == "measured"
                         else run.get("prediction.estimate.linear_scaling_bw_gb_per_s"))
            rows.append({"run": run["run"], "from": source, "params": params, "tokens": tokens, "devices": devices,
                         "TFLOP/s/dev": rate, "days": seconds / 86400,
                         "energy J": seconds * power * devices if pd.notna(power) else np.nan,
                         "FOM": alcf_fom(model, int(run["layout.global_batch_size"]), step_ms / 1e3)
                         if pd.notna(step_ms) else np.nan,
                         "linear-scaling GB/s": bandwidth if pd.notna(comm_bytes) and pd.notna(step_ms) else np.nan})
    table = pd.DataFrame(rows)
    notes = ["T = 6·P·D FLOPs (Yin et al.); days = T / (TFLOP/s per device · devices), i.e. linear scaling from "
             "the run's rate; energy = time · power per device · devices; FOM = (6sd²+s²d)·b·L / T_step; "
             "linear-scaling bandwidth = bytes sent per device per step / step time",
             f"D = {'%.3g tokens' % options.tokens if options.tokens else '20·P tokens'}, devices = "
             f"{options.devices or 'each run’s own'} (--tokens, --devices)"]
    if not table.empty and table["energy J"].isna().all():
        notes.append("energy: no measured or predicted power (power is measured on GPUs with NVML/amdsmi, on "
                     "CPUs with RAPL; predicted with the system's idle_power_w/peak_power_w)")
    return View("projection", "Projection to a full training run", table, notes, table)


PROFILED_VIEWS = tuple(name for name, view in REPORT_VIEWS.items() if view.profiled)
SPLIT_PARTS = {"compute": "compute (alone)", "overlap": "comm overlapped", "exposed_comm": "comm exposed",
               "memcpy": "memcpy", "idle": "idle"}
"""The stacked parts of a traced step, each ms per step; together they make the step's time."""


def _profiled(frame: pd.DataFrame, view: str) -> pd.DataFrame:
    runs = frame[(frame["status"] == "ok") & column(frame, "breakdown.step_ms").notna()]
    if runs.empty:
        raise ConfigError(f"report: the {view} view needs profiled runs (harness run profile.enabled=true ...)")
    return runs


def breakdown_view(frame: pd.DataFrame, options: Options) -> View:
    """Where a profiled step's time goes, per run: compute alone, communication overlapped with compute and
    exposed, memory copies and idle (the characterization study's stacked bars), and the phases marked."""
    runs = _profiled(frame, "breakdown")
    labels = short_labels(runs, [k for k in varying(frame) if k in runs.columns])
    step = column(runs, "breakdown.step_ms")
    overlap = column(runs, "breakdown.overlap_ms").fillna(0.0)
    table = pd.DataFrame({"run": labels, "ms/step traced": step, "ms/step unprofiled":
                          column(runs, "profile.unprofiled_iter_time_ms")}, index=runs.index)
    parts = {"compute": column(runs, "breakdown.compute_ms") - overlap, "overlap": overlap,
             "exposed_comm": column(runs, "breakdown.exposed_comm_ms"),
             "memcpy": column(runs, "breakdown.memcpy_ms").fillna(0.0), "idle": column(runs, "breakdown.idle_ms")}
    for key, heading in SPLIT_PARTS.items():
        table[heading] = parts[key]
    table["comm %"] = 100 * column(runs, "breakdown.comm_ms") / step
    for phase in ("forward", "backward", "optimizer", "pipeline", "data", "metrics"):
        values = column(runs, f"breakdown.phases_ms.{phase}")
        if values.notna().any():
            table[f"{phase} ms"] = values
    table["profiler overhead %"] = column(runs, "profile.overhead_pct")
    sources = sorted(set(column(runs, "breakdown.source").dropna()))
    notes = [f"from: {', '.join(sources)}; ms per step, mean over the recorded steps and ranks",
             "compute (alone) + comm overlapped + comm exposed (+ memcpy) + idle = the traced step; idle: no "
             "operator or collective (CPU) / no kernel (GPU) running",
             "profiler overhead: median recorded step against the median unprofiled timed step"]
    return View("breakdown", "Where the step time goes", table.reset_index(drop=True), notes,
                table.reset_index(drop=True))


def comm_view(frame: pd.DataFrame, options: Options) -> View:
    """Communication by collective kind per profiled run: calls, MB and ms per step, measured beside the
    cost model's bytes."""
    runs = _profiled(frame, "comm")
    labels = short_labels(runs, [k for k in varying(frame) if k in runs.columns])
    rows = []
    for i, run in runs.iterrows():
        kinds = sorted({c.split(".")[2] for c in run.index if c.startswith("breakdown.comm.") and c.count(".") == 3
                        and pd.notna(run[c])})
        for kind in kinds:
            get = lambda key: run.get(f"breakdown.comm.{kind}.{key}")  # noqa: E731
            predicted, measured = get("predicted_bytes"), get("bytes")
            rows.append({"run": labels[i], "collective": kind, "calls/step": get("calls"),
                         "MB/step": measured / 1e6 if pd.notna(measured) else np.nan, "ms/step": get("time_ms"),
                         "predicted MB": predicted / 1e6 if pd.notna(predicted) else np.nan,
                         "error": get("bytes_error")})
    table = pd.DataFrame(rows, columns=["run", "collective", "calls/step", "MB/step", "ms/step", "predicted MB",
                                        "error"])
    notes = ["bytes each rank puts in per step (an all-gather's shard, a reduce-scatter's whole tensor), mean over "
             "ranks; error = (predicted − measured) / measured",
             "harness_metrics: the trainer's own per-step reduction of loss, memory and telemetry (not predicted); "
             "on gloo FSDP's reduce-scatter runs as an all-reduce"]
    return View("comm", "Communication by collective kind", table, notes, table)


def ranks_view(frame: pd.DataFrame, options: Options) -> View:
    """Per profiled run and rank: the traced step split into compute, time inside collectives (which holds the
    wait for the slowest rank) and idle; the rank the others wait for, flagged past the straggler rule."""
    runs = _profiled(frame, "ranks")
    rows = []
    for _, run in runs.iterrows():
        lagging = run.get("breakdown.straggler.rank")
        flagged = bool(run.get("breakdown.straggler.flagged")) if pd.notna(run.get("breakdown.straggler.flagged")) \
            else False
        ranks = run.get("breakdown.ranks") if isinstance(run.get("breakdown.ranks"), list) else []
        for r in ranks:
            rows.append({"run": run["run"], "rank": r["rank"], "step ms": r.get("step_ms"),
                         "compute ms": r.get("compute_ms"), "in collectives ms": r.get("comm_ms"),
                         "idle ms": r.get("idle_ms"),
                         "straggler": ("yes" if flagged else "slowest, within the rule")
                         if pd.notna(lagging) and r["rank"] == lagging else None,
                         "wait by step": {e["step"]: e["comm_ms"] for e in r.get("per_step_ms") or []} or None})
    data = pd.DataFrame(rows, columns=["run", "rank", "step ms", "compute ms", "in collectives ms", "idle ms",
                                      "straggler", "wait by step"])
    table = data.drop(columns=["wait by step"])
    from harness.trace.analyse import STRAGGLER_LAG

    notes = ["ms per traced step, mean over the recorded steps; time in collectives includes waiting for the last "
             f"rank to arrive, so the rank that waits least is the slowest; a straggler: the others' median wait "
             f"exceeds its own by more than {STRAGGLER_LAG:.0%} of the step"]
    notes += [w for w in warning_notes(runs) if "straggler" in w]
    return View("ranks", "Ranks: who waits for whom", table, notes, data)


def checkpoint_view(frame: pd.DataFrame, options: Options) -> View:
    """Per run: checkpoints saved and loaded, their size, the slowest rank's seconds and the aggregate GB/s, beside
    the cost model's write time and the goodput it predicts at Daly's interval."""
    runs = frame[column(frame, "checkpoints.log").notna()]
    if runs.empty:
        raise ConfigError("report: the checkpoint view needs runs that saved or loaded a checkpoint "
                          "(harness run checkpoint.every=N ...)")
    table = pd.DataFrame({
        "run": runs["run"], "saves": column(runs, "checkpoints.saves"),
        "GB": column(runs, "checkpoints.save_bytes") / 1e9,
        "save s": column(runs, "checkpoints.save_s_median"), "save s (worst)": column(runs, "checkpoints.save_s_max"),
        "training waited s": column(runs, "checkpoints.save_blocking_s_median"),
        "GB/s": column(runs, "checkpoints.save_gb_per_s"),
        "predicted write s": column(runs, "prediction.estimate.checkpoint.write_s"),
        "load s": column(runs, "checkpoints.load_s"), "resumed at step": column(runs, "checkpoints.resumed_at_step"),
        "restarts": column(runs, "resilience.restarts"), "steps redone": column(runs, "resilience.lost_steps"),
        "goodput": column(runs, "resilience.goodput"),
        "predicted goodput": column(runs, "prediction.estimate.checkpoint.goodput_at_optimal"),
    }).reset_index(drop=True)
    notes = ["save s: median over the run's saves of the slowest rank's seconds to the checkpoint on disk; training "
             "waited s: the part the loop stopped for (all of it unless checkpoint.async_save); GB/s: bytes over the "
             "save time, all ranks together; per rank and per save: the run's checkpoints.jsonl",
             "predicted: size over the file system's published bandwidth (costmodel/resilience.py); goodput at "
             "Daly's optimum interval for the system's node MTBF; — where the system states no file-system figure",
             "goodput (measured, jobs that restarted): time in surviving steps over wall time from the first "
             "attempt's start (launcher.max_restarts)"]
    return View("checkpoint", "Checkpoint cost", table, notes, table)


def build_views(frame: pd.DataFrame, options: Options) -> list[View]:
    return [load(REPORT_VIEWS[name].build)(frame, options) for name in options.views]
