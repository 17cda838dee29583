"""`harness search`: measure the layouts the cost model ranks best, and search on from there, as the Frontier study
searched its 175B and 1T layouts (Dash et al. 2023, with DeepHyper), here with Optuna's TPE sampler.

1. The planner (plan.py) lists every layout that fits on up to the device budget, each with its prediction.
2. The first `search.seeds` trials run the best-predicted layouts; after that the sampler proposes values for
   each axis (devices, backend, TP, PP, micro-batch, ZeRO stage or sharding, recompute, ...), and the trial runs
   the legal layout nearest to the proposal (most axes equal, then the best prediction) that was not measured yet:
   the sampler's proposal is told as pruned, the layout actually run as a trial of its own.
3. Each trial is a real `harness run` into its own run directory, on this host's ranks or, with
   `search.launcher=slurm`, as a Slurm job (hydra/launcher=slurm). A trial that fails or runs out of memory is
   recorded with its status and the search goes on.
Output in `search.dir`: search.json (every trial: layout, run directory, status, measured and predicted tokens/s
and the error; the trajectory of the best so far; the best layout with its `harness run`/`harness submit` line;
parameter importance) and trajectory.png.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from harness.core.errors import ConfigError

AXES = ("devices", "backend", "tp", "pp", "vpp", "micro_batch_size", "zero_stage", "sharding", "sequence_parallel",
        "offload", "activation_checkpointing")
"""What the sampler chooses: the planner's row keys that make a layout."""

USAGE = """usage: harness search [overrides ...]

Rank every layout with the cost model (as `harness plan`), run the best-ranked for real, then let Optuna's TPE
sampler propose more; write the trials, the trajectory, the best layout and predicted vs measured per trial.
The system profile must time layouts: on a CPU the host is calibrated on first use (as `harness run` does), or
give a profile from `harness calibrate launcher.nproc=4`.

  harness search system=cpu-calibrated model=gpt-tiny launcher.nproc=4 search.trials=6
  harness search system=frontier model=gpt-22b parallel.world_size=128 search.launcher=slurm search.trials=20

  search.trials (6)  search.seeds (3)  search.launcher (this host | slurm | local)  search.dir  search.seed"""


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[a] for a in AXES)


def _label(value: Any) -> Any:
    """Optuna's categorical choices are None, bool, int, float or str."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def candidates(cfg: Any, budget: int, backends: list[str]) -> list[dict[str, Any]]:
    """Every layout that fits on up to `budget` devices, best prediction first (the planner, unpruned)."""
    from harness.predict.plan import search as plan_search

    found = plan_search(cfg, budget, backends, keep=10**9)
    if not found.rows:
        raise ConfigError(f"harness search: no layout of {cfg.model.name} on up to {budget} devices of "
                          f"system={cfg.system.name} fits and can be timed ({dict(found.counts)})")
    return found.rows


def nearest(proposal: dict[str, Any], rows: list[dict[str, Any]], done: set[tuple[Any, ...]]) -> Optional[dict]:
    """The unmeasured legal layout with the most axes equal to the proposal; ties go to the better prediction
    (rows are best-first)."""
    best, score = None, -1
    for row in rows:
        if _key(row) in done:
            continue
        same = sum(_label(row[a]) == proposal.get(a) for a in AXES)
        if same > score:
            best, score = row, same
    return best


def run_trial(cfg: Any, job: list[str], row: dict[str, Any], trial_dir: Path) -> dict[str, Any]:
    """`harness run` of one layout (a row `checked` accepted, with its overrides) into `trial_dir`; its summary's
    status, measured and predicted tokens/s."""
    layout = row["overrides"].split()
    launcher = cfg.search.launcher
    if launcher:
        args = ["run", "-m", f"hydra/launcher={launcher}", *job, *layout, f"launcher.nproc={row['devices']}",
                f"hydra.sweep.dir={trial_dir}"]
    else:
        args = ["run", *job, *layout, f"launcher.nproc={row['devices']}", f"hydra.run.dir={trial_dir}"]
    done = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True)
    summaries = sorted(trial_dir.glob("**/summary.json"))
    out: dict[str, Any] = {"layout": " ".join(layout), "command": "harness " + " ".join(args),
                           "predicted_tokens_per_s": row["tokens_per_s"], "prediction_error": None}
    if not summaries:
        out.update(status="failed", run_dir=str(trial_dir), measured_tokens_per_s=None,
                   error=(done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
        return out
    summary = json.loads(summaries[0].read_text())
    metrics, prediction = summary.get("metrics") or {}, summary.get("prediction") or {}
    measured = metrics.get("tokens_per_s") if summary.get("status") == "ok" else None
    predicted = prediction.get("tokens_per_s", row["tokens_per_s"])
    out.update(status=summary.get("status"), run_dir=str(summaries[0].parent), measured_tokens_per_s=measured,
               predicted_tokens_per_s=predicted, error=summary.get("error"),
               prediction_error=None if measured is None or not predicted else predicted / measured - 1)
    return out


def search(cfg: Any, overrides: list[str], budget: int, backends: list[str]) -> dict[str, Any]:
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from harness.predict.plan import _job_overrides, checked

    rows = candidates(cfg, budget, backends)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {a: CategoricalDistribution(sorted({_label(r[a]) for r in rows}, key=repr)) for a in AXES}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.search.seed),
                                study_name=f"harness-search-{cfg.model.name}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    root = Path(cfg.search.dir or f"results/searches/{stamp}-{cfg.model.name}")
    root.mkdir(parents=True, exist_ok=True)
    job = [o for o in _job_overrides(overrides) if not o.startswith(("search.", "launcher.nproc="))]
    trials: list[dict[str, Any]] = []
    done: set[tuple[Any, ...]] = set()
    refused: Counter = Counter()

    def legal(row: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Mark `row` as tried; the row with its overrides when `validate` accepts it as `harness run` would (the
        planner does not check every rule, e.g. a pipeline schedule's micro-batch count), else None."""
        done.add(_key(row))
        accepted = checked(cfg, [row], 1, refused)
        return accepted[0] if accepted else None

    for n in range(cfg.search.trials):
        row: Optional[dict[str, Any]] = None
        if n < cfg.search.seeds:
            row = next((ok for r in rows if _key(r) not in done and (ok := legal(r))), None)
            source = "cost model"
        else:
            source = "sampler"
            while True:
                asked = study.ask(space)
                proposal = nearest(asked.params, rows, done)
                study.tell(asked, state=TrialState.PRUNED)  # the proposal itself; the layout run is its own trial
                if proposal is None or (row := legal(proposal)) is not None:
                    break
        if row is None:
            break
        print(f"harness search: trial {n} of {cfg.search.trials} ({source}): {row['devices']} devices, predicted "
              f"{row['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
        result = run_trial(cfg, job, row, root / f"trial-{n}")
        params = {a: _label(row[a]) for a in AXES}
        value = result["measured_tokens_per_s"]
        study.add_trial(create_trial(params=params, distributions=space, value=value,
                                     state=TrialState.COMPLETE if value is not None else TrialState.FAIL))
        trials.append({"trial": n, "source": source, **params, "dp": row["dp"], "grad_accum": row["grad_accum"],
                       **result})
        print(f"harness search: trial {n}: {result['status']}, measured "
              f"{'n/a' if value is None else f'{value:,.0f}'} tokens/s ({result['run_dir']})", file=sys.stderr)
    best_so_far, trajectory = None, []
    for t in trials:
        value = t["measured_tokens_per_s"]
        if value is not None and (best_so_far is None or value > best_so_far):
            best_so_far = value
        trajectory.append({"trial": t["trial"], "best_tokens_per_s": best_so_far})
    measured = [t for t in trials if t["measured_tokens_per_s"] is not None]
    best = max(measured, key=lambda t: t["measured_tokens_per_s"]) if measured else None
    result = {"budget_devices": budget, "method": "optuna TPE", "candidates": len(rows),
              "refused_by_validate": dict(refused), "trials": trials,
              "trajectory": trajectory, "best": _best(best, cfg, job), "importance": _importance(study),
              "dir": str(root)}
    (root / "search.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _plot(trajectory, trials, root / "trajectory.png")
    return result


def _best(best: Optional[dict[str, Any]], cfg: Any, job: list[str]) -> Optional[dict[str, Any]]:
    if best is None:
        return None
    run = " ".join(["harness run", *job, best["layout"], f"launcher.nproc={best['devices']}"])
    submit = " ".join([f"harness submit {cfg.system.name} tasks={best['devices']} --",
                       *(o for o in [*job, *best["layout"].split()] if not o.startswith("system="))])
    return {**{k: best[k] for k in ("trial", "devices", "layout", "run_dir", "measured_tokens_per_s",
                                    "predicted_tokens_per_s")}, "run_command": run, "submit_command": submit}


MIN_IMPORTANCE_TRIALS = 4
"""Fewer finished trials than this make fANOVA's importance noise: none is reported, with the reason."""


def _importance(study: Any) -> dict[str, Any]:
    """Optuna's fANOVA importance of each axis for the measured throughput, or why there is none."""
    import optuna

    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(finished) < MIN_IMPORTANCE_TRIALS:
        return {"values": None, "reason": f"{len(finished)} finished trial(s); fANOVA's importance needs "
                                          f"{MIN_IMPORTANCE_TRIALS} or more"}
    try:
        values = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:
        return {"values": None, "reason": f"{type(exc).__name__}: {exc}"}
    return {"values": values} if values else {"values": None, "reason": "no axis varied among the finished trials"}


def _plot(trajectory: list[dict[str, Any]], trials: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [t["trial"] for t in trials]
    ax.scatter(xs, [t["measured_tokens_per_s"] or 0 for t in trials], label="measured (0: failed)", color="C0")
    ax.scatter(xs, [t["predicted_tokens_per_s"] or 0 for t in trials], label="predicted", color="C1", marker="x")
    ax.step([p["trial"] for p in trajectory], [p["best_tokens_per_s"] or 0 for p in trajectory], where="post",
            label="best so far", color="C2")
    ax.set_xlabel("trial")
    ax.set_ylabel("tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search_command(args: list[str]) -> int:
    """`harness search <overrides>`: exit 1 when no trial finished."""
    from harness.config.checks.common import choice
    from harness.config.compose import HelpRequested, compose, split_command_args
    from harness.predict.estimate import planned_world_size

    try:
        overrides, _ = split_command_args(args, {})
    except HelpRequested:
        print(USAGE)
        return 0
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("harness search needs Optuna (optuna>=4): pip install -e '.[search]' in the harness "
                          "checkout") from None
    cfg = compose(overrides)
    choice(cfg.search.method, ("optuna",), "search.method")
    if cfg.search.trials < 1 or cfg.search.seeds < 0:
        raise ConfigError(f"search.trials={cfg.search.trials} search.seeds={cfg.search.seeds}: give at least 1 trial "
                          "and 0 or more seeds")
    if cfg.search.launcher not in (None, "slurm", "local"):
        raise ConfigError(f"search.launcher={cfg.search.launcher}: unknown; leave it unset (this host's ranks), "
                          "or give slurm or local")
    from harness.core.registry import BACKENDS

    chose_backend = any(o.split("=", 1)[0] in ("backend", "backend.name") for o in overrides)
    result = search(cfg, overrides, planned_world_size(cfg), [cfg.backend.name] if chose_backend else list(BACKENDS))
    _print(result)
    return 0 if result["best"] else 1


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from harness.predict.plan import _layout_text

    table = Table(title=f"harness search: {len(result['trials'])} trials of {result['candidates']} layouts that fit "
                        f"on up to {result['budget_devices']} devices", title_justify="left")
    for column in ("#", "from", "status", "measured tok/s", "predicted tok/s", "error", "best so far", "layout"):
        table.add_column(column, justify="left" if column in ("from", "status", "layout") else "right",
                         overflow="fold")
    for t, step in zip(result["trials"], result["trajectory"]):
        fmt = (lambda v: "n/a" if v is None else f"{v:,.0f}")  # noqa: E731
        error = "n/a" if t.get("prediction_error") is None else f"{t['prediction_error']:+.0%}"
        table.add_row(str(t["trial"]), t["source"], str(t["status"]), fmt(t["measured_tokens_per_s"]),
                      fmt(t["predicted_tokens_per_s"]), error, fmt(step["best_tokens_per_s"]),
                      f"{t['devices']} devices: {_layout_text(t)}")
    Console().print(table)
    importance = result["importance"]
    if importance["values"]:
        print("parameter importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importance["values"].items()))
    else:
        print(f"parameter importance: n/a ({importance['reason']})")
    best = result["best"]
    if best:
        print(f"best: trial {best['trial']}, {best['measured_tokens_per_s']:,.0f} tokens/s measured\n"
              f"  {best['run_command']}\n  {best['submit_command']}")
    print(f"written: {result['dir']}/search.json, trajectory.png")
