"""Where configs come from: the config groups shipped in the package, the user's own profiles, and
composing them for the commands that are not a Hydra application (`estimate`, `plan`, `calibrate`,
`submit`).

The groups are package data (`conf/`), so an installed wheel works from any directory.
Profiles written by `harness calibrate` live in the user's config directory, never in the package:
`$HARNESS_CONFIG_DIR`, else `$XDG_CONFIG_HOME/harness`, else `~/.config/harness`; its `system/`
folder is searched after the package's, so `system=<name>` finds them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.core.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The config groups shipped with the package."""


def user_config_dir() -> Path:
    """The user's harness config directory (it may not exist yet)."""
    if os.environ.get("HARNESS_CONFIG_DIR"):
        return Path(os.environ["HARNESS_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "harness"


def search_dirs() -> list[Path]:
    """Config roots in Hydra's search order: the package's groups, then the user's."""
    return [CONF_DIR, user_config_dir()]


def searchpath_overrides() -> list[str]:
    """The Hydra override that adds the user's config directory to the search path, when it exists."""
    user = user_config_dir()
    return [f"hydra.searchpath=[file://{user}]"] if user.is_dir() else []


def group_choices(group: str) -> list[str]:
    """The named options of a config group, from the YAML files of every config root."""
    return sorted({p.stem for root in search_dirs() for p in (root / group).glob("*.yaml")})


def group_names() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def check_group_overrides(overrides: list[str]) -> None:
    """Reject `model=unknown` before Hydra does (Hydra's message spans many lines)."""
    groups = group_names()
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        choices = group_choices(key)
        for choice in value.split(","):  # a -m sweep lists several
            if choice not in choices:
                raise ConfigError(f"{key}={choice}: unknown {key}; choose one of: {', '.join(choices)}")


def compose(overrides: list[str], *, hydra_node: bool = False) -> DictConfig:
    """The config `harness run <overrides>` would see (same defaults list, same schema, same search path);
    hydra_node: with Hydra's own section (its sweeper params, run and sweep directories)."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.config.errors import hydra_error_line
    from harness.config.schema import register_schema

    check_group_overrides(overrides)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=[*overrides, *searchpath_overrides()],
                                 return_hydra_config=hydra_node)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(hydra_error_line(exc)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(exc)) from exc


def yaml_error_line(exc: Exception) -> str:
    """A YAML file that does not parse (a profile in the user's config directory, say), named with the place."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: not valid YAML ({problem}); fix or remove that file"


def load_yaml(path: Path) -> DictConfig:
    """A config file read on its own (a system profile), a parse error as one line."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(exc)) from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: holds a list, not a mapping of keys; fix or remove that file")
    return loaded


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The overrides of every point `harness run -m <overrides>` would run, in Hydra's order: Hydra's own
    parser and BasicSweeper expand the experiment's hydra.sweeper.params followed by the command line's."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from harness.config.errors import hydra_error_line

    parser = OverridesParser.create()
    try:
        fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    except HydraException as exc:
        raise ConfigError(hydra_error_line(exc)) from exc
    with_hydra = compose(fixed, hydra_node=True)
    params = [f"{k}={v}" for k, v in (with_hydra.hydra.sweeper.get("params") or {}).items()]
    try:
        return BasicSweeper.split_arguments(parser.parse_overrides([*params, *overrides]), None)[0]
    except HydraException as exc:
        raise ConfigError(hydra_error_line(exc)) from exc


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """A resolved plain-dict copy, for run directories and for pickling to spawned ranks."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


class HelpRequested(Exception):
    """`--help` was given: the command prints its usage and exits 0."""


def split_command_args(args: list[str], flags: dict[str, type]) -> tuple[list[str], dict[str, Any]]:
    """(overrides, flag values) of a non-`run` command: `--json` (a bool flag) or `--top=10` (a typed one).
    An unknown flag or a value of the wrong type is a one-line ConfigError; `-h`/`--help` raises HelpRequested."""
    overrides, values = [], {}
    for arg in args:
        if arg in ("-h", "--help"):
            raise HelpRequested
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name, sep, raw = arg.partition("=")
        kind = flags.get(name)
        if kind is None:
            known = ", ".join(f"{f}=<{t.__name__}>" if t is not bool else f for f, t in flags.items())
            raise ConfigError(f"{arg}: unknown option; this command takes overrides and {known}")
        if kind is bool:
            if sep:
                raise ConfigError(f"{arg}: {name} takes no value; write {name}")
            values[name] = True
            continue
        try:
            values[name] = kind(raw)
        except ValueError:
            raise ConfigError(f"{arg}: {name} needs {'a whole number' if kind is int else kind.__name__}, "
                              f"e.g. {name}=10") from None
    return overrides, values
