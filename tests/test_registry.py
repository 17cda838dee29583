"""Every name a user can type exists in the tables that give it meaning, and the other way round: each config
group's files against the registries (harness/core/registry.py, the cost model's software profiles and
peaks, the sweep launchers), each entry's references resolvable. Torch-free: it runs in the fast tier."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.config.checks.data import DATA_KINDS
from harness.config.compose import CONF_DIR, group_names
from harness.core.registry import BACKENDS, CHECKPOINTING, CP_KINDS, FRAMEWORK_LAYOUTS, PP_SCHEDULES, REPORT_VIEWS, load
from harness.costmodel.peaks import device_entry
from harness.costmodel.software import PROFILES
from harness.run.sweep import JOB_LAUNCHERS, LOCAL_LAUNCHERS

ROOT = Path(__file__).resolve().parents[1]


def stems(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


TABLES = {  # config group: the names the code gives meaning to
    "backend": lambda: set(BACKENDS),
    "data": lambda: set(DATA_KINDS),
    "hydra/launcher": lambda: set(JOB_LAUNCHERS) | (set(LOCAL_LAUNCHERS) - {"basic"}),
}


@pytest.mark.parametrize("group", sorted(TABLES))
def test_a_config_group_and_its_table_name_the_same_things(group: str) -> None:
    assert stems(group) == TABLES[group](), f"conf/{group}/ and the registry disagree"


def test_every_config_group_is_known_to_this_test() -> None:
    """A new group must say which table owns its names (or that its files are their own: models, systems...)."""
    own = {"model", "system", "experiment"}  # each file is a whole profile: checked below, one by one
    assert set(group_names()) == {g.split("/")[0] for g in TABLES} | own | {"hydra"}


@pytest.mark.parametrize("group, key", [("backend", "name"), ("data", "kind"), ("model", "name"), ("system", "name")])
def test_a_file_names_itself(group: str, key: str) -> None:
    for path in (CONF_DIR / group).glob("*.yaml"):
        loaded = OmegaConf.load(path)
        section = loaded.get(group, loaded) if "# @package _global_" in path.read_text() else loaded
        assert section[key] == path.stem, path


def test_each_backend_has_its_software_profile_and_each_harness_profile_a_backend() -> None:
    assert all(spec.software in PROFILES for spec in BACKENDS.values())
    assert {name for name in PROFILES if name.startswith("harness-")} == {s.software for s in BACKENDS.values()}
    # every other framework's profile states the layouts it runs itself (what `estimate` accepts for it)
    assert set(FRAMEWORK_LAYOUTS) == set(PROFILES) - {s.software for s in BACKENDS.values()}
    assert all(layouts.source for layouts in FRAMEWORK_LAYOUTS.values())
    assert all(set(layouts.context_parallel) <= set(CP_KINDS) for layouts in FRAMEWORK_LAYOUTS.values())


def test_each_backend_implementation_is_a_module_beside_the_registry() -> None:
    for spec in BACKENDS.values():
        for path in filter(None, (spec.implementation, spec.pipeline_implementation)):
            module = path.partition(":")[0]
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), path


def test_each_system_names_a_known_accelerator_and_a_job_script() -> None:
    for path in (CONF_DIR / "system").glob("*.yaml"):
        system = OmegaConf.load(path)
        if system.get("accelerator"):
            assert device_entry(system) is not None, f"{path}: accelerator {system.accelerator} not in peaks.py"
        script = (system.get("job") or {}).get("script")
        if script:
            assert (ROOT / script).is_file(), f"{path}: job.script {script}"


def test_each_report_view_resolves_to_its_builder_and_plot() -> None:
    for view in REPORT_VIEWS.values():
        assert callable(load(view.build)) and callable(load(view.plot)), view.name


def test_each_checkpointing_mode_names_a_region_of_the_model() -> None:
    from harness.costmodel.flops import forward_flops_per_token, recomputed_forward_per_token
    from harness.models.config import GPTConfig

    regions = {"", "attn.core", "attn", "block"}
    assert {mode.region for mode in CHECKPOINTING.values()} == regions
    fwd = forward_flops_per_token(GPTConfig())
    recomputed = [recomputed_forward_per_token(fwd, name, None) for name in CHECKPOINTING]
    assert recomputed == sorted(recomputed) and recomputed[0] == 0  # least to most, as the planner orders them


def test_each_pipeline_schedule_has_a_bubble_no_larger_than_gpipe() -> None:
    for schedule in PP_SCHEDULES.values():
        assert 0 <= schedule.bubble(4, 2 if schedule.placement != "single" else 1, 8) <= (4 - 1) / 8
