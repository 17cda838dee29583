"""`harness submit` fed hostile values: each one is refused in one line that names the key and a fix that works, or
it lands in the job script as one quoted word that no shell runs. Every site with a `job:` block is covered.

bash -n parses every rendered script; shellcheck lints it where installed (`.ci/provision-slurm.sh` installs it;
without it these checks skip, except under CI=true, where they fail).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import clean_env, harness
from omegaconf import OmegaConf

from harness.cli import main
from harness.launchers.jobscript import JobRequest, SubmitError, find_template, render

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {p.stem: OmegaConf.load(p) for p in sorted((ROOT / "conf/system").glob("*.yaml"))}
SITES = [site for site, profile in PROFILES.items() if "job" in profile]
CANARY = Path("/tmp/harness-hostile-canary")
"""The file every hostile value tries to create; a test fails if it exists afterwards."""

INJECTIONS = {
    "newline": f"x\ntouch {CANARY}",
    "carriage-return": f"x\rtouch {CANARY}",
    "line-separator": f"x\u2028touch {CANARY}",
    "escape": "x\x1b[2Jy",
    "command-substitution": f"$(touch {CANARY})",
    "backticks": f"`touch {CANARY}`",
    "semicolon": f"x;touch {CANARY}",
    "single-quote": "x'y",
    "double-quote": 'x"y',
}
"""Refused in every key: no scheduler takes them, and a newline would start a command of its own."""

HOSTILE: dict[str, dict[str, str]] = {
    "name": {**INJECTIONS, "space": "x y", "option": "-x", "empty": "", "too-long": "n" * 65, "unicode": "prüfung"},
    "account": {**INJECTIONS, "space": "abc 123", "option": "--qos=debug", "empty": "", "too-long": "a" * 65},
    "queue": {**INJECTIONS, "space": "de bug", "option": "-q", "empty": "", "too-long": "q" * 65},
    "walltime": {**INJECTIONS, "directive": "01:00:00\n#SBATCH --exclusive", "minutes": "99:99:99", "zero": "00:00:00",
                 "no-hours": "90", "short-field": "1:3:00", "arabic-digits": "٠١:٣٠:٠٠", "days": "1-00:00:00"},
    "nodes": {**INJECTIONS, "zero": "0", "negative": "-1", "plus": "+2", "space": " 2", "fraction": "2.0",
              "exponent": "1e3", "underscore": "2_0", "fullwidth": "２", "huge": "9" * 5000},
    "tasks": {**INJECTIONS, "zero": "0", "negative": "-1", "plus": "+2", "fraction": "2.0", "huge": "9" * 8},
    "results": {**INJECTIONS, "variable": "$SCRATCH/runs", "home": "~/runs", "option": "-rf", "empty": ""},
}

ODD_OVERRIDES = {
    f"name='$(touch {CANARY})'": f"$(touch {CANARY})",
    f"name='`touch {CANARY}`; touch {CANARY} && exit 1'": f"`touch {CANARY}`; touch {CANARY} && exit 1",
    'name="it\'s a | b & c > d"': "it's a | b & c > d",
    "name=my run": "my run",
    "name=$HOME": "$HOME",
}
"""Legal run overrides, with the `name` Hydra makes of each: text a shell would act on if it were not quoted."""


@pytest.fixture(autouse=True)
def _no_canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only the package's system profiles, and fail if any hostile value ran."""
    monkeypatch.setenv("HARNESS_CONFIG_DIR", str(tmp_path / "config"))
    CANARY.unlink(missing_ok=True)
    yield
    assert not CANARY.exists(), f"a hostile value ran: {CANARY} was created"


def _base(key: str = "") -> list[str]:
    """Valid values for the keys a test is not about (nodes=2, so any tasks= fix fits)."""
    return [f"{k}={v}" for k, v in {"account": "abc123", "nodes": "2"}.items() if k != key]


def _submit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`harness submit ...` in-process: exit code, stdout, stderr."""
    try:
        main(["submit", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, out: str, err: str, key: str) -> str:
    assert code == 2 and out == "", f"not refused (exit {code}):\n{out}{err}"
    assert err.endswith("\n") and err[:-1].isprintable(), err
    assert err.startswith(f"harness: error: {key}="), err
    return err[:-1]


def _fix(message: str) -> tuple[str, str]:
    """The `key=value` a message offers as its fix (`e.g. key=value` or `use key=value`)."""
    found = re.findall(r"(?:e\.g\.|use) (\w+)=(\S+?)[,;]?(?: |$)", message)
    assert found, f"no fix in: {message}"
    return found[-1]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize(("key", "label"), [(key, label) for key, values in HOSTILE.items() for label in values])
def test_hostile_value_is_refused_in_one_line_with_a_fix(site: str, key: str, label: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    value = HOSTILE[key][label]
    message = _one_line_error(*_submit([site, "--dry-run", *_base(key), f"{key}={value}"], capsys), key=key)
    fix_key, fix_value = _fix(message)
    assert fix_key == key, message
    if label in ("newline", "minutes", "zero"):  # the fix works (composing a run config takes a while: a few only)
        code, out, err = _submit([site, "--dry-run", *_base(key), f"{key}={fix_value}"], capsys)
        assert code == 0 and out.startswith("#!/bin/bash\n"), err


@pytest.mark.parametrize("site", SITES)
def test_hostile_override_is_refused(site: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _submit([site, "--dry-run", *_base(), "--", "model=gpt-tiny", f"name=a\ntouch {CANARY}"],
                             capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("harness: error: name=a\\ntouch ") and f"e.g. 'name=a touch {CANARY}'" in err, err


def _need_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        message = "shellcheck is not installed; run .ci/provision-slurm.sh as root on Debian (or apt-get install it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _bash(code: str) -> str:
    """What bash prints running `code` (in a clean environment, HOME kept for `$HOME`)."""
    done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env={"HOME": "/home/u", "PATH": "/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _code(script: str) -> list[str]:
    """The lines bash runs: neither blank nor comments (directives are comments to bash)."""
    return [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _line(script: str, prefix: str) -> str:
    lines = [line for line in script.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"{prefix!r}: {lines}"
    return lines[0]


@pytest.mark.parametrize("site", SITES)
def test_odd_but_legal_values_land_quoted_in_every_site_script(site: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    results = "/scratch/my results/a+b"
    code, script, err = _submit([site, "--dry-run", *_base(), f"results={results}", "tasks=3", "--",
                                 "model=gpt-tiny", *ODD_OVERRIDES], capsys)
    assert code == 0, err
    template = find_template(PROFILES[site].job.script).read_text()
    # Rendering rewrites the template's own assignments in place and adds no command: only directive lines
    # (comments to bash), each of plain words, and the profile's env exports.
    lines, template_lines = _code(script), _code(template)
    assert len(lines) == len(template_lines) + len(PROFILES[site].job.get("env", {})), lines
    changed = [line for line, was in zip(lines, template_lines) if line != was]
    assert all(re.match(r"(ranks|ranks_per_node|results_dir|overrides|walltime_min)=", line) for line in changed)
    for line in (line for line in script.splitlines() if re.match(r"#(SBATCH|PBS|BSUB) ", line)):
        directive = re.fullmatch(r"#(?:SBATCH|PBS|BSUB) --?[a-z-]+(?:[= ](\S+))?", line, flags=re.IGNORECASE)
        assert directive and not re.search(r"[$`'\"();|&<>\\]", directive.group(1) or ""), line
    # Bash reads the overrides and the results directory back as exactly the words given.
    defaults = shlex.split(_line(template, "overrides=(")[len("overrides=("):-1])
    words = _bash(_line(script, "overrides=(") + "\nprintf '%s\\n' \"${overrides[@]}\"").splitlines()
    assert words == [*defaults, "model=gpt-tiny", *ODD_OVERRIDES]
    assert _bash(_line(script, "results_dir=") + '\nprintf "%s" "$results_dir"') == results
    path = tmp_path / f"{site}.sh"
    path.write_text(script)
    parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    _need_shellcheck()
    linted = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout


def test_odd_overrides_are_legal_run_overrides() -> None:
    """What the job's `harness run` receives: Hydra takes each override, and `name` comes out as written."""
    from harness.config.compose import compose

    for override, name in ODD_OVERRIDES.items():
        assert compose(["model=gpt-tiny", override]).name == name


@pytest.mark.parametrize("site", SITES)
def test_profile_env_is_checked_and_quoted(site: str) -> None:
    job = PROFILES[site].job
    request = JobRequest(site=site, scheduler=job.scheduler, script=find_template(job.script), ranks_per_node=4,
                         env={"ODD": f"$(touch {CANARY}) `id` 'q' \"d\" ; | &", "PLAIN": "INFO"})
    script = render(request)
    exports = [line for line in script.splitlines() if line.startswith("export ODD=") or line.startswith("export PL")]
    assert len(exports) == 2
    assert _bash("\n".join(exports) + '\nprintf "%s|%s" "$ODD" "$PLAIN"') == f"{request.env['ODD']}|INFO"
    for env, message in [({"A;touch x;B": "1"}, "job.env key A;touch x;B is not a shell variable name"),
                         ({"A": f"1\ntouch {CANARY}"}, f"job.env.A=1\\ntouch {CANARY}: must be one line")]:
        request.env = env
        with pytest.raises(SubmitError, match=re.escape(message)):
            render(request)


@pytest.mark.parametrize("key", ["name", "account", "queue", "results"])
def test_render_refuses_what_the_command_line_refuses(key: str) -> None:
    """A request built in code (not parsed from the command line) is checked as strictly."""
    request = JobRequest(site="cpu", scheduler="slurm", script=find_template("scripts/slurm/generic.sbatch"),
                         ranks_per_node=8, **{key: f"x\ntouch {CANARY}"})
    with pytest.raises(SubmitError, match=rf"^{key}=x\\ntouch "):
        render(request)


@pytest.mark.parametrize("args", [
    ["cpu", "--dry-run", f"name=x\ntouch {CANARY}", "--", "model=gpt-tiny"],
    ["cpu", "--dry-run", f"account=x\ntouch {CANARY}"],
    ["polaris", "--dry-run", "account=abc", f"queue=x\ntouch {CANARY}"],
    ["frontier", "--dry-run", "account=abc", "--", f"name=a\ntouch {CANARY}"],
    [f"cpu\ntouch {CANARY}", "--dry-run"],
    ["cpu", "--dry-run", f"gpus\ntouch {CANARY}=1"],
], ids=["name", "account", "queue", "override", "system", "unknown-key"])
def test_cli_prints_one_line_and_exits_2(args: list[str], tmp_path: Path) -> None:
    """The command as a user runs it: exit 2, nothing on stdout, one line on stderr."""
    proc = harness(["submit", *args], cwd=tmp_path, env=dict(clean_env(), HARNESS_CONFIG_DIR=str(tmp_path)))
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout + proc.stderr
    assert proc.stderr.startswith("harness: error: ") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["walltime=99:99:99"], "walltime=99:99:99: minutes and seconds must be 00 to 59; "
                            "use walltime=100:40:39 for the same length"),
    (["walltime=00:60:00"], "walltime=00:60:00: minutes and seconds must be 00 to 59; "
                            "use walltime=01:00:00 for the same length"),
    (["walltime=00:00:00"], "walltime=00:00:00: must be longer than zero, e.g. walltime=00:30:00"),
    (["walltime=1:3:00"], "walltime=1:3:00: use HH:MM:SS, e.g. walltime=00:30:00"),
    (["nodes=0"], "nodes=0: must be at least 1, e.g. nodes=1"),
    (["nodes=-1"], "nodes=-1: must be a whole number from 1 to 9999999, e.g. nodes=2"),
    (["nodes=10000000"], "nodes=10000000: must be a whole number from 1 to 9999999, e.g. nodes=2"),
    (["nodes=2", "tasks=0"],
     "tasks=0: must be at least 1; leave tasks= out for all 16 slots of nodes=2 x 8 ranks per node, e.g. tasks=16"),
    (["nodes=2", "tasks=17"],
     "tasks=17 does not fit nodes=2 x 8 ranks per node on frontier = 16; use nodes=3 or fewer tasks"),
    (["queue=" + "q" * 65], f"queue={'q' * 65}: use at most 64 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit, e.g. queue=debug"),
])
def test_walltime_nodes_and_tasks(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _submit(["frontier", "--dry-run", "account=abc", *args], capsys)
    assert (code, out, err) == (2, "", f"harness: error: {message}\n")


@pytest.mark.parametrize(("site", "args", "directive"), [
    ("frontier", ["walltime=1:30:00"], "#SBATCH --time=1:30:00"),
    ("frontier", ["walltime=9999:59:59"], "#SBATCH --time=9999:59:59"),
    ("summit", ["walltime=9999:59:59"], "#BSUB -W 10000:00"),
    ("polaris", ["walltime=00:00:01"], "#PBS -l walltime=00:00:01"),
    ("polaris", ["queue=" + "q" * 15], "#PBS -q " + "q" * 15),
    ("frontier", ["queue=" + "q" * 64], "#SBATCH --partition=" + "q" * 64),
    ("cpu", ["name=my-run_2.b", "account=m1234_g"], "#SBATCH --account=m1234_g"),
])
def test_edge_values_that_are_accepted(site: str, args: list[str], directive: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _submit([site, "--dry-run", "account=abc", *args], capsys)
    assert code == 0, err
    assert directive in out.splitlines()


def test_pbs_queue_names_are_at_most_15_characters(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _submit(["polaris", "--dry-run", "account=abc", "queue=" + "q" * 16], capsys)
    assert code == 2 and "use at most 15 letters" in err and "e.g. queue=debug" in err
