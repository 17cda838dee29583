"""Context parallelism (parallel.cp): runs against a 1-rank reference, and the combinations refused before launch.

The data-parallel parity layouts (conftest.LAYOUTS) hold the ulysses runs of gpt-tiny (learned positions, plain
multi-head attention) against the shared reference; here a RoPE model with grouped-query attention, whose
positions and KV groups a wrong chunking would break, is held to its own 1-rank reference. Tolerance 1e-5
absolute, as the data-parallel parity tests (float32 rounding of differently ordered sums).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, assert_losses_match, fsdp_config, harness, harness_run

from harness.config.checks import validate
from harness.core.errors import ConfigError

ROPE_GQA = ["model.position=rope", "model.n_kv_heads=2", "train.global_batch_size=2", "train.precision=fp32",
            "train.micro_batch_size=2"]


@pytest.mark.multirank
def test_ulysses_with_rope_and_grouped_queries_matches_one_rank(tmp_path: Path) -> None:
    reference = harness_run(tmp_path / "one", *TINY, *ROPE_GQA, "launcher.nproc=1")
    ulysses = harness_run(tmp_path / "cp2", *TINY, *ROPE_GQA, "launcher.nproc=2", "parallel.cp=2")
    assert_losses_match(reference, ulysses, 1e-5, "ulysses cp=2, rope, 2 KV heads")
    assert ulysses.summary["layout"]["cp"] == 2 and ulysses.summary["layout"]["dp"] == 1


BAD_CP = [
    (["parallel.cp=3"], 3, "parallel.cp=3", "seq_len divisible by 3"),
    (["parallel.cp=8"], 8, "model.n_heads=4", "divisors of 4"),
    (["parallel.cp=2", "model.n_kv_heads=1"], 2, "model.n_kv_heads=1", "cp_kind=ring"),
    (["parallel.cp=2", "parallel.cp_kind=ring", "system.device=cpu"], 2, "parallel.cp_kind=ring",
     "use parallel.cp_kind=ulysses"),
    (["parallel.cp=2", "parallel.cp_kind=ring", "model.attention=math", "system.device=cuda"], 2,
     "model.attention=math", "model.attention=sdpa"),
    (["parallel.cp=2", "parallel.cp_kind=ring", "model.seq_len=130", "system.device=cuda"], 2,
     "model.seq_len=130", "divisible by 4"),
    (["parallel.cp=2", "parallel.cp_kind=zigzag"], 2, "parallel.cp_kind=zigzag", "ulysses, ring"),
    (["parallel.cp=2", "parallel.tp=2"], 4, "parallel.tp=2", "parallel.cp=1"),
    (["parallel.cp=2", "parallel.pp=2"], 4, "parallel.pp=2", "parallel.cp=1"),
    (["parallel.cp=2"], 3, "parallel.tp*parallel.pp*parallel.cp=2", "divides 3"),
    (["parallel.cp=0"], 1, "parallel.cp=0", "at least 1"),
    (["parallel.cp=2", "backend=deepspeed"], 2, "backend=deepspeed", "backend=ddp or backend=fsdp"),
]


@pytest.mark.parametrize("overrides,world,field,fix", BAD_CP, ids=[b[2] for b in BAD_CP])
def test_bad_context_parallel_layouts_are_refused_in_one_line(overrides: list[str], world: int, field: str,
                                                              fix: str) -> None:
    backend = [o.split("=")[1] for o in overrides if o.startswith("backend=")]
    rest = [o for o in overrides if not o.startswith("backend=")]
    cfg = fsdp_config(*rest, *(f"backend.name={b}" for b in backend))
    with pytest.raises(ConfigError) as info:
        validate(cfg, world)
    message = str(info.value)
    assert "\n" not in message and field in message and fix in message, message


def test_ring_on_a_cpu_fails_on_the_command_line_before_launch(tmp_path: Path) -> None:
    proc = harness(["run", "launcher.nproc=2", "parallel.cp=2", "parallel.cp_kind=ring"], cwd=tmp_path, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("harness: error: parallel.cp_kind=ring on system.device=cpu"), lines[0]


def test_a_valid_context_parallel_layout_derives_dp_from_cp() -> None:
    layout = validate(fsdp_config("parallel.cp=2", "train.micro_batch_size=1", "train.global_batch_size=4"), 4)
    assert (layout.cp, layout.dp, layout.grad_accum) == (2, 2, 2)
