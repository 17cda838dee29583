"""Batch job scripts for real sites, rendered from `scripts/` with a system's `job:` block.

A template is a working job script (it passes shellcheck and can be submitted by hand): its
scheduler directives carry defaults, and a few plain shell assignments (`ranks=`, `results_dir=`,
`overrides=(...)`) are what `harness submit` fills in. Rendering rewrites exactly those lines, so the
printed script is the site's own idiom with the user's values in it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SUBMIT = {"slurm": "sbatch", "pbs": "qsub", "lsf": "bsub"}
DIRECTIVE = {"slurm": "#SBATCH", "pbs": "#PBS", "lsf": "#BSUB"}
"""How each scheduler takes a script: `sbatch FILE`, `qsub FILE`, `bsub < FILE`."""

# Per scheduler and parameter: the directive line to rewrite, with the value as group "v".
_DIRECTIVES: dict[str, dict[str, str]] = {
    "slurm": {"account": r"^#SBATCH --account=(?P<v>\S*)$", "nodes": r"^#SBATCH --nodes=(?P<v>\S*)$",
              "walltime": r"^#SBATCH --time=(?P<v>\S*)$", "queue": r"^#SBATCH --(?:partition|qos)=(?P<v>\S*)$",
              "name": r"^#SBATCH --job-name=(?P<v>\S*)$", "tasks": r"^#SBATCH --ntasks=(?P<v>\S*)$"},
    "pbs": {"account": r"^#PBS -A (?P<v>\S*)$", "nodes": r"^#PBS -l select=(?P<v>\d+)",
            "walltime": r"^#PBS -l walltime=(?P<v>\S*)$", "queue": r"^#PBS -q (?P<v>\S*)$",
            "name": r"^#PBS -N (?P<v>\S*)$"},
    "lsf": {"account": r"^#BSUB -P (?P<v>\S*)$", "nodes": r"^#BSUB -nnodes (?P<v>\S*)$",
            "walltime": r"^#BSUB -W (?P<v>\S*)$", "queue": r"^#BSUB -q (?P<v>\S*)$",
            "name": r"^#BSUB -J (?P<v>\S*)$"},
}

# Directives a template may leave out (a generic cluster may need no account or queue): added when asked for.
_NEW_DIRECTIVE = {
    "slurm": {"account": "#SBATCH --account={}", "queue": "#SBATCH --partition={}"},
    "pbs": {"account": "#PBS -A {}", "queue": "#PBS -q {}"},
    "lsf": {"account": "#BSUB -P {}", "queue": "#BSUB -q {}"},
}

PARAMS = ("account", "nodes", "walltime", "queue", "tasks", "results", "name")
"""What `harness submit <site> key=value ...` accepts."""


class SubmitError(ValueError):
    """A job that cannot be submitted as asked; one line naming the parameter and the fix."""


@dataclass
class JobRequest:
    """One job: the site's scheduler and template, and what the user asked for."""

    site: str
    scheduler: str
    script: Path
    ranks_per_node: int
    account: Optional[str] = None
    nodes: int = 1
    walltime: str = "00:30:00"
    queue: Optional[str] = None
    tasks: Optional[int] = None
    results: Optional[str] = None
    name: str = "harness"
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def total_tasks(self) -> int:
        return self.tasks if self.tasks is not None else self.nodes * self.ranks_per_node


def check(request: JobRequest, account_required: bool) -> None:
    """Refuse what the scheduler would refuse (or silently shrink) before anything is submitted."""
    site = request.site
    if request.scheduler not in SUBMIT:
        raise SubmitError(f"{site}: job.scheduler={request.scheduler} is not one of {', '.join(SUBMIT)}")
    if account_required and not request.account:
        raise SubmitError(f"{site}: account= is required (the allocation to charge, e.g. account=abc123)")
    if request.nodes < 1:
        raise SubmitError(f"nodes={request.nodes}: must be at least 1")
    if not re.fullmatch(r"\d+:\d\d:\d\d", request.walltime):
        raise SubmitError(f"walltime={request.walltime}: use HH:MM:SS, e.g. walltime=00:30:00")
    capacity = request.nodes * request.ranks_per_node
    if request.tasks is not None and not 1 <= request.tasks <= capacity:
        raise SubmitError(
            f"tasks={request.tasks} does not fit nodes={request.nodes} x {request.ranks_per_node} ranks per node "
            f"on {site} = {capacity}; use nodes={-(-request.tasks // request.ranks_per_node)} or fewer tasks"
        )


def _minutes(walltime: str) -> int:
    hours, minutes, seconds = (int(x) for x in walltime.split(":"))
    return hours * 60 + minutes + (seconds > 0)


def _directive_values(request: JobRequest) -> dict[str, str]:
    minutes = _minutes(request.walltime)
    values = {"nodes": str(request.nodes), "name": request.name,
              "walltime": f"{minutes // 60}:{minutes % 60:02d}" if request.scheduler == "lsf" else request.walltime}
    if request.account:
        values["account"] = request.account
    if request.queue:
        values["queue"] = request.queue
    return values


def _set(text: str, pattern: str, value: str) -> Optional[str]:
    """`text` with the value (group "v") of the first line matching `pattern` replaced; None if no line matches."""
    match = re.search(pattern, text, flags=re.MULTILINE)
    if match is None:
        return None
    return text[: match.start("v")] + value + text[match.end("v"):]


def render(request: JobRequest) -> str:
    """The template with the request's directives, rank counts, result path and overrides filled in."""
    text = request.script.read_text()
    directives = _DIRECTIVES[request.scheduler]

    def must_set(pattern: str, value: str, what: str) -> str:
        rendered = _set(text, pattern, value)
        if rendered is None:
            raise SubmitError(f"{request.script} has no line for {what}; it cannot be rendered")
        return rendered

    for key, value in _directive_values(request).items():
        if key in _NEW_DIRECTIVE[request.scheduler] and not re.search(directives[key], text, flags=re.MULTILINE):
            last = list(re.finditer(rf"^{re.escape(DIRECTIVE[request.scheduler])} .*$", text, flags=re.MULTILINE))[-1]
            line = _NEW_DIRECTIVE[request.scheduler][key].format(value)
            text = text[: last.end()] + "\n" + line + text[last.end():]
        else:
            text = must_set(directives[key], value, key)
    assignments = {"ranks_per_node": str(request.ranks_per_node), "walltime_min": str(_minutes(request.walltime))}
    if request.results:
        assignments["results_dir"] = shlex.quote(request.results)
    for name, value in assignments.items():
        text = _set(text, rf"^{name}=(?P<v>.*)$", value) or text
    # Generic Slurm asks for its tasks in a directive; site templates count ranks in `ranks=` (empty: all).
    if re.search(directives.get("tasks", "(?!)"), text, flags=re.MULTILINE):
        text = must_set(directives["tasks"], str(request.total_tasks), "tasks")
    elif request.tasks is not None:
        text = must_set(r"^ranks=(?P<v>.*)$", str(request.tasks), "ranks=")
    match = re.search(r"^overrides=\((?P<v>.*)\)$", text, flags=re.MULTILINE)
    if match is None:
        raise SubmitError(f"{request.script} has no overrides=(...) line; it cannot be rendered")
    words = [*shlex.split(match.group("v")), *request.overrides]
    text = text[: match.start("v")] + " ".join(shlex.quote(w) for w in words) + text[match.end("v"):]
    end = text.index("\n", match.start()) + 1
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in request.env.items())
    return text[:end] + exports + text[end:]


def submit_command(scheduler: str, path: Path) -> str:
    """The shell command that submits a rendered script."""
    return f"bsub < {shlex.quote(str(path))}" if scheduler == "lsf" else f"{SUBMIT[scheduler]} {shlex.quote(str(path))}"
