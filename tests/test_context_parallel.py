"""Context parallelism (parallel.cp): runs against a 1-rank reference, and the combinations refused before launch.

The data-parallel parity layouts (conftest.LAYOUTS) hold the ulysses runs of gpt-tiny (learned positions, plain
multi-head attention) against the shared reference; here a RoPE model with grouped-query attention, whose
positions and KV groups a wrong chunking would break, is held to its own 1-rank reference. Tolerance 1e-5
absolute, as the data-parallel parity tests (float32 rounding of differently ordered sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, assert_losses_match, error_line, fsdp_config, harness, harness_run

from harness.config.checks import validate
from harness.config.compose import compose
from harness.core.errors import ConfigError
from harness.core.registry import CP_KINDS
from harness.costmodel.estimate import estimate, system_peak
from harness.costmodel.layout import Job, job_from_config
from harness.costmodel.peaks import attention_rate
from harness.costmodel.timing import compute_kernels, hardware

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
    (["parallel.cp=2", "parallel.cp_kind=ring", "system.device=cpu", "model.position=rope"], 2, "parallel.cp_kind=ring",
     "use parallel.cp_kind=ulysses"),
    (["parallel.cp=2", "parallel.cp_kind=ring", "model.attention=math", "system.device=cuda",
      "model.position=rope"], 2, "model.attention=math", "model.attention=sdpa"),
    (["parallel.cp=2", "parallel.cp_kind=ring", "system.device=cuda"], 2, "model.position=learned",
     "model.position=rope"),
    (["parallel.cp=2", "parallel.cp_kind=ring", "model.seq_len=130", "system.device=cuda"], 2,
     "model.seq_len=130", "divisible by 4"),
    (["parallel.cp=2", "parallel.cp_kind=zigzag"], 2, "parallel.cp_kind=zigzag", "ulysses, ring"),
    (["parallel.cp=2", "parallel.tp=4"], 8, "over tp*cp=8", "divisors of 1"),
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
    proc = harness(["run", "launcher.nproc=2", "parallel.cp=2", "parallel.cp_kind=ring", "model.position=rope"],
                   cwd=tmp_path, timeout=60)
    line = error_line(proc)
    assert line.startswith("harness: error: parallel.cp_kind=ring on system.device=cpu"), line


def test_a_valid_context_parallel_layout_derives_dp_from_cp() -> None:
    layout = validate(fsdp_config("parallel.cp=2", "train.micro_batch_size=1", "train.global_batch_size=4"), 4)
    assert (layout.cp, layout.dp, layout.grad_accum) == (2, 2, 2)


LONG = ["model=gpt-6.7b", "model.seq_len=32768", "model.position=rope", "system=dgx-h100", "train.precision=bf16"]
"""A long-sequence job for the cost model (RoPE: ring attention needs it)."""


def predicted(*overrides: str, world: int = 64) -> dict:
    cfg = compose([*LONG, "backend=fsdp", "train.global_batch_size=64", f"parallel.world_size={world}", *overrides])
    return estimate(cfg, validate(cfg, world))


def test_each_rank_holds_and_computes_its_chunk_of_the_sequence() -> None:
    """cp ranks share a sequence: a rank stores 1/cp of a recomputed layer's input and, for either kind, computes
    1/cp of the attention; the model's FLOPs per step stay what they are."""
    one, four = predicted("train.activation_checkpointing=full"), predicted(
        "train.activation_checkpointing=full", "parallel.cp=4")
    layer_inputs = [e["memory_per_device_bytes"]["activations"] for e in (one, four)]
    assert layer_inputs[1] < layer_inputs[0] / 3.5
    assert four["flops_per_step"] == one["flops_per_step"]
    for kind in CP_KINDS:
        block, _ = compute_kernels(job_of("parallel.cp=4", f"parallel.cp_kind={kind}"))
        whole, _ = compute_kernels(job_of())
        flops = [sum(k.flops for k in ks if k.kind == "attention") for ks in (block, whole)]
        assert flops[0] == pytest.approx(flops[1] / 4), kind


def test_ring_passes_hide_behind_block_attention_and_ulysses_all_to_alls_do_not() -> None:
    ring = predicted("parallel.cp=8", "parallel.cp_kind=ring")["breakdown_s"]
    assert 0 <= ring["exposed_comm"]["cp"] < ring["comm"]["cp"]
    exposed = predicted("parallel.cp=8", "parallel.cp_kind=ring", "system.overlap_comm=false")["breakdown_s"]
    assert exposed["exposed_comm"]["cp"] == pytest.approx(exposed["comm"]["cp"])
    ulysses = predicted("parallel.cp=8")["breakdown_s"]
    assert ulysses["comm"]["cp"] > 0 and ulysses["exposed_comm"]["cp"] == pytest.approx(ulysses["comm"]["cp"])


def test_ulysses_recompute_of_core_attention_stops_before_the_output_all_to_all() -> None:
    """Per layer and micro-batch Ulysses runs four all-to-alls forward (q, k, v, the output) and four backward. A
    recompute of the attention sub-layer or the block runs all four again; recomputing core attention alone stops
    at the attention's output under PyTorch's early-stopping checkpoint, so its output all-to-all is not re-run (4
    forward and 7 backward, as a 2-rank gloo run of DeepSpeed's DistributedAttention under checkpoint_wrapper
    counts them)."""
    from harness.costmodel.comm import collectives

    def calls(mode: str) -> tuple[float, float]:
        job = job_of("parallel.cp=8", f"train.activation_checkpointing={mode}")
        q_or_out, kv = [c for c in collectives(job) if c.dim == "cp"]
        passes = job.model.n_layers * job.micro_batches
        return q_or_out.calls / passes, kv.calls / passes

    assert calls("none") == (4, 4)
    assert calls("selective") == (5, 6)  # q again, not the output; k and v again
    assert calls("attention") == calls("full") == (6, 6)


def test_ring_gathers_k_and_v_once_per_pass_and_shifts_fp32_gradients_cp_times() -> None:
    """torch 2.13's ring attention (context_parallel's default ALL_GATHER rotation): one all-gather of this rank's K
    and V over the cp group in each forward, backward and recompute, and the K and V gradients passed to the next
    rank cp times in fp32 (convert_to_f32). The gathers hide only behind the first block's attention (1/cp of a
    pass's), the shifts behind the next block's backward, and the last shift of each pass behind nothing."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import collective_s, exposed_cp_s, hardware

    job = job_of("parallel.cp=8", "parallel.cp_kind=ring", "train.activation_checkpointing=selective")
    gather, shift = [c for c in collectives(job) if c.dim == "cp"]
    m, E = job.model, job.act_bytes
    kv = job.tokens * 2 * m.kv_heads * m.head_dim * E  # this rank's K and V, TP 1
    passes = m.n_layers * job.micro_batches
    assert (gather.kind, gather.payload_bytes, gather.calls, gather.group) == ("all_gather", 8 * kv, 3 * passes, 8)
    assert (shift.kind, shift.payload_bytes, shift.calls) == ("send_recv", kv / E * 4, 8 * passes)
    cfg = compose([*LONG, "backend=fsdp"])
    hw = hardware(cfg.system, system_peak(cfg.system, "bf16").tflops)
    timed = [(c, collective_s(c, hw)) for c in (gather, shift)]
    assert passes * timed[1][1] / shift.calls <= exposed_cp_s(timed, job, hw) < sum(t for _, t in timed)
    # the diagonal block a gather hides behind is 1/cp of a pass's attention: at cp = 2 it covers the gathers, at
    # 16 (across two nodes) most of them show
    def gathers_exposed(cp: int) -> float:
        ring = job_of(f"parallel.cp={cp}", "parallel.cp_kind=ring", "train.activation_checkpointing=selective")
        gather, _ = [(c, collective_s(c, hw)) for c in collectives(ring) if c.dim == "cp"]
        return exposed_cp_s([gather], ring, hw) / gather[1]

    assert gathers_exposed(2) == 0.0 and gathers_exposed(16) > 0.5


def test_ring_attends_in_blocks_at_the_block_lengths_measured_rate() -> None:
    """Ring attention runs cp kernels per rank on s/cp-long blocks (the causal diagonal, then unmasked half
    blocks): the fused kernel's rates for those lengths, not the whole sequence's (FlashAttention-2's table,
    harness/costmodel/peaks.py; timing.ring_attention_rate)."""
    from harness.costmodel.timing import ring_attention_rate

    cfg = compose(LONG)
    hw = hardware(cfg.system, system_peak(cfg.system, "bf16").tflops)
    ring, ulysses = job_of("parallel.cp=8", "parallel.cp_kind=ring"), job_of("parallel.cp=8")
    table = hw.attention
    blocks = 1 / (1 / 8 / attention_rate(table, 128, True, 4096) + 7 / 8 / attention_rate(table, 128, False, 2896))
    assert hw.rates(ring).attention_flops == pytest.approx(blocks * 1e12)
    assert ring_attention_rate(table, 128, 32768, 8) == pytest.approx(blocks)
    assert hw.rates(ulysses).attention_flops == attention_rate(table, 128, True, 32768) * 1e12


def job_of(*overrides: str) -> Job:
    cfg = compose([*LONG, "backend=fsdp", "parallel.world_size=64", *overrides])
    return job_from_config(cfg, validate(cfg, 64))


def test_plan_for_a_long_sequence_proposes_context_parallelism_and_says_why(tmp_path: Path) -> None:
    proc = harness(["plan", "model=gpt-6.7b", "model.seq_len=131072", "system=dgx-h100", "parallel.world_size=64",
                    "--json"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert any(r["change"]["parallel"].get("cp", 1) > 1 for r in out["best"]), out["best"]
    why = out["search"]["context_parallel"]
    assert why and "131,072-token sequence is split over" in why, why
    assert "train.global_batch_size unset: planned at 32 sequences" in out["search"]["global_batch"]


@pytest.mark.multirank
def test_the_cpu_miniature_sweep_gives_the_context_view(tmp_path: Path) -> None:
    """long-context-cpu: 2 sequence lengths × cp 1, 2 on 2 ranks; the context view has a row per point, and at
    the longer sequence the ranks that share each sequence hold less at their peak (live tensors, measured)."""
    sweep = tmp_path / "sweep"
    proc = harness(["run", "-m", "+experiment=long-context-cpu", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "report"
    proc = harness(["report", str(sweep), "--view", "context", "--out", str(out), "--format", "json"],
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["seq_len"], r["cp"]): r for r in json.loads(proc.stdout)["context"]}
    assert set(rows) == {(128, 1), (128, 2), (512, 1), (512, 2)}, rows
    assert all(r["status"] == "ok" and r["tokens/s"] > 0 and r["n"] == 3 for r in rows.values()), rows
    assert rows[(512, 2)]["cp kind"] == "ulysses" and rows[(512, 1)]["cp kind"] == "none"
    assert rows[(512, 2)]["memory from"] == "live tensors"
    assert rows[(512, 2)]["memory MB"] < 0.8 * rows[(512, 1)]["memory MB"], rows
    assert rows[(512, 2)]["predicted memory MB"] < rows[(512, 1)]["predicted memory MB"]
    assert (out / "context.png").stat().st_size > 0


def test_ddp_leaves_each_ranks_buffers_its_own() -> None:
    """Ring attention shards the RoPE tables per rank in place (torch's context_parallel over model.rope_cos and
    rope_sin); DDP's default broadcasts rank 0's module buffers before every forward, which would give every rank
    rank 0's positions. The harness's DDP strategy broadcasts none: the model's buffers are functions of its
    config, the same on every rank."""
    import torch

    from harness.backends.ddp import DDPBackend

    cfg = compose(["backend=ddp", "parallel.cp=2", "parallel.cp_kind=ring", "model.position=rope",
                   "system.device=cuda"])
    strategy = DDPBackend(cfg, validate(cfg, 4), torch.device("cpu")).strategy()
    kwargs = strategy._ddp_kwargs
    assert kwargs.get("forward_sync_buffers", kwargs.get("broadcast_buffers")) is False
