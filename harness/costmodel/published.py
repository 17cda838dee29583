"""Score the cost model on published runs (published_runs.yaml): predicted next to published, error per row,
mean and max |error| per table, and the software profile and in-sample constants each table was scored with.

`benchmarks/costmodel_published.py` writes the result as JSON; the tests hold the tables to their bounds. It also
writes each table's summary (`summarize`) beside this module, `published_scores.json`, which `harness estimate` and
`plan` read (costmodel/track_record.py) to say how the model scored on the system a user asks about; a test keeps
it equal to what `score_all` computes.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.config.compose import compose
from harness.costmodel.estimate import estimate
from harness.costmodel.memory import GB

RUNS = Path(__file__).with_name("published_runs.yaml")

METRIC_SCORES = {"tokens_per_s": "step time", "tflops_narayanan": "step time", "peak_fraction_narayanan": "step time",
                 "step_time_s": "step time", "busbw_gb_per_s": "collective", "model_states_gb": "memory",
                 "peak_allocated_gib": "memory"}
"""What each metric scores: the step's speed, a collective's bandwidth, or the memory per device."""


META_COLUMNS = ("name", "world", "published", "relative_to")
"""A table's columns that describe a row rather than set a config key."""


def is_relative(table: dict[str, Any]) -> bool:
    """Whether a published_runs.yaml table scores its rows relative to others of it (`relative_to`, for the whole
    table or as a column, row by row)."""
    return bool(table.get("relative_to")) or "relative_to" in table.get("columns", ())


def scores(table: dict[str, Any]) -> str:
    """What a scored table scores: its metric's kind, or "scaling" where its rows are relative to others of it (the
    change of speed across its runs, not its level)."""
    return "scaling" if table.get("relative") else METRIC_SCORES[table["metric"]]


def row_values(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Each row of a table as {column: value}, its name a string."""
    return [{**dict(zip(table["columns"], row)), "name": str(row[0])} for row in table["rows"]]


def references(table: dict[str, Any]) -> dict[str, Optional[str]]:
    """Each row's reference row: its own `relative_to` column where it has one, else the table's; None on the
    reference rows themselves. A speed table only: a ratio of memories or bandwidths is not what it scores."""
    if METRIC_SCORES[table["metric"]] != "step time" or table.get("kind") == "collective":
        raise ValueError(f"table {table['id']}: relative_to is for a training table's speed, not {table['metric']}")
    out: dict[str, Optional[str]] = {}
    for values in row_values(table):
        name, reference = values["name"], values.get("relative_to") or table.get("relative_to")
        out[name] = None if reference is None or str(reference) == name else str(reference)
    for name, reference in out.items():
        if reference is not None and (reference not in out or out[reference] is not None):
            raise ValueError(f"table {table['id']}, row {name}: relative_to={reference} is not a reference row of it")
    return out


def narayanan_flops(m: Any, global_batch_size: int) -> float:
    """Narayanan et al. 2021 eq. 3: 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)), recompute counted."""
    s, h, layers, v = m.seq_len, m.d_model, m.n_layers, m.vocab_size
    return 96 * global_batch_size * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))


def predicted_value(metric: str, cfg: Any, est: dict[str, Any], world: int) -> float:
    if metric == "model_states_gb":
        mem = est["memory_per_device_bytes"]
        return (mem["weights"] + mem["grads"] + mem["optimizer"]) / GB
    if metric == "peak_allocated_gib":  # what the caching allocator handed out: no CUDA context, no reserve
        mem = est["memory_per_device_bytes"]
        return (mem["total"] - mem["overhead"]) / 2**30
    step = est["step_time_s"]
    if metric == "step_time_s":
        return step
    if metric == "tokens_per_s":
        return cfg.train.global_batch_size * cfg.model.seq_len / step
    tflops = narayanan_flops(cfg.model, cfg.train.global_batch_size) / step / world / 1e12
    if metric == "tflops_narayanan":
        return tflops
    if metric == "peak_fraction_narayanan":
        return tflops / est["peak_tflops"]
    raise ValueError(f"unknown metric {metric}")


def table_rows(table: dict[str, Any]) -> list[tuple[str, list[str], int, float]]:
    """(name, overrides, world, published) for each row of a table."""
    out = []
    for values in row_values(table):
        overrides = [f"system={table['system']}", f"costmodel.software={table['software']}", *table["common"]]
        overrides += [f"{k}={v}" for k, v in values.items() if k not in META_COLUMNS]
        out.append((values["name"], overrides, int(values["world"]), float(values["published"])))
    return out


def score_collectives(table: dict[str, Any]) -> list[dict[str, Any]]:
    """A nccl-tests/rccl-tests table: each row's bus bandwidth as network.py costs the collective on the system."""
    from harness.costmodel.network import RING_FACTOR, fabric

    system = compose([f"system={table['system']}", *table.get("common", [])]).system
    net = fabric(system)
    rows = []
    for row in table["rows"]:
        values = dict(zip(table["columns"], row))
        nodes, local, size = int(values["nodes"]), int(values["devices_per_node"]), float(values["bytes"])
        ranks = nodes * local
        kind = str(values["collective"])
        seconds = net.call_s(kind, size, ranks, local)
        busbw = RING_FACTOR[kind](ranks) * size / seconds / 1e9
        published = float(values["published"])
        rows.append({"name": str(values["name"]), "predicted": busbw, "published": published,
                     "error": busbw / published - 1, "world": ranks, "breakdown_s": {"call": seconds},
                     "command": f"harness estimate system={table['system']} (network.fabric(system).call_s("
                                f"'{kind}', {size:.0f}, {ranks}, {local}))"})
    return rows


def score_table(table: dict[str, Any]) -> dict[str, Any]:
    from harness.config.checks import validate

    if table.get("kind") == "collective":
        return _summary(table, score_collectives(table))
    rows = []
    for name, overrides, world, published in table_rows(table):
        cfg = compose(overrides)
        est = estimate(cfg, validate(cfg, world, runs=False))
        predicted = predicted_value(table["metric"], cfg, est, world)
        rows.append({"name": name, "predicted": predicted, "published": published,
                     "error": predicted / published - 1, "world": world, "memory_verdict": est.get("memory_verdict"),
                     "breakdown_s": est.get("breakdown_s"), "command": "harness estimate " + " ".join(
                         shlex.quote(word) for word in [*overrides, f"parallel.world_size={world}"])})
    if is_relative(table):
        rows = relative_rows(rows, references(table))
    return _summary(table, rows)


def relative_rows(rows: list[dict[str, Any]], refs: dict[str, Optional[str]]) -> list[dict[str, Any]]:
    """Each row that names a reference as a ratio to that row, predicted and published alike: the error is how far
    the model's change between the two runs is from the measured change (in the metric's direction: on tokens/s or
    TFLOP/s, + keeps more of its speed). The reference rows are not scored; a row that is neither is a mistake in
    the table."""
    by_name = {r["name"]: r for r in rows}
    referenced = {ref for ref in refs.values() if ref}
    out = []
    for r in rows:
        reference = refs[r["name"]]
        if not reference:
            if r["name"] not in referenced:
                raise ValueError(f"row {r['name']} names no reference and is none: give it relative_to")
            continue
        ref = by_name[reference]  # references() checked that it is a reference row
        predicted, published = r["predicted"] / ref["predicted"], r["published"] / ref["published"]
        out.append({**r, "predicted": predicted, "published": published, "error": predicted / published - 1,
                    "predicted_level": r["predicted"], "published_level": r["published"],
                    "relative_to": {"name": reference, "predicted": ref["predicted"], "published": ref["published"]}})
    return out


def _summary(table: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        raise ValueError(f"table {table['id']}: no row is scored")
    errors = [abs(r["error"]) for r in rows]
    return {"id": table["id"], "label": table["label"], "source": table["source"], "software": table["software"],
            "system": table["system"], "metric": table["metric"], "relative": is_relative(table),
            "assumed": table.get("assumed"),
            "in_sample": table.get("in_sample", []),
            "rows": rows, "mean_abs_error": sum(errors) / len(errors), "max_abs_error": max(errors)}


def score_all(path: Path = RUNS) -> list[dict[str, Any]]:
    return [score_table(t) for t in yaml.safe_load(path.read_text())["tables"]]


def signed_error(metric: str, error: float) -> float:
    """A row's error as the user reads it: predicted over published speed (or bandwidth, or memory) minus one, so
    positive is predicted faster (or larger). A step-time row's error is turned around (half the time: +100%)."""
    return 1 / (1 + error) - 1 if metric == "step_time_s" else error


def summarize(scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each scored table in a line a prediction can quote: its label, system and accelerator, software, what it
    scores, its rows, the range of signed errors, the mean |error| (4 decimals: the file is compared exactly) and
    whether any of the model's inputs came from the table's own source (its `in_sample`), so a quote says so."""
    accelerators = {name: compose([f"system={name}"]).system.accelerator for name in {t["system"] for t in scored}}
    out = []
    for t in scored:
        errors = [signed_error(t["metric"], r["error"]) for r in t["rows"]]
        out.append({"id": t["id"], "label": t["label"], "system": t["system"],
                    "accelerator": accelerators[t["system"]], "software": t["software"],
                    "scores": scores(t), "rows": len(errors),
                    "low": round(min(errors), 4), "high": round(max(errors), 4),
                    "mean_abs_error": round(t["mean_abs_error"], 4), "in_sample": bool(t.get("in_sample"))})
    return out
