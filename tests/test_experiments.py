"""Every experiment in `conf/experiment/` composes, validates at every sweep point, cites the study
it reproduces and names the `harness report` views that reproduce it; every published study has a CPU
miniature small enough to run here. No training here: tests/test_report.py runs two of the miniatures, and
each runs by hand with `harness run -m +experiment=<name>`.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from harness.config.checks import validate
from harness.config.compose import CONF_DIR, compose, group_names

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

STUDIES = {
    "000 Yin et al. 2023, FSDP vs DeepSpeed-Megatron on Summit and Crusher": "yin-",
    "001 Dash et al. 2023, 3D parallelism on Frontier": "frontier-3d-",
    "002 FSDP with Lightning Lite on 4x V100": "fsdp-study-",
    "003 Cheng et al. 2024, characterization of ZeRO and TP/PP/DP at scale": "characterize-",
    "004 ALCF-4 1T benchmark": "alcf-1t",
    "005 Long-context training with context parallelism (DeepSpeed-Ulysses, ring attention)": "long-context",
}
"""Each published study and the name prefix of its experiments."""

CITATION = re.compile(r"doi[:.]|arxiv|https?://|github\.com/|\"[^\"]{12,}\"", re.IGNORECASE)
"""A DOI, an arXiv id, a link or a quoted title."""


def header(name: str) -> str:
    """The comment block an experiment file starts with."""
    lines = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
    return "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines))


def study_of(name: str) -> str:
    owners = [study for study, prefix in STUDIES.items() if name.startswith(prefix)]
    assert len(owners) == 1, f"{name}: belongs to {owners or 'no study'}; add its prefix to STUDIES"
    return owners[0]


def world_size(cfg: Any) -> int:
    """The ranks a point is checked for: the published device count, else the local ranks it starts."""
    return cfg.parallel.world_size or cfg.launcher.nproc


def sweeper_params(name: str) -> dict[str, str]:
    """`hydra.sweeper.params` of an experiment file merged over those of the experiments it extends (its
    defaults list entries that are plain names), as Hydra merges them, without composing (~0.2 s each)."""
    raw = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml")
    params: dict[str, str] = {}
    for entry in raw.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            params.update(sweeper_params(entry))
    params.update(OmegaConf.to_container(OmegaConf.select(raw, "hydra.sweeper.params") or OmegaConf.create()))
    return params


def hydra_sweep(name: str) -> list[tuple[str, tuple[Any, ...]]]:
    """The sweep as (key, values) pairs, each value parsed as Hydra's basic sweeper parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    sweep = []
    for key, value in sweeper_params(name).items():
        override = parser.parse_override(f"{key}={value}")
        values = tuple(override.sweep_iterator()) if override.is_sweep_override() else (override.value(),)
        sweep.append((key, values))
    return sweep


@lru_cache(maxsize=None)
def composed(name: str, groups: tuple[str, ...]) -> DictConfig:
    """`harness run +experiment=<name> <groups>`'s config (shared by the tests: composing takes ~0.2 s)."""
    return compose([f"+experiment={name}", *groups])


def sweep_points(name: str) -> list[DictConfig]:
    """Every point of the experiment's sweep, as `harness run -m` composes it: group choices (model=, backend=)
    recompose; value overrides are merged on top, as Hydra applies them after the defaults."""
    sweep = hydra_sweep(name)
    points = []
    for choice in itertools.product(*(values for _, values in sweep)):
        chosen = list(zip((key for key, _ in sweep), choice))
        groups = tuple(f"{key}={value}" for key, value in chosen if key in group_names())
        cfg = composed(name, groups).copy()
        for key, value in chosen:
            if key not in group_names():
                OmegaConf.update(cfg, key, value, merge=True)
        points.append(cfg)
    return points


def has_key(cfg: Any, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def test_every_experiment_belongs_to_a_study_and_every_study_has_a_cpu_miniature() -> None:
    owners = {name: study_of(name) for name in EXPERIMENTS}
    for study, prefix in STUDIES.items():
        mine = [name for name, owner in owners.items() if owner == study]
        assert any(name.endswith("-cpu") for name in mine), f"{study}: no CPU miniature among {mine}"
        assert any(not name.endswith("-cpu") for name in mine), f"{study}: no published-scale experiment"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_cites_its_study(name: str) -> None:
    text = header(name)
    assert text.startswith("# @package _global_"), f"{name}: the first line must be '# @package _global_'"
    cfg = composed(name, ())
    validate(cfg, world_size(cfg))
    assert CITATION.search(f"{text}\n{cfg.report.study or ''}"), f"{name}: no citation (DOI, arXiv, link or title)"
    assert "/work/" not in text and "seeds/" not in text, f"{name}: cite the paper, not a local note"
    assert cfg.report.views, f"{name}: report.views names no view"
    assert cfg.report.study, f"{name}: report.study does not name the table or figure reproduced"
    for key in [*([cfg.report.vs] if cfg.report.vs else []), *cfg.report.by,
                *([cfg.report.baseline.partition("=")[0]] if cfg.report.baseline else [])]:
        assert has_key(cfg, key), f"{name}: report key {key} is not a config key"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sweep_point_validates_and_has_its_own_name(name: str) -> None:
    points = sweep_points(name)
    names = []
    for cfg in points:
        validate(cfg, world_size(cfg))
        names.append(cfg.name)
    assert len(set(names)) == len(names), f"{name}: sweep points share a name: {sorted(names)}"


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.endswith("-cpu")])
def test_cpu_miniatures_are_small_enough_to_run_here(name: str) -> None:
    for cfg in sweep_points(name):
        assert cfg.system.name == "cpu" and cfg.system.device == "cpu", f"{name}: runs on system=cpu"
        assert cfg.launcher.nproc <= 4 and cfg.launcher.omp_num_threads == 1, f"{name}: at most 4 one-thread ranks"
        assert cfg.parallel.world_size is None, f"{name}: the ranks it starts define its world size"
        assert cfg.train.precision == "fp32" and cfg.train.steps <= 3 and cfg.train.warmup_steps <= 1, name
        assert cfg.model.n_layers <= 4 and cfg.model.d_model <= 64, f"{name}: a tiny model"
