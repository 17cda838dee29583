"""`harness plan`: run the cost model over the layouts a job could use and rank those that fit by throughput.

The search space is every backend (or the one named with `backend=`/`backend.name=`), every TP
size that fits in a node and divides the ranks, every PP size that divides the
remaining ranks, ZeRO stages the backend supports, micro-batch sizes 1..8 and the three
checkpointing policies. Layouts `validate` refuses are skipped, exactly as `run` would refuse them.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

from omegaconf import OmegaConf

from harness.backends.registry import BACKENDS
from harness.config.checks import CHECKPOINTING, validate
from harness.config.compose import HelpRequested, compose, split_command_args
from harness.config.errors import ConfigError
from harness.costmodel.estimate import estimate
from harness.predict.estimate import planned_world_size

MICRO_BATCHES = (1, 2, 4, 8)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: Any, world: int, backends: list[str]) -> list[dict[str, Any]]:
    """Override sets (as nested dicts) to try; `validate` decides which are legal."""
    out = []
    tps = [t for t in _divisors(world) if t <= cfg.system.devices_per_node]
    for backend in backends:
        can = BACKENDS[backend]
        for tp, pp, zero, micro, ckpt in itertools.product(
                tps if can.tensor_parallel else [1], _divisors(world) if can.pipeline_parallel else [1],
                can.zero_stages, MICRO_BATCHES, CHECKPOINTING):
            out.append({"backend": {"name": backend}, "parallel": {"tp": tp, "pp": pp, "zero_stage": zero},
                        "train": {"micro_batch_size": micro, "activation_checkpointing": ckpt}})
    return out


def plan(cfg: Any, world: int, backends: list[str]) -> list[dict[str, Any]]:
    """Every legal candidate that fits, best tokens/s first."""
    ranked = []
    for change in candidates(cfg, world, backends):
        trial = OmegaConf.merge(cfg, change)
        try:
            layout = validate(trial, world)
        except ConfigError:
            continue
        est = estimate(trial, layout)
        if est["fits"] is False or est["tokens_per_s"] is None:
            continue
        ranked.append({"backend": change["backend"]["name"], **change["parallel"], "dp": layout.dp,
                       **change["train"], "grad_accum": layout.grad_accum, "tokens_per_s": est["tokens_per_s"],
                       "step_time_s": est["step_time_s"], "mfu": est["mfu"],
                       "memory_gb": est["memory_per_device_bytes"]["total"] / 1e9,
                       "overrides": _overrides(change)})
    return sorted(ranked, key=lambda r: -r["tokens_per_s"])


def _overrides(change: dict[str, Any]) -> str:
    """The layout as command-line overrides: `backend=<name>` selects the backend's whole config group (its
    defaults), as a user would type it; `backend.name=` would keep the other backend's options."""
    return " ".join(f"backend={values['name']}" if section == "backend" else f"{section}.{key}={value}"
                    for section, values in change.items() for key, value in values.items()
                    if section != "backend" or key == "name")


def _job_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides a row's command repeats: the job (model, system, batch...), not the layout the
    row replaces, nor the world size (`run` counts its ranks; `estimate` needs it, so it stays for that)."""
    layout = ("backend", "backend.name", "parallel.tp", "parallel.pp", "parallel.zero_stage",
              "train.micro_batch_size", "train.activation_checkpointing")
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+") not in layout]


USAGE = """usage: harness plan [overrides ...] [--json] [--top=N]

Run the cost model over every layout the job could use (backends, TP, PP, ZeRO stage, micro-batch,
checkpointing) and list those that fit, best predicted tokens/s first. Exit status 1 when none fits.

  harness plan model=gpt-13b system=dgx-a100-80gb parallel.world_size=64 train.global_batch_size=512
  harness plan model=gpt-1.3b backend=fsdp parallel.world_size=8 system=dgx-a100-80gb --top=5"""


def plan_command(args: list[str]) -> int:
    """`harness plan <overrides> [--json] [--top=N]`; exit 1 when no layout fits."""
    try:
        overrides, flags = split_command_args(args, {"--json": bool, "--top": int})
    except HelpRequested:
        print(USAGE)
        return 0
    top = flags.get("--top", 10)
    if top < 1:
        raise ConfigError(f"--top={top}: must be at least 1 (layouts to list)")
    cfg = compose(overrides)
    chose_backend = any(o.split("=", 1)[0] in ("backend", "backend.name") for o in overrides)
    backends = [cfg.backend.name] if chose_backend else list(BACKENDS)
    world = planned_world_size(cfg)
    ranked = plan(cfg, world, backends)
    job = _job_overrides(overrides)
    for r in ranked:
        r["estimate_command"] = " ".join(["harness estimate", *job, r["overrides"]])
        r["run_overrides"] = " ".join([*(o for o in job if not o.startswith("parallel.world_size=")), r["overrides"]])
        r["submit_command"] = " ".join([f"harness submit {cfg.system.name} tasks={world} --",
                                        *(o for o in r["run_overrides"].split() if not o.startswith("system="))])
    if "--json" in flags:
        print(json.dumps(ranked[:top], indent=2))
    else:
        _print(ranked[:top], cfg, world)
    if not ranked:
        print(f"harness: error: no layout of {cfg.model.name} on {world} devices of system={cfg.system.name} "
              "fits in device memory (or the profile cannot time it)", file=sys.stderr)
        return 1
    return 0


def _print(ranked: list[dict[str, Any]], cfg: Any, world: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cfg.model.name} on {world} × {cfg.system.name}: best layouts by predicted tokens/s",
                  title_justify="left")
    for column in ("#", "tokens/s", "step s", "MFU", "GB/dev", "layout"):
        table.add_column(column, justify="left" if column == "layout" else "right", overflow="fold")
    for i, r in enumerate(ranked, 1):
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        layout = (f"{r['backend']} tp{r['tp']} pp{r['pp']} dp{r['dp']} ZeRO-{r['zero_stage']} "
                  f"micro {r['micro_batch_size']}×{r['grad_accum']} recompute {r['activation_checkpointing']}")
        table.add_row(str(i), f"{r['tokens_per_s']:,.0f}", f"{r['step_time_s']:.4g}", mfu, f"{r['memory_gb']:.1f}",
                      layout)
    console = Console()
    console.print(table)
    # Whole lines, never cut to the terminal: pasted, each reproduces its row.
    print(f"\nEach row's commands (`harness run` needs {world} ranks: launcher.nproc, or a scheduler's tasks; "
          "`harness submit` needs the system's job: block):")
    for i, r in enumerate(ranked, 1):
        print(f"  #{i}: {r['estimate_command']}\n       harness run {r['run_overrides']}\n       {r['submit_command']}")
