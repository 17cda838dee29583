"""`harness plan`: search every layout a job could use with the cost model, fast, and rank those that fit.

Axes: backend (or the one named), number of devices (whole nodes up to the budget `parallel.world_size`,
or exactly it with --exact), TP (dividing a node), PP (splitting the blocks), interleaved stages (backends
with an interleaved schedule), DP (dividing the global batch), micro-batch size (every divisor of the
per-replica batch), so gradient accumulation, ZeRO stage or FSDP sharding, sequence parallelism, activation
recomputation, FSDP CPU offload.

It stays fast by pruning what cannot win, and counts what it pruned and why:
- model states alone exceed the device (every micro-batch size and recompute of that layout);
- activations only grow with the micro-batch size, so the first size that fits no recompute ends the sizes;
- recompute only adds time, so per micro-batch size the least recompute that fits is kept, the rest are
  dominated; offload only adds time, so it is tried where nothing without it fits.
The cost model is the same one `harness estimate` runs (one Job per candidate, no config composition), and
every printed row is checked by `validate` exactly as `harness run` would check it; rows it refuses are dropped
and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import heapq
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf

from harness.config.checks import check_model, validate
from harness.config.checks.backends import hybrid_shard_divides
from harness.config.checks.parallel import check_context_parallel, check_tensor_parallel, micro_batches_refused
from harness.config.compose import HelpRequested, compose, split_command_args
from harness.config.schema import ParallelConfig
from harness.core.errors import ConfigError
from harness.core.layout import Layout
from harness.core.registry import (
    BACKENDS,
    CHECKPOINTING,
    pipeline_bubble,
    pipeline_split,
    resolve_pp_schedule,
)
from harness.costmodel.comm import collectives
from harness.costmodel.estimate import estimate, system_peak
from harness.costmodel.layout import Job, job_from_config
from harness.costmodel.memory import GB, memory_per_device, model_state_bytes
from harness.costmodel.software import software_for
from harness.costmodel.timing import hardware, micro_batch_compute_s, step_time
from harness.costmodel.track_record import not_applicable, track_record
from harness.models.config import GPTConfig
from harness.predict.estimate import planned_world_size, track_record_rows

VPP_CHOICES = (1, 2, 3, 4, 6, 8)
BATCH_TOKENS = 4 * 2**20
"""The global batch `plan` compares layouts at when train.global_batch_size is unset: 4M tokens, Llama 3's initial
pre-training batch (Dubey et al. 2024, section 3.4.1), in whole sequences."""


def composed(overrides: list[str]) -> tuple[list[str], Any, Optional[str]]:
    """The overrides, their config and, where the global batch was unset, the note saying which one is planned
    for (BATCH_TOKENS in whole sequences; the overrides then name it, so each row's command reproduces it)."""
    cfg = compose(overrides)
    if cfg.train.global_batch_size is not None:
        return overrides, cfg, None
    check_model(cfg.model)
    sequences = max(1, BATCH_TOKENS // cfg.model.seq_len)
    overrides = [*overrides, f"train.global_batch_size={sequences}"]
    note = (f"train.global_batch_size unset: planned at {sequences} sequences of {cfg.model.seq_len:,} tokens "
            f"(~{sequences * cfg.model.seq_len / 2**20:.0f}M tokens, Llama 3's initial batch); give "
            "train.global_batch_size to plan another")
    return overrides, compose(overrides), note


@functools.lru_cache(maxsize=None)
def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class Candidate:
    backend: str
    world: int
    tp: int
    pp: int
    vpp: int
    dp: int
    zero_stage: int
    sharding: Optional[str]
    sequence_parallel: bool
    offload: bool
    micro_batch_size: int
    activation_checkpointing: str
    cp: int = 1
    cp_kind: str = "ulysses"

    def change(self) -> dict[str, Any]:
        """The candidate as nested config overrides (what `_overrides` prints)."""
        backend: dict[str, Any] = {"name": self.backend}
        if self.sharding is not None:
            backend["sharding"] = self.sharding
        if self.offload:
            backend["offload"] = True
        parallel: dict[str, Any] = {"tp": self.tp, "pp": self.pp, "zero_stage": self.zero_stage}
        if self.vpp > 1:
            parallel["vpp"] = self.vpp
        if self.sequence_parallel:
            parallel["sequence_parallel"] = True
        if self.cp > 1:
            parallel.update(cp=self.cp, cp_kind=self.cp_kind)
        return {"backend": backend, "parallel": parallel,
                "train": {"micro_batch_size": self.micro_batch_size,
                          "activation_checkpointing": self.activation_checkpointing}}


def _splits_heads(model: GPTConfig, tp: int) -> bool:
    """Whether TP of `tp` splits the model's heads and FFN columns whole, as the run's own check requires."""
    try:
        check_tensor_parallel(model, tp)
    except ConfigError:
        return False
    return True


def _context_splits(model: GPTConfig, device: str, name: str, tp: int, pp: int,
                    budget: int) -> list[tuple[int, str]]:
    """(cp, kind) pairs backend `name` runs for this model: cp = 1, and each kind's sizes up to the budget that the
    run's own check (harness.config.checks.parallel.check_context_parallel) accepts, given the plain schema
    dataclass (thousands of checks: an OmegaConf node per check was a tenth of the whole search)."""
    out = [(1, "ulysses")]
    for kind in BACKENDS[name].context_parallel:
        for cp in (c for c in _divisors(budget // tp) if c > 1):
            try:
                check_context_parallel(name, model, ParallelConfig(tp=tp, pp=pp, cp=cp, cp_kind=kind), device)
            except ConfigError:
                continue
            out.append((cp, kind))
    return out


def _structures(cfg: Any, budget: int, backends: list[str], exact: bool) -> Iterator[dict[str, Any]]:
    """(backend, world, tp, pp, vpp, dp, cp, zero/sharding, sp, offload) without the micro-batch and recompute."""
    dpn, gbs, layers = cfg.system.devices_per_node, cfg.train.global_batch_size, cfg.model.n_layers
    device = cfg.system.device
    model = check_model(cfg.model)
    for name in backends:
        can = BACKENDS[name]
        tps = [t for t in _divisors(dpn) if t <= budget and _splits_heads(model, t)] if can.tensor_parallel else [1]
        most = layers + 2 if can.pipeline_implementation else layers  # DeepSpeed's stages each need a block
        pps = [p for p in range(1, min(budget, most) + 1) if pipeline_split(layers, p)] \
            if can.pipeline_parallel else [1]
        for tp, pp in ((t, p) for t in tps for p in pps):
            for cp, cp_kind in _context_splits(model, device, name, tp, pp, budget):
                for dp in _divisors(gbs):
                    world = tp * pp * dp * cp
                    if world > budget:
                        break
                    if exact and world != budget:
                        continue
                    if not exact and world % dpn and world > dpn and world != budget:
                        continue  # whole nodes, part of one node, or the whole budget
                    vpps = [v for v in VPP_CHOICES if v == 1 or (can.interleaved_pipeline and pp > 1
                                                                   and pipeline_split(layers, pp * v))]
                    stages = can.zero_stages if not can.shardings else (0,)
                    shardings = [s for s in can.shardings or (None,)  # hybrid_shard only where its group divides dp
                                 if s != "hybrid_shard" or hybrid_shard_divides(
                                     cfg.backend.hybrid_shard_group, dpn, dp * cp, tp)]
                    sps = (False, True) if tp > 1 else (False,)
                    offloads = (False, True) if can.shardings and tp == 1 and (pp == 1 or device == "cpu") \
                        else (False,)  # validate refuses offload with TP, and with PP on a GPU
                    for vpp in vpps:
                        for zero in stages:
                            for sharding in shardings:
                                for sp in sps:
                                    for offload in offloads:
                                        yield dict(backend=name, world=world, tp=tp, pp=pp, vpp=vpp, dp=dp,
                                                   zero_stage=zero, sharding=sharding, sequence_parallel=sp,
                                                   offload=offload, cp=cp, cp_kind=cp_kind)


MODES = tuple(CHECKPOINTING)
"""Recompute from least to most: the first that fits a micro-batch is kept."""


@dataclass
class Search:
    rows: list[dict[str, Any]]
    counts: Counter
    seconds: float


def search(cfg: Any, budget: int, backends: list[str], *, exact: bool = False, keep: int = 50) -> Search:
    """The candidates that fit and could be among the `keep` fastest or the fastest on their number of devices,
    each with its prediction; `counts` says what was evaluated and what was pruned why."""
    started = time.perf_counter()
    counts: Counter = Counter()
    gbs = cfg.train.global_batch_size
    if gbs is None:
        raise ConfigError("train.global_batch_size is unset: layouts are compared at one global batch; give it, "
                          "e.g. train.global_batch_size=16")
    memory = None if cfg.system.memory_gb is None else cfg.system.memory_gb * GB
    overhead = cfg.system.framework_overhead_gb * GB
    base_layout = Layout(world_size=1, tp=1, pp=1, dp=1, zero_stage=0, micro_batch_size=1, global_batch_size=gbs,
                         grad_accum=gbs)
    fields = {}  # each backend's Job as constructor arguments, varied per candidate below
    hws = {}  # each backend's hardware at the peak of the dtype it computes in (FSDP's param_dtype may differ)
    for name in backends:
        job = job_from_config(OmegaConf.merge(cfg, {"backend": {"name": name}}), base_layout)
        fields[name] = {f.name: getattr(job, f.name) for f in dataclasses.fields(Job)}
        peak = system_peak(cfg.system, job.precision)
        if peak.tflops is None:
            raise ConfigError(f"layouts are ranked by predicted time, and {peak.reason}")
        hws[name] = hardware(cfg.system, peak.tflops)
    tokens = gbs * cfg.model.seq_len
    rows: list[dict[str, Any]] = []
    best_at: dict[int, float] = {}  # fastest step found per number of devices
    fastest: list[float] = []  # the `keep` fastest steps, negated (a max-heap)
    fits_without_offload: set[tuple[Any, ...]] = set()
    states_fit: dict[tuple[Any, ...], bool] = {}
    for st in _structures(cfg, budget, backends, exact):
        counts["structures"] += 1
        twin = tuple(v for k, v in st.items() if k != "offload")
        if st["offload"] and twin in fits_without_offload:
            counts["dominated: offload where the layout fits without it"] += 1
            continue
        base, hw = fields[st["backend"]], hws[st["backend"]]
        schedule = resolve_pp_schedule(None, st["vpp"])
        micro_sizes = _divisors(gbs // st["dp"])
        if st["pp"] > 1 and "pp_schedule" in BACKENDS[st["backend"]].options:  # torch's schedule rules
            micro_sizes = [m for m in micro_sizes
                           if not micro_batches_refused(schedule, st["pp"], st["vpp"], gbs // (m * st["dp"]))]
        modes = len(MODES)
        common = dict(base, sharding=st["sharding"] or base["sharding"], offload=st["offload"], checkpoint_every_n=None,
                      sequence_parallel=st["sequence_parallel"], vpp=st["vpp"], pp_schedule=schedule,
                      cp_kind=st["cp_kind"])

        def job_for(micro: int, ckpt: str) -> Any:
            layout = Layout(st["world"], st["tp"], st["pp"], st["dp"], st["zero_stage"], micro, gbs,
                            gbs // (micro * st["dp"]), st["cp"])
            return Job(**{**common, "layout": layout, "checkpointing": ckpt})

        if memory is not None:
            # Model states do not depend on interleaving or sequence parallelism: one check for all of them.
            key = tuple(st[k] for k in ("backend", "world", "tp", "pp", "dp", "cp", "zero_stage", "sharding",
                                        "offload"))
            if key not in states_fit:
                job = job_for(1, "full")
                states_fit[key] = sum(model_state_bytes(job.params_per_rank, job).values()) + overhead <= memory
            if not states_fit[key]:
                counts["pruned: model states alone do not fit"] += len(micro_sizes) * modes
                continue
            counts["evaluated"] += 1
            if memory_per_device(job_for(1, "full"), overhead)["total"] > memory:
                counts["pruned: does not fit at micro-batch 1 with full recompute"] += len(micro_sizes) * modes
                continue
        least = 0  # activations grow with the micro-batch: less recompute than fitted a smaller one cannot fit
        for i, micro in enumerate(micro_sizes):
            kept = None
            counts["pruned: does not fit (less recompute than fitted a smaller micro-batch)"] += least
            for k in range(least, modes):
                ckpt = MODES[k]
                job = job_for(micro, ckpt)
                mem = memory_per_device(job, overhead)
                counts["evaluated"] += 1
                if memory is None or mem["total"] <= memory:
                    kept, least = (job, mem), k
                    counts["dominated: more recompute than fits"] += modes - k - 1
                    break
                counts["pruned: does not fit"] += 1
            if kept is None:
                counts["pruned: a larger micro-batch than fits"] += (len(micro_sizes) - i - 1) * modes
                break
            job, mem = kept
            fits_without_offload.add(twin)
            counts["fit"] += 1
            # No communication, no optimizer: a lower bound that skips what cannot be kept.
            bound = micro_batch_compute_s(job, hw) * job.micro_batches * (
                1 + pipeline_bubble(job.pp_schedule, st["pp"], st["vpp"], job.micro_batches))
            if bound >= best_at.get(st["world"], float("inf")) and len(fastest) == keep and bound >= -fastest[0]:
                counts["pruned: slower than kept layouts (compute alone)"] += 1
                continue
            timed = step_time(job, collectives(job), hw)
            if isinstance(timed, str):
                counts[f"untimed: {timed}"] += 1
                continue
            best_at[st["world"]] = min(best_at.get(st["world"], float("inf")), timed.step_s)
            heapq.heappush(fastest, -timed.step_s)
            if len(fastest) > keep:
                heapq.heappop(fastest)
            rows.append({**st, "micro_batch_size": micro, "activation_checkpointing": job.checkpointing,
                         "grad_accum": job.layout.grad_accum, "step_time_s": timed.step_s,
                         "tokens_per_s": tokens / timed.step_s, "memory_gb": mem["total"] / GB,
                         "devices": st["world"], "pp_schedule": job.pp_schedule if st["pp"] > 1 else None})
    rows.sort(key=lambda r: -r["tokens_per_s"])
    return Search(rows, counts, time.perf_counter() - started)


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both devices and step time (fewest devices first)."""
    front: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["devices"], r["step_time_s"])):
        if not front or r["step_time_s"] < front[-1]["step_time_s"]:
            if front and front[-1]["devices"] == r["devices"]:
                continue
            front.append(r)
    return front


def checked(cfg: Any, rows: list[dict[str, Any]], want: int, counts: Counter) -> list[dict[str, Any]]:
    """The first `want` rows `validate` accepts, each with the estimate `harness estimate` gives for it."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for r in rows:
        same = (r["devices"], round(r["step_time_s"], 9), round(r["memory_gb"], 6))
        if same in seen:  # differs only in what the cost model does not distinguish
            counts["not listed: same prediction as a listed layout"] += 1
            continue
        change = Candidate(**{f.name: r[f.name] for f in dataclasses.fields(Candidate)}).change()
        trial = OmegaConf.merge(cfg, change, {"parallel": {"world_size": r["world"]}})
        try:
            layout = validate(trial, r["world"])
        except ConfigError as error:
            counts[f"refused by validate: {error}"] += 1
            continue
        est = estimate(trial, layout)
        seen.add(same)
        out.append({**r, "change": change, "overrides": _overrides(change), "dp": layout.dp,
                    "mfu": est["mfu"], "tokens_per_s": est["tokens_per_s"], "step_time_s": est["step_time_s"],
                    "memory_gb": est["memory_per_device_bytes"]["total"] / GB,
                    "energy_j_per_step": est["energy_j_per_step"],
                    "goodput": est["checkpoint"].get("goodput_at_optimal")})
        if len(out) == want:
            break
    return out


def cp_explanation(cfg: Any, rows: list[dict[str, Any]], best: list[dict[str, Any]]) -> Optional[str]:
    """Why the best layout with context parallelism is listed, against the best without it: the same devices
    without cp would not fit (its memory, from `estimate`), or are slower by so much; None where no listed layout
    uses cp."""
    with_cp = next((r for r in best if r.get("cp", 1) > 1), None)
    if with_cp is None:
        return None
    cp, tokens = with_cp["cp"], cfg.model.seq_len
    head = (f"cp={cp} ({with_cp['cp_kind']}): each {tokens:,}-token sequence is split over {cp} devices, so each "
            f"holds 1/{cp} of its activations and does 1/{cp} of its attention, whose work grows with the square "
            f"of the sequence")
    without = [r for r in rows if r.get("cp", 1) == 1]
    if without:
        r = without[0]
        gain = with_cp["tokens_per_s"] / r["tokens_per_s"] - 1
        return (f"{head}; the best layout without it ({r['devices']} devices, {_layout_text(r)}) is predicted at "
                f"{r['tokens_per_s']:,.0f} tokens/s; this one at {with_cp['tokens_per_s']:,.0f} ({gain:+.0%})")
    change = Candidate(**{**{f.name: with_cp[f.name] for f in dataclasses.fields(Candidate)}, "cp": 1,
                          "dp": with_cp["dp"] * cp}).change()
    trial = OmegaConf.merge(cfg, change, {"parallel": {"world_size": with_cp["devices"]}})
    try:
        need = estimate(trial, validate(trial, with_cp["devices"]))["memory_per_device_bytes"]["total"] / GB
    except ConfigError:
        return f"{head}; no layout without context parallelism fits in {cfg.system.memory_gb:g} GB per device"
    return (f"{head}; no layout without it fits in {cfg.system.memory_gb:g} GB per device: the same "
            f"{with_cp['devices']} devices as data-parallel ranks would need {need:.0f} GB each, against "
            f"{with_cp['memory_gb']:.0f} GB with cp={cp}")


def _overrides(change: dict[str, Any]) -> str:
    """The layout as command-line overrides: `backend=<name>` selects the backend's whole config group (its
    defaults), as a user would type it, then the backend options the layout changes."""
    words = []
    for section, values in change.items():
        for key, value in values.items():
            if section == "backend" and key == "name":
                words.insert(0, f"backend={value}")
            else:
                words.append(f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(words)


def _job_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides a row's command repeats: the job (model, system, batch...), not the layout the
    row replaces, nor the world size (each row states its own)."""
    layout = ("backend", "backend.name", "backend.sharding", "backend.offload", "parallel.tp", "parallel.pp",
              "parallel.vpp", "parallel.zero_stage", "parallel.sequence_parallel", "parallel.world_size",
              "parallel.cp", "parallel.cp_kind",
              "train.micro_batch_size", "train.activation_checkpointing")
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+") not in layout]


USAGE = """usage: harness plan [overrides ...] [--json | --csv] [--top=N] [--exact] [--vary=system.KEY=V1,V2,...]

Search every layout the job could use with the cost model (backend, devices in whole nodes up to
parallel.world_size, TP, PP, interleaving, DP, micro-batch, ZeRO stage or FSDP sharding, sequence
parallelism, recompute, offload), list the best that fit by predicted tokens/s, and the Pareto front of
step time against devices. --exact: only parallel.world_size devices. Exit status 1 when none fits.
--vary: the best layout for each value of one system parameter (what faster hardware would buy).

  harness plan model=gpt-175b system=frontier parallel.world_size=3072 train.global_batch_size=1536
  harness plan model=gpt-1.3b backend=fsdp parallel.world_size=8 system=dgx-a100-80gb train.global_batch_size=64 \\
      --top=5 --csv
  harness plan model=gpt-13b system=dgx-h100 parallel.world_size=64 train.global_batch_size=512 \\
      --vary=system.nic_bw_gb_per_s=12.5,25,50,100"""


def plan_command(args: list[str]) -> int:
    """`harness plan <overrides> [--json|--csv] [--top=N] [--exact]`; exit 1 when no layout fits."""
    try:
        overrides, flags = split_command_args(args, {"--json": bool, "--csv": bool, "--top": int, "--exact": bool,
                                                     "--vary": str})
    except HelpRequested:
        print(USAGE)
        return 0
    if "--vary" in flags:
        return vary_command(overrides, flags["--vary"], "--exact" in flags, "--json" in flags)
    top = flags.get("--top", 10)
    if top < 1:
        raise ConfigError(f"--top={top}: must be at least 1 (layouts to list)")
    overrides, cfg, batch_note = composed(overrides)
    check_model(cfg.model)  # no layout mends the model's own shapes: say so, not "nothing fits"
    chose_backend = any(o.split("=", 1)[0] in ("backend", "backend.name") for o in overrides)
    backends = [cfg.backend.name] if chose_backend else list(BACKENDS)
    budget = planned_world_size(cfg)
    found = search(cfg, budget, backends, exact="--exact" in flags, keep=max(top, 50))
    best = checked(cfg, found.rows, top, found.counts)
    front = checked(cfg, pareto(found.rows), len(found.rows), found.counts)
    front = pareto(front)
    job = _job_overrides(overrides)
    for r in best + front:
        r["estimate_command"] = " ".join(["harness estimate", *job, f"parallel.world_size={r['devices']}",
                                          r["overrides"]])
        r["run_overrides"] = " ".join([*job, r["overrides"]])
        r["submit_command"] = " ".join([f"harness submit {cfg.system.name} tasks={r['devices']} --",
                                        *(o for o in r["run_overrides"].split() if not o.startswith("system="))])
    summary = {"budget_devices": budget, "layouts_fitting": found.counts["fit"], "search_seconds": found.seconds,
               "counts": dict(found.counts), "global_batch": batch_note,
               "context_parallel": cp_explanation(cfg, found.rows, best),
               "track_record": track_record(cfg.system, software_for(cfg).name),
               "track_record_reason": not_applicable(cfg.system)}
    if "--json" in flags:
        print(json.dumps({"search": summary, "best": best, "pareto": front}, indent=2, default=str))
    elif "--csv" in flags:
        print(_csv(best, front), end="")
    else:
        _print(best, front, cfg, budget, summary)
    if not best:
        print(f"harness: error: no layout of {cfg.model.name} on {'' if '--exact' in flags else 'up to '}{budget} "
              f"devices of system={cfg.system.name}: {why_none(found.counts, cfg)}", file=sys.stderr)
        return 1
    return 0


def vary_command(overrides: list[str], vary: str, exact: bool, as_json: bool) -> int:
    """`harness plan ... --vary=system.KEY=v1,v2,...`: the best layout and its time for each value of one
    hardware parameter (what a faster network, more memory or a faster GPU would buy)."""
    key, _, values = vary.partition("=")
    if not key.startswith("system.") or not values:
        raise ConfigError(f"--vary={vary}: give a system parameter and its values, e.g. "
                          "--vary=system.nic_bw_gb_per_s=25,50,100")
    rows = []
    for value in values.split(","):
        cfg = compose([*overrides, f"{key}={value}"])
        check_model(cfg.model)
        chose_backend = any(o.split("=", 1)[0] in ("backend", "backend.name") for o in overrides)
        found = search(cfg, planned_world_size(cfg), [cfg.backend.name] if chose_backend else list(BACKENDS),
                       exact=exact, keep=1)
        best = checked(cfg, found.rows, 1, found.counts)
        rows.append({"value": value, **(best[0] if best else {}), "why_none": None if best else
                     why_none(found.counts, cfg)})
    if as_json:
        print(json.dumps({"vary": key, "rows": rows}, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    first = next((r for r in rows if "step_time_s" in r), None)
    table = Table(title=f"the best layout as {key} varies", title_justify="left")
    for column in (key, "devices", "step s", "tokens/s", "MFU", "vs first", "layout"):
        table.add_column(column, justify="left" if column == "layout" else "right", overflow="fold")
    for r in rows:
        if "step_time_s" not in r:
            table.add_row(r["value"], "", "", "", "", "", f"none fits: {r['why_none']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        speedup = f"{first['step_time_s'] / r['step_time_s']:.2f}x" if first else ""
        table.add_row(r["value"], str(r["devices"]), f"{r['step_time_s']:.4g}", f"{r['tokens_per_s']:,.0f}", mfu,
                      speedup, _layout_text(r))
    Console().print(table)
    return 0


def why_none(counts: Counter, cfg: Any) -> str:
    """Why a search ranked nothing, from what it counted: nothing to search, the checks refused every layout
    that fits, the profile could time none, or none fits in memory."""
    gbs = cfg.train.global_batch_size
    if not counts["structures"]:
        return (f"no arrangement tp x pp x dp of these devices suits the job (dp must divide train.global_batch_size="
                f"{gbs}, tp the {cfg.system.devices_per_node} devices per node, pp the model's layers); give a global "
                "batch with more divisors, or other devices (parallel.world_size, without --exact)")
    refused = [k.split(": ", 1)[1] for k in counts if k.startswith("refused by validate: ")]
    untimed = [k.split(": ", 1)[1] for k in counts if k.startswith("untimed: ")]
    if counts["fit"] and refused and not untimed:
        return f"the {counts['fit']} layout(s) that fit were refused by the config checks (first: {refused[0]})"
    if counts["fit"] and untimed:
        return f"the profile cannot time the layouts that fit ({untimed[0]})"
    memory = cfg.system.memory_gb
    return (f"none fits in {memory:g} GB per device (model states, activations and buffers); give more devices "
            "(parallel.world_size), a smaller model or train.global_batch_size")


CSV_COLUMNS = ("set", "rank", "devices", "backend", "tp", "pp", "vpp", "dp", "cp", "cp_kind", "zero_stage", "sharding",
               "sequence_parallel", "offload", "micro_batch_size", "grad_accum", "activation_checkpointing",
               "step_time_s", "tokens_per_s", "mfu", "memory_gb", "energy_j_per_step", "goodput", "estimate_command",
               "submit_command")


def _csv(best: list[dict[str, Any]], front: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for name, rows in (("best", best), ("pareto", front)):
        for i, r in enumerate(rows, 1):
            writer.writerow({**r, "set": name, "rank": i})
    return out.getvalue()


def _layout_text(r: dict[str, Any]) -> str:
    parts = [r["backend"], f"tp{r['tp']}", f"pp{r['pp']}" + (f"×v{r['vpp']}" if r["vpp"] > 1 else ""), f"dp{r['dp']}"]
    if r.get("cp", 1) > 1:
        parts.append(f"cp{r['cp']} {r['cp_kind']}")
    parts.append(r["sharding"] if r["sharding"] else f"ZeRO-{r['zero_stage']}")
    if r["sequence_parallel"]:
        parts.append("SP")
    if r["offload"]:
        parts.append("offload")
    parts.append(f"micro {r['micro_batch_size']}×{r['grad_accum']} recompute {r['activation_checkpointing']}")
    return " ".join(parts)


def _print(best: list[dict[str, Any]], front: list[dict[str, Any]], cfg: Any, budget: int,
           summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, rows in ((f"{cfg.model.name} on up to {budget} × {cfg.system.name}: best layouts by predicted "
                         "tokens/s", best),
                        ("Pareto front: no other layout is faster on as few devices", front)):
        table = Table(title=title, title_justify="left")
        for column in ("#", "devices", "tokens/s", "step s", "MFU", "GB/dev", "MJ/step", "goodput", "layout"):
            table.add_column(column, justify="left" if column == "layout" else "right", overflow="fold")
        for i, r in enumerate(rows, 1):
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            table.add_row(str(i), str(r["devices"]), f"{r['tokens_per_s']:,.0f}", f"{r['step_time_s']:.4g}", mfu,
                          f"{r['memory_gb']:.1f}",
                          "n/a" if r["energy_j_per_step"] is None else f"{r['energy_j_per_step'] / 1e6:.3g}",
                          "n/a" if r.get("goodput") is None else f"{r['goodput']:.1%}", _layout_text(r))
        console.print(table)
    for key in ("global_batch", "context_parallel"):
        if summary.get(key):
            print(summary[key])
    print("The cost model against published runs on this system or its accelerator:")
    for quantity, spread, note in track_record_rows(summary["track_record"], cfg.system.name,
                                                    summary["track_record_reason"]):
        print(f"  {quantity}: {spread}, {note}")
    counts = summary["counts"]
    print(f"searched {counts.get('structures', 0):,} layouts × micro-batch × recompute in "
          f"{summary['search_seconds']:.2f} s: {summary['layouts_fitting']:,} fit; "
          + "; ".join(f"{k}: {v:,}" for k, v in sorted(counts.items()) if k not in ("structures", "evaluated", "fit")))
    # Whole lines, never cut to the terminal: pasted, each reproduces its row.
    print("\nEach row's commands (`harness run` needs the row's devices as ranks: launcher.nproc, or a scheduler's "
          "tasks; `harness submit` needs the system's job: block):")
    for i, r in enumerate(best, 1):
        print(f"  #{i}: {r['estimate_command']}\n       harness run {r['run_overrides']}\n       {r['submit_command']}")
