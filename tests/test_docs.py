"""Every command the docs show is run here, so the docs cannot go stale.

A command is a line of a code block in README.md, results/README.md or docs/*.md that starts with
`harness` (or `$ harness`, followed by the output it shows). `estimate`, `plan`, `submit --dry-run` and
`run --dry-run` (every point composed and checked as the run would check it, nothing run) run in full, in
this process; an error the docs show must be the error the command gives, and every line of output the
docs show that holds no number must be in the real output (numbers move with the cost model; the
shape must not). Commands that need run directories, a cluster or minutes of training are checked as
far as they can be without them (their options parse, their overrides compose) and run in full by the
test named beside them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from conftest import clean_env, harness

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BOX = re.compile(r"[┃│┏┓┗┛┡┩┣┫━─┳┻╇╈╋┼┬┴┐┘└┌├┤═║╔╗╚╝]")

RUN_ELSEWHERE = {
    "report": "tests/test_report.py runs `harness report` over the studies' CPU miniatures",
    "calibrate": "tests/test_calibrate.py calibrates 1 and 2 ranks, tests/test_fromtrace.py from a profiled run",
    "search": "tests/test_search.py runs a search",
    "data": "tests/test_megatron_data.py prepares a dataset",
}
NOT_HARNESS = ("make ", ".venv/bin/python benchmarks/", "mpiexec ")
"""Lines that are not harness commands: the Makefile's targets (what CI runs), the benchmark scripts (each
writes its JSON to results/), and a site's launch line quoted from its job script."""


@dataclass
class DocCommand:
    where: str
    line: str
    shown: list[str] = field(default_factory=list)

    @property
    def args(self) -> list[str]:
        words = shlex.split(self.line, comments=True)
        if words[:1] in (["torchrun"], ["srun"]):  # ranks started by a launcher run `harness run` as they join
            words = ["harness", *words[words.index("harness.cli") + 1:]]
        assert words[0] == "harness", self.line
        return words[1:]


def yaml_comment_commands() -> list[DocCommand]:
    """`harness ...` commands quoted in the config files' comments (an experiment says how to run itself)."""
    from harness.config.compose import group_choices

    out = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        for comment in re.findall(r"#(.*)", path.read_text()):
            for found in re.findall(r"harness (?:run|estimate|plan|submit) [^()\n]*", comment):
                words = found.rstrip(" :.,").split()
                rest = words[2:] if words[1] == "submit" else words[1:]
                if words[1] == "submit" and (len(words) < 3 or words[2] not in group_choices("system")):
                    continue  # prose about the command, not a command
                if all("=" in w or w.startswith(("-", "+")) for w in rest[1:] if words[1] == "submit") and \
                        all("=" in w or w.startswith(("-", "+")) for w in (rest if words[1] != "submit" else [])):
                    out.append(DocCommand(str(path.relative_to(ROOT)), " ".join(words)))
    return out


def doc_commands() -> list[DocCommand]:
    out: list[DocCommand] = yaml_comment_commands()
    for path in DOCS:
        for info, block in re.findall(r"```([^\n]*)\n(.*?)```", path.read_text(), flags=re.S):
            if info.strip() == "text":  # a diagram
                continue
            current = None
            for raw in block.replace("\\\n", " ").splitlines():
                line = raw.strip()
                prompt = line.startswith("$ ")
                body = line[2:] if prompt else line
                if re.match(r"^(harness|torchrun|srun) (?!\S*:(\s|$))", body):
                    for part in body.split(" && "):
                        current = DocCommand(f"{path.relative_to(ROOT)}", part.strip())
                        out.append(current)
                    current = current if prompt else None
                elif current is not None and line and line != "..." and not body.startswith(NOT_HARNESS):
                    current.shown.append(line)
                elif body.startswith(NOT_HARNESS) or not line:
                    current = None
    return out


HELP_SCRIPT = """
import contextlib, io
from harness.cli import COMMANDS, main
for name in ["", *COMMANDS]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            main([name, "--help"] if name else ["--help"])
        except SystemExit:
            pass
    print(f"@@ {name}\\n{buffer.getvalue()}")
"""
PLACEHOLDER = re.compile(r"\b(NAME|DIR|PATH|PREFIX|INPUT)\b|\.\.\.")
"""An example that names what the reader fills in (`+experiment=NAME`, `hydra.run.dir=DIR ...`) is a pattern."""


def help_commands() -> list[DocCommand]:
    """The examples every `harness <command> --help` prints (two-space indented `harness ...` lines, a description
    after two or more spaces), so that a help text cannot show a command that fails."""
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=120,
                          env=clean_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = []
    for section in proc.stdout.split("@@ ")[1:]:
        name, _, text = section.partition("\n")
        for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines():
            found = re.match(r"^  (harness \S+.*?)(?:\s{2,}\S.*)?$", line)
            if found and not PLACEHOLDER.search(found.group(1)):
                out.append(DocCommand(f"harness {name} --help".replace("  ", " "), found.group(1).strip()))
    return out


COMMANDS = doc_commands()
HELP_COMMANDS = help_commands()


def _normal(line: str) -> str:
    return " ".join(BOX.sub(" ", line).split())


def run_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from harness.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_docs_show_commands_of_every_kind() -> None:
    kinds = {c.args[0] for c in COMMANDS}
    assert {"run", "estimate", "plan", "submit", "report"} <= kinds, kinds
    assert len(COMMANDS) >= 40


def runs_for_real(command: DocCommand) -> bool:
    """A `harness run` whose output the docs show runs as shown (the README's demo: 2 tiny ranks)."""
    return command.args[0] == "run" and bool(command.shown) and not command.shown[0].startswith("harness: error:")


def test_every_help_text_shows_examples_and_each_is_checked() -> None:
    assert {c.where for c in HELP_COMMANDS} >= {f"harness {name} --help" for name in ("estimate", "plan", "run")}
    assert sum(c.args[0] == "estimate" for c in HELP_COMMANDS) >= 3


@pytest.mark.parametrize("command", [
    pytest.param(c, id=f"{c.where}: {c.line[:90]}", marks=[pytest.mark.multirank] if runs_for_real(c) else [])
    for c in [*COMMANDS, *HELP_COMMANDS]])
def test_a_command_the_docs_show_works_as_shown(command: DocCommand, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    args = command.args
    name = args[0]
    if name in RUN_ELSEWHERE:
        check_without_running(args)
        return
    shown_error = [line for line in command.shown if line.startswith("harness: error:")]
    if runs_for_real(command):
        done = harness(args, cwd=tmp_path, env={**clean_env(), "COLUMNS": "200"})
        code, out, err = done.returncode, done.stdout, done.stderr
    elif name == "run" and not shown_error and not {"--dry-run", "--cfg", "-c"} & set(args):
        args = [*args, "--dry-run"]
    if name == "submit" and "--dry-run" not in args:
        args = [args[0], args[1], "--dry-run", *args[2:]]
    if not runs_for_real(command):
        code, out, err = run_in_process(args, capsys)
    if shown_error:
        assert code == 2 and err.strip() == shown_error[0], (command.line, err)
        return
    if code and needs_your_files(command, out + err):
        return  # checked as far as it goes here: the only complaint is data the reader brings
    assert code == 0, f"{command.where}: `{command.line}` exits {code}: {err[-2000:]}"
    real = _normal(out + err)
    for line in command.shown:
        if not re.search(r"\d", line):
            assert _normal(line) in real, f"{command.where}: `{command.line}` no longer prints: {line}"


def needs_your_files(command: DocCommand, output: str) -> bool:
    """The command's only complaints are files it names that do not exist here (a dataset of the reader's)."""
    errors = re.findall(r"error: (.*?)(?:\]|$)", output, flags=re.M)
    missing = [re.search(r"(\S+?)(?:\.bin|\.idx)?: no such file", e) for e in errors]
    return bool(errors) and all(m is not None and Path(m.group(1)).stem in command.line for m in missing)


@pytest.fixture(autouse=True)
def calibrated_profiles(user_config_dir: Path) -> Iterator[None]:
    """The profiles the docs calibrate before using them (`harness calibrate --name=X`, then `system=X`), as
    stand-ins: the shipped CPU profile under that name, with a peak (tests/test_calibrate.py runs calibrate)."""
    from omegaconf import OmegaConf

    from harness.config.compose import CONF_DIR

    paths = [user_config_dir / "system" / f"{name}.yaml" for name in CALIBRATED]
    for name, path in zip(CALIBRATED, paths):
        profile = OmegaConf.load(CONF_DIR / "system" / "cpu.yaml")
        profile.name, profile.peak_tflops = name, 0.1
        profile.peak_tflops_source = "a stand-in for `harness calibrate` in tests/test_docs.py"
        path.parent.mkdir(exist_ok=True)
        OmegaConf.save(profile, path)
    yield
    for path in paths:
        path.unlink()


CALIBRATED = sorted({next((a.removeprefix("--name=") for a in c.args if a.startswith("--name=")),
                          None if any(a.startswith("--from") for a in c.args) else "cpu-calibrated")
                     for c in [*COMMANDS, *HELP_COMMANDS] if c.args[0] == "calibrate"} - {None})
"""Profile names the docs calibrate: each --name, else calibrate's default <system>-calibrated."""


def check_without_running(args: list[str]) -> None:
    """Options parsed and overrides composed as the command would, for commands the docs cannot run here."""
    name, rest = args[0], args[1:]
    if name == "report":
        from harness.core.registry import REPORT_VIEWS
        from harness.report.command import _parser

        ns = _parser().parse_args(rest)
        assert all(view in REPORT_VIEWS for view in filter(None, ns.view.split(","))), ns.view
        return
    if name == "data":
        from harness.data import prepare_parser

        assert rest[0] == "prepare" and prepare_parser().parse_args(rest[1:]).out
        return
    from harness.config.compose import compose, split_command_args

    flags = {"calibrate": {"--name": str, "--from": str}, "search": {}}[name]
    overrides, _ = split_command_args(rest, flags)
    compose(overrides)


def _backticked(text: str) -> set[str]:
    """The names in backticks that look like a config choice (lower-case words, digits, '.', '-')."""
    return set(re.findall(r"`([a-z0-9][a-z0-9.\-]*)`", text))


def _row(path: Path, first_cell: str) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith(f"| {first_cell} |"))


def test_the_docs_lists_are_the_config_groups_and_registries() -> None:
    """Every model size, system, backend, experiment and report view the docs list exists, and every one that
    exists is listed: the lists cannot fall behind the config groups."""
    from harness.config.compose import CONF_DIR
    from harness.core.registry import REPORT_VIEWS

    def shipped(group: str) -> set[str]:
        return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}

    configuration = ROOT / "docs" / "configuration.md"
    models = _row(configuration, "`model`").split("(each file")[0]
    assert _backticked(models) - {"model"} == shipped("model")
    systems = _row(configuration, "`system`").split("supplies")[0]
    assert _backticked(systems) - {"system"} == shipped("system")
    assert shipped("backend") <= _backticked(_row(configuration, "`backend`"))
    costmodel = (ROOT / "docs" / "costmodel.md").read_text()
    listed = re.search(r"System profiles in `conf/system/` \((.*?)\) cite", costmodel, flags=re.S)
    assert listed and _backticked(listed.group(1)) == shipped("system")
    studies = (ROOT / "docs" / "studies.md").read_text().splitlines()
    table = [line.split("|") for line in studies if line.startswith("| ") and line.count("|") == 4]
    experiments = set().union(*(_backticked(cells[2] + cells[3]) for cells in table))
    assert experiments == shipped("experiment")
    views = {re.match(r"\| `(\w+)` \|", line).group(1) for line in studies  # type: ignore[union-attr]
             if re.match(r"\| `(\w+)` \|", line)}
    assert views == set(REPORT_VIEWS)


def test_the_supported_python_range_is_the_one_the_readme_states() -> None:
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.fullmatch(r">=(\d+)\.(\d+)", requires)
    assert low, requires
    assert sys.version_info[:2] >= (int(low.group(1)), int(low.group(2)))  # this interpreter is in the range
    readme = (ROOT / "README.md").read_text()
    assert f"Python {low.group(1)}.{low.group(2)}" in readme
    assert not re.search(r"Python 3\.(\d+)", readme.replace(f"Python {low.group(1)}.{low.group(2)}", "")), \
        "the README names another Python version"


def test_results_readme_lists_every_reference_result_and_the_script_that_writes_it() -> None:
    """results/README.md's table of reference results names every JSON file kept in results/ and a benchmark script
    that exists for each, so a new benchmark cannot land unlisted."""
    import fnmatch

    table = [line.split("|") for line in (ROOT / "results" / "README.md").read_text().splitlines()
             if line.startswith("| `") and "benchmarks/" in line]
    listed = {cells[1].strip().strip("`"): cells[2].strip().strip("`") for cells in table}
    for name, script in listed.items():
        assert (ROOT / script).is_file(), (name, script)
    kept = [p.name for p in (ROOT / "results").glob("*.json")]
    assert kept and all(any(fnmatch.fnmatch(name, pattern) for pattern in listed) for name in kept), kept
