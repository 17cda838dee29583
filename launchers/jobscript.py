"""Batch job scripts for real sites, rendered from `scripts/` with a system's `job:` block.

A template is a working job script (it passes shellcheck and can be submitted by hand): its
scheduler directives carry defaults, and a few plain shell assignments (`ranks=`, `results_dir=`,
`overrides=(...)`) are what `harness submit` fills in. Rendering rewrites exactly those lines, so the
printed script is the site's own idiom with the user's values in it.

Every value is checked before it lands (check_values): what goes into a directive line is a plain word by the
schedulers' rules, what goes into a shell line is quoted, and nothing carries a newline or control character.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Optional

from harness import DISTRIBUTION

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

MAX_COUNT = 9_999_999
"""Largest nodes= or tasks=: more than any machine has, and short enough for int() to take."""

# Job names, accounts and queues land in directive lines (#SBATCH, #PBS, #BSUB), which the scheduler reads
# literally and no shell quoting protects: so they are words that Slurm, PBS and LSF all take as they are.
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WORD_MAX = 64
_PBS_QUEUE_MAX = 15  # PBS_MAXQUEUENAME in PBS's pbs_ifl.h
_EXAMPLE = {"name": "harness", "account": "abc123", "queue": "debug"}
# results= is a directory the job creates: a path, quoted where it lands and so taken literally (no ~ or $VAR),
# of what Hydra reads unquoted in the job's `hydra.run.dir=$run_dir` (a comma would make that a sweep).
_PATH = re.compile(r"[A-Za-z0-9._+/][A-Za-z0-9 ._+/-]*")
_PATH_MAX = 1024
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_CHECKOUT = Path(__file__).resolve().parent.parent
"""The project root, when running from a source checkout (or an editable install)."""
_INSTALLED = PurePosixPath("share/harness")
"""Where a wheel puts the templates, under its install prefix (pyproject.toml's data-files)."""


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


def printable(text: str) -> str:
    """`text` with every unprintable character escaped (\\n, \\x1b, \\u202e), so an error quoting it stays one line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _show(value: str, limit: int = 80) -> str:
    """A user's value as an error message quotes it: escaped, and cut when long."""
    shown = printable(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def parse_count(key: str, text: str) -> int:
    """`nodes=` or `tasks=` as a number: ASCII digits only, since int() also takes ' 2', '+2', '2_0' and '٢'."""
    if not re.fullmatch(r"[0-9]{1,7}", text):  # MAX_COUNT's 7 digits
        raise SubmitError(f"{key}={_show(text)}: must be a whole number from 1 to {MAX_COUNT}, e.g. {key}=2")
    return int(text)


def check(request: JobRequest, account_required: bool) -> None:
    """Refuse what the scheduler would refuse (or silently shrink) before anything is submitted."""
    site = request.site
    check_values(request)
    if account_required and request.account is None:
        raise SubmitError(f"{site}: account= is required (the allocation to charge, e.g. account=abc123)")
    capacity = request.nodes * request.ranks_per_node
    if request.tasks is not None and request.tasks > capacity:
        raise SubmitError(
            f"tasks={request.tasks} does not fit nodes={request.nodes} x {request.ranks_per_node} ranks per node "
            f"on {site} = {capacity}; use nodes={-(-request.tasks // request.ranks_per_node)} or fewer tasks"
        )


def check_values(request: JobRequest) -> None:
    """Refuse any value that could not land in the script as exactly one word of its own line.

    Names go into directive lines unquoted, so they are held to the schedulers' own rules; paths, overrides and
    env values are shell-quoted, so they only have to be one line. Nothing with a newline or another control
    character is rendered: a newline would start a command of its own.
    """
    site = request.site
    if request.scheduler not in SUBMIT:
        raise SubmitError(f"{site}: job.scheduler={_show(request.scheduler)} is not one of {', '.join(SUBMIT)}")
    if request.ranks_per_node < 1:
        raise SubmitError(f"{site}: job.ranks_per_node={request.ranks_per_node} must be at least 1, "
                          "e.g. job.ranks_per_node=8")
    _check_word("name", request.name, _WORD_MAX)
    if request.account is not None:
        _check_word("account", request.account, _WORD_MAX)
    if request.queue is not None:
        _check_word("queue", request.queue, _PBS_QUEUE_MAX if request.scheduler == "pbs" else _WORD_MAX)
    _check_walltime(request.walltime)
    if request.nodes < 1:
        raise SubmitError(f"nodes={request.nodes}: must be at least 1, e.g. nodes=1")
    capacity = request.nodes * request.ranks_per_node
    if request.tasks is not None and request.tasks < 1:
        raise SubmitError(f"tasks={request.tasks}: must be at least 1; leave tasks= out for all {capacity} slots "
                          f"of nodes={request.nodes} x {request.ranks_per_node} ranks per node, e.g. tasks={capacity}")
    if request.results is not None and not (_PATH.fullmatch(request.results) and len(request.results) <= _PATH_MAX):
        raise SubmitError(f"results={_show(request.results)}: use a path of letters, digits, spaces and . _ + - / "
                          "(the job expands no ~ or $VARIABLE), e.g. results=/scratch/harness")
    for override in request.overrides:
        check_script_value("", override, shell=True)
    for key, value in request.env.items():
        if not _ENV_NAME.fullmatch(key):
            raise SubmitError(f"{site}: job.env key {_show(key)} is not a shell variable name; use letters, digits "
                              "and _, not starting with a digit, e.g. NCCL_DEBUG")
        check_script_value(f"job.env.{key}", value, shell=True, prefix=f"{site}: ")


SHELL_KEYS = ("setup", "srun_args")
"""hydra-submitit-launcher's keys that land in a job script as shell lines (or shell-quoted words): each one
printable line. Every other key lands in a directive line (#SBATCH --key=value), which no quoting protects."""
_DIRECTIVE_BAD = re.compile(r"[\s'\"\\#`$;]")


def check_script_value(key: str, value: object, *, shell: bool, prefix: str = "") -> None:
    """The one rule for anything rendered into a job script, by `harness submit` and the Slurm sweep launcher
    alike: no newline or control character anywhere (it would start a line of its own: an extra directive or
    command); a directive value is one word besides (no space, quote, backslash, #, `, $ or ;: each would end the
    value or start another option). Lists and mappings are checked item by item. `key` names the value in the
    message (empty: the value is itself a `key=value` override)."""
    if isinstance(value, dict):
        for inner, item in value.items():
            check_script_value(f"{key}.{inner}", str(inner), shell=shell, prefix=prefix)
            check_script_value(f"{key}.{inner}", item, shell=shell, prefix=prefix)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_script_value(f"{key}[{i}]", item, shell=shell, prefix=prefix)
        return
    if not isinstance(value, str):
        return  # numbers, booleans and None render as themselves
    shown = f"{prefix}{key}={_show(value)}" if key else f"{prefix}{_show(value)}"
    if not value.isprintable():
        fix = shlex.quote(" ".join("".join(ch if ch.isprintable() else " " for ch in value).split()) or "value")
        raise SubmitError(f"{shown}: must be one line of printable characters (no newline, tab or control "
                          f"character), e.g. {f'{key}={fix}' if key else fix}")
    if not shell and _DIRECTIVE_BAD.search(value):
        raise SubmitError(f"{shown}: lands in a #SBATCH line as one word; use no spaces, quotes, backslashes, #, `, "
                          "$ or ;")


def _check_word(key: str, value: str, limit: int) -> None:
    """A job name, account or queue: a word every scheduler reads literally in its directive line."""
    if _WORD.fullmatch(value) and len(value) <= limit:
        return
    fix = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-._")[:limit] if key == "name" else ""
    raise SubmitError(f"{key}={_show(value)}: use at most {limit} letters, digits, '.', '_' or '-', starting with "
                      f"a letter or digit, e.g. {key}={fix or _EXAMPLE[key]}")


def _check_walltime(walltime: str) -> None:
    """HH:MM:SS as every scheduler takes it: minutes and seconds below 60, and longer than nothing."""
    match = re.fullmatch(r"([0-9]{1,4}):([0-9]{2}):([0-9]{2})", walltime)
    if match is None:
        raise SubmitError(f"walltime={_show(walltime)}: use HH:MM:SS, e.g. walltime=00:30:00")
    hours, minutes, seconds = (int(x) for x in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total == 0:
        raise SubmitError(f"walltime={walltime}: must be longer than zero, e.g. walltime=00:30:00")
    if minutes > 59 or seconds > 59:
        same = f"{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}"
        fix = f"use walltime={same} for the same length" if total < 10_000 * 3600 else "e.g. walltime=24:00:00"
        raise SubmitError(f"walltime={walltime}: minutes and seconds must be 00 to 59; {fix}")


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
    """The template with the request's directives, rank counts, result path and overrides filled in.

    Every value is checked first (a request built in code gets no less than one from the command line) and
    shell-quoted where it lands; in directive lines the checked words need no quotes, so quoting leaves them as
    they are.
    """
    check_values(request)
    text = request.script.read_text()
    directives = _DIRECTIVES[request.scheduler]

    def must_set(pattern: str, value: str, what: str) -> str:
        rendered = _set(text, pattern, value)
        if rendered is None:
            raise SubmitError(f"{request.script} has no line for {what}; it cannot be rendered")
        return rendered

    for key, value in ((key, shlex.quote(value)) for key, value in _directive_values(request).items()):
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


def find_template(script: str) -> Path:
    """The file behind a profile's `job.script`, a path relative to the project (scripts/slurm/generic.sbatch).

    A source checkout has it at the project root, where `sbatch scripts/slurm/generic.sbatch` finds it too. A
    wheel installs the templates as data files under <prefix>/share/harness/ (they are shell scripts, not part
    of a Python package), found through the installed distribution's list of files; `pip install --target DIR`
    puts them in DIR/share/harness/ while its list of files points elsewhere, so that place is tried as well.
    """
    candidates = [_CHECKOUT / script]
    wanted = _INSTALLED / script
    try:
        dist = metadata.distribution(DISTRIBUTION)
        candidates += [Path(file.locate()) for file in dist.files or []
                       if file.parts[-len(wanted.parts):] == wanted.parts]
        candidates.append(Path(dist.locate_file(wanted)))
    except metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise SubmitError(f"job.script={_show(script)}: no such template in {_CHECKOUT} or the installed harness; "
                      "name one under scripts/, e.g. job.script=scripts/slurm/generic.sbatch")


def submit_command(scheduler: str, path: Path) -> str:
    """The shell command that submits a rendered script, as the dry run shows it."""
    return f"bsub < {shlex.quote(str(path))}" if scheduler == "lsf" else f"{SUBMIT[scheduler]} {shlex.quote(str(path))}"
