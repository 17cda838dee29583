"""Each mechanism of the cost model's third pass, checked by what it must change (not by a frozen number): a test
here fails when its mechanism is removed.

- network.py: collectives across nodes spread their channels over all of a node's NICs; point-to-point fabrics
  (Frontier's xGMI) give a group the rings its links carry; NVLink SHARP all-reduces inside an NVSwitch node.
- kernels.py: each kernel a roofline; a regular large GEMM at a regular size sweep's measured rate; unfused norms,
  activations and residual adds cost memory time that fusion (torch.compile, Megatron's kernels) removes; attention
  at its measured rate; the optimizer as its implementation streams; a GEMM with a short inner dimension bound by
  its bytes.
- timing.py: compute that a collective overlaps runs slower (its kernels hold SMs).
- memory: the run's check refuses only clear cases and warns in between.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from harness.config.checks import compute_precision, validate
from harness.config.compose import compose
from harness.core.errors import ConfigError
from harness.costmodel import kernels
from harness.costmodel.layout import Job, job_from_config
from harness.costmodel.memory import REFUSE_ABOVE, autocast_weight_copies, layer_activation_bytes, memory_verdict
from harness.costmodel.network import fabric
from harness.costmodel.peaks import lookup_peak
from harness.costmodel.software import PROFILES
from harness.costmodel.timing import compute_kernels, hardware, micro_batch_compute_s, optimizer_s
from harness.models.config import block_linears

GiB = 2**30


def job_and_hw(overrides: list[str], world: int = 1, runs: bool = True) -> tuple[Job, Any]:
    """`runs=False`: a prediction of another framework's run, with the layouts it runs (config.checks.validate)."""
    cfg = compose(overrides)
    peak = lookup_peak(cfg.system.accelerator, compute_precision(cfg)).tflops
    return job_from_config(cfg, validate(cfg, world, runs=runs)), hardware(cfg.system, peak)


# --- network ------------------------------------------------------------------------------------------------------


def test_a_collective_across_nodes_uses_every_nic_of_the_node() -> None:
    """Two nodes of four devices: with four NICs the ring leaves each node on four rails at once, so a large
    all-reduce over all eight ranks is four times as fast as over one NIC (the intra-node links are faster)."""
    system = compose(["system=perlmutter"]).system  # 4 A100 per node, 4 Slingshot NICs
    four = fabric(system)
    one = dataclasses.replace(four, nics=1)
    payload = 4 * GiB
    t4, t1 = four.call_s("all_reduce", payload, 8, 4), one.call_s("all_reduce", payload, 8, 4)
    assert t1 / t4 == pytest.approx(4.0, rel=0.02)
    # A group holding one device per node (data parallelism beside TP 4) owns only its rail: a quarter of them.
    assert four.nic_share(1) == pytest.approx(four.nic_share(4) / 4)


def test_a_group_is_costed_on_the_devices_and_nodes_it_holds() -> None:
    """A data-parallel group beside TP 4 on a Frontier node holds GCDs 0 and 4, which share no xGMI link: its ring
    runs over the widest route between them (50 GB/s), not over the 200 GB/s link between GCDs 0 and 1 (RCCL's
    rome_model_74). A group of 12 on 8-GPU nodes fills one node and half of another, whose four members own half
    its NICs: it is slower per byte than 16 ranks on two whole nodes, not a one-node ring; TP groups that straddle
    nodes are costed across them. An all-to-all across two nodes sends each rank's cross-node half through the
    NICs itself, at least local·(group − local)/group of the payload per node."""
    from harness.costmodel.comm import collectives

    frontier = fabric(compose(["system=frontier"]).system)
    assert frontier.intra_ring(2) == pytest.approx(200e9 * 0.8)  # GCDs 0 and 1: one MI250X's four links
    assert frontier.intra_ring(2, stride=4) == pytest.approx(50e9 * 0.8)  # 0 to 4 over 0-6-4 or 0-2-4: 50 GB/s
    # routes share physical links: a group never gets more than the whole node's rings
    assert all(frontier.intra_ring(k) <= frontier.intra_ring(8) for k in range(2, 9))
    # every rank sends to the one `stride` further at once: the slowest pair paces them (GCD 1 to 2: routed, 50)
    assert frontier.pair_bandwidth(1) == pytest.approx(50e9 * 0.8)
    summit = fabric(compose(["system=summit"]).system)
    assert summit.pair_bandwidth(1) == pytest.approx(32e9 * 0.8)  # GPUs 2 and 3: the X-Bus share between sockets
    job, _ = job_and_hw([*LLAMA, "system=frontier", "parallel.tp=4", "train.global_batch_size=4"], 8)
    (reduce,) = [c for c in collectives(job) if c.dim == "dp"][:1]
    assert (reduce.group, reduce.local, reduce.stride) == (2, 2, 4)
    # TP 4 on Summit's 6 GPUs per node: ranks 4-7 sit 2 and 2 in two nodes, and pace every TP collective
    summit, _ = job_and_hw([*LLAMA, "system=summit", "parallel.tp=4", "train.precision=fp16",
                            "train.global_batch_size=6"], 12)
    (tp,) = {(c.group, c.local, c.intra_node) for c in collectives(summit) if c.dim == "tp"}
    assert tp == (4, 2, False)
    a100 = fabric(compose(["system=dgx-a100-80gb"]).system)
    payload = 1 * GiB
    one_node, twelve, sixteen = (a100.call_s("all_reduce", payload, n, 8) for n in (8, 12, 16))
    assert twelve > sixteen > one_node
    node_nics = a100.nic_share(8)
    assert a100.call_s("all_to_all", payload, 16, 8) >= 8 * (16 - 8) / 16 * payload / node_nics
    assert a100.call_s("all_to_all", payload, 16, 8) > 3 * a100.call_s("all_gather", payload, 16, 8) / 2


def test_point_to_point_links_give_each_group_the_rings_they_carry() -> None:
    """Frontier: the two GCDs of one MI250X share four xGMI links (200 GB/s); GCDs 0 and 2 one link (50 GB/s); a
    ring over all eight finds several channels over the single and double links."""
    net = fabric(compose(["system=frontier"]).system)
    same_package = net.intra_ring(2)
    pair_0_2 = dataclasses.replace(net, links=tuple(tuple(row[i] for i in (0, 2)) for row in
                                                    (net.links[0], net.links[2]))).intra_ring(2)
    assert same_package == pytest.approx(4 * pair_0_2)
    eight = net.intra_ring(8)
    assert pair_0_2 < eight < sum(net.links[0])  # more than one link's worth, less than all of a GCD's links


def test_nvlink_sharp_all_reduces_inside_the_node_faster_than_a_ring() -> None:
    net = fabric(compose(["system=dgx-h100"]).system)
    without = dataclasses.replace(net, nvls_efficiency=None)
    payload = GiB
    assert net.call_s("all_reduce", payload, 8, 8) < 0.8 * without.call_s("all_reduce", payload, 8, 8)
    # Only the all-reduce; across nodes only where the site's network carries NCCL's NVLS tree (below)
    assert net.call_s("all_gather", payload, 8, 8) == without.call_s("all_gather", payload, 8, 8)
    assert net.call_s("all_reduce", payload, 16, 8) < without.call_s("all_reduce", payload, 16, 8)
    local_only = dataclasses.replace(net, nvls_across_nodes=False)
    assert local_only.call_s("all_reduce", payload, 16, 8) == without.call_s("all_reduce", payload, 16, 8)


def test_tree_all_reduce_wins_across_many_nodes_on_latency() -> None:
    """At a small payload over 256 nodes the ring's 2(p-1) hops cost more than the tree's 2·log2(nodes)."""
    net = fabric(compose(["system=polaris"]).system)
    ring_latency = net.base_latency + 2 * (1024 - 1) * min(net.intra_hop, net.inter_hop)  # a lower bound
    assert net.call_s("all_reduce", 1e5, 1024, 4) < ring_latency


def test_each_call_runs_in_the_protocol_its_library_finds_fastest() -> None:
    """NCCL's tuning model (and RCCL's) costs each protocol as latency + volume / bandwidth and picks the fastest: a
    small all-reduce pays LL's latency (the profile's) at a quarter of the bandwidth, a large one Simple's latencies
    (ring base 8.4 µs, 3.4 per NVLink hop) at all of it, LL128 in between; an in-node all-gather's LL gets a third;
    a tree across nodes uses the tree's latencies and shares; point-to-point messages go in LL up to 16 KiB and in
    Simple above, never LL128; RCCL's table (MI250X) has no LL128; gloo keeps one protocol."""
    from harness.costmodel.network import NCCL_PROTOCOLS, P2P_LL_THRESHOLD, RCCL_PROTOCOLS, RING_FACTOR, TREE_BANDWIDTH

    net = fabric(compose(["system=dgx-a100-80gb"]).system)
    assert [p.name for p in net.protocols] == ["LL", "LL128", "Simple"]
    ll, ll128, simple = NCCL_PROTOCOLS
    bw, hops = net.bus_bandwidth(8, 1), 2 * 7

    def ring(p: Any, kind: str, payload: float, steps: int, share: float) -> float:
        return (net.base_latency * p.base + steps * net.intra_hop * p.intra
                + RING_FACTOR[kind](8) * payload / (bw * share))

    assert ring(simple, "all_reduce", GiB, hops, 1.0) == pytest.approx((8.4 + hops * 3.4) * 1e-6 + 1.75 * GiB / bw)
    for payload, fastest, share in ((1e3, ll, 1 / 4), (4e6, ll128, 0.92), (GiB, simple, 1.0)):
        expected = ring(fastest, "all_reduce", payload, hops, share)
        assert net.call_s("all_reduce", payload, 8, 8) == pytest.approx(expected)
        others = [ring(p, "all_reduce", payload, hops, s) for p, s in zip(NCCL_PROTOCOLS, (1 / 4, 0.92, 1.0))]
        assert min(others) == pytest.approx(ring(fastest, "all_reduce", payload, hops, share))
    assert net.call_s("all_gather", 1e3, 8, 8) == pytest.approx(ring(ll, "all_gather", 1e3, 7, 1 / 3))
    # a tree across 64 nodes for a large all-reduce: Simple's tree latencies (4.0 µs per NVLink hop, 14 per network
    # hop) at the tree's 0.92 of the bandwidth
    tree_bw = net.bus_bandwidth(8, 64)
    tree = (net.base_latency * simple.base + 2 * (7 * 4.0e-6 + 6 * 14e-6)  # log2(64) network hops
            + 2 * GiB / (TREE_BANDWIDTH * tree_bw))
    assert net.call_s("all_reduce", GiB, 512, 8) == pytest.approx(tree)
    # point-to-point: LL up to the threshold, Simple above it, even where LL would still be faster (twice over)
    link = net.intra_ring(2)

    def send(p: Any, size: float, share: float) -> float:
        return net.base_latency * p.base + net.intra_hop * p.intra + size / (link * share)

    for size, p, share in ((P2P_LL_THRESHOLD, ll, 1 / 4), (2 * P2P_LL_THRESHOLD, simple, 1.0), (1e6, simple, 1.0)):
        assert net.call_s("send_recv", size, 2, 2) == pytest.approx(send(p, size, share))
    assert send(ll, 2 * P2P_LL_THRESHOLD, 1 / 4) < send(simple, 2 * P2P_LL_THRESHOLD, 1.0)
    rccl = fabric(compose(["system=frontier"]).system)
    assert rccl.protocols == RCCL_PROTOCOLS and [p.name for p in rccl.protocols] == ["LL", "Simple"]
    assert fabric(compose(["system=cpu"]).system).protocols[0].name == "gloo"


def test_a_trees_latency_counts_whole_levels_as_nccl_does() -> None:
    """NCCL prices a tree over n nodes at ⌊log2 n⌋ levels of network latency (log2i): a small all-reduce over 64,
    96 or 127 nodes pays the same latency, over 128 one level more."""
    f = fabric(compose(["system=dgx-h100"]).system)
    small = {n: f.call_s("all_reduce", 1024.0, n * 8, 8) for n in (64, 96, 127, 128)}
    assert small[64] == small[96] == small[127] < small[128]


def test_nccls_own_corrections_slow_medium_trees_and_multi_node_simple_rings() -> None:
    """NCCL's tuning model corrects its tree bandwidth for medium sizes (`treeCorrectionFactor`, by log2 of the bytes
    over 64, up to 256 MiB: Simple's 0.9 at 128 MiB) and multiplies a multi-node Simple ring all-reduce's latency
    by 1.4 from Ampere on, 1.9 on Volta ("plateau effect of ring"); neither inside one node, nor for RCCL."""
    from harness.costmodel.network import NCCL_PROTOCOLS, TREE_BANDWIDTH

    _, _, simple = NCCL_PROTOCOLS
    assert simple.tree_factor(128 * 2**20) == 0.9 and simple.tree_factor(GiB) == 1.0
    net = fabric(compose(["system=dgx-a100-80gb"]).system)
    plain = tuple(dataclasses.replace(p, tree_correction=(), ring_plateau=False) for p in NCCL_PROTOCOLS)
    uncorrected = dataclasses.replace(net, protocols=plain)
    payload, bw = 128 * 2**20, net.bus_bandwidth(8, 64)
    corrected = net.call_s("all_reduce", payload, 512, 8)
    assert corrected > uncorrected.call_s("all_reduce", payload, 512, 8)
    tree = (net.base_latency * simple.base + 2 * (7 * 4.0e-6 + 6 * 14e-6)
            + 2 * payload / (TREE_BANDWIDTH * bw * 0.9))
    assert corrected <= tree * (1 + 1e-9)  # Simple's corrected tree, or a protocol NCCL finds faster
    assert net.call_s("all_reduce", GiB, 512, 8) == uncorrected.call_s("all_reduce", GiB, 512, 8)  # past the table
    # the plateau: a ring's latency, only across nodes (two nodes: the ring of 16 against the tree)
    ring_only = dataclasses.replace(net, protocols=(simple,))
    flat = dataclasses.replace(ring_only, protocols=(dataclasses.replace(simple, ring_plateau=False),))
    assert ring_only.ring_plateau == 1.4 and fabric(compose(["system=summit"]).system).ring_plateau == 1.9
    ring_latency = (net.base_latency * simple.base + 28 * net.intra_hop * simple.intra  # 2·15 steps, 2 of them
                    + 2 * net.inter_hop * simple.inter)                                   # between the nodes
    ring = ring_latency + 2 * 15 / 16 * 4 * GiB / net.bus_bandwidth(8, 2)
    assert flat.call_s("all_reduce", 4 * GiB, 16, 8) == pytest.approx(ring)  # the ring beats the tree here
    assert ring_only.call_s("all_reduce", 4 * GiB, 16, 8) == pytest.approx(ring + 0.4 * ring_latency)
    assert ring_only.call_s("all_reduce", GiB, 8, 8) == flat.call_s("all_reduce", GiB, 8, 8)
    assert fabric(compose(["system=frontier"]).system).ring_plateau == 1.0


def test_no_ll128_across_nodes_where_a_gpu_reaches_its_nic_through_the_cpu() -> None:
    """NCCL offers LL128 to a collective spanning nodes only where the GPU-to-NIC path is PXB or nearer (PXN from
    Hopper on). Polaris's NICs hang off the CPU (PHB), so a medium all-reduce across its nodes runs in Simple or LL
    and is slower than with LL128; inside a node, and on a node whose NICs share a PCIe switch, nothing changes."""
    from harness.core.errors import ConfigError

    polaris = compose(["system=polaris"]).system
    net = fabric(polaris)
    assert polaris.nic_gpu_path == "PHB" and not net.ll128_across_nodes
    with_ll128 = dataclasses.replace(net, ll128_across_nodes=True)
    payload = 128 * 2**20
    assert net.call_s("all_reduce", payload, 1024, 4) > with_ll128.call_s("all_reduce", payload, 1024, 4)
    assert net.call_s("all_reduce", payload, 4, 4) == with_ll128.call_s("all_reduce", payload, 4, 4)
    a100 = compose(["system=dgx-a100-80gb", "system.nic_gpu_path=PXB"]).system
    assert fabric(a100).ll128_across_nodes
    assert not fabric(compose(["system=dgx-a100-80gb", "system.nic_gpu_path=PXN"]).system).ll128_across_nodes
    assert fabric(compose(["system=dgx-h100", "system.nic_gpu_path=PXN"]).system).ll128_across_nodes
    with pytest.raises(ConfigError, match="system.nic_gpu_path=PCI"):
        validate(compose(["system=polaris", "system.nic_gpu_path=PCI"]), 1)


def test_a_trees_pipeline_fills_and_drains_one_chunk_time_per_level() -> None:
    """A tree all-reduce ends 2 × depth chunk times after its bandwidth term: each channel's chunk crosses the
    node's chain (nRanks/nNodes − 1 hops) and ⌊log2 nodes⌋ levels up, then back down, at the channel's share of
    each hop's bandwidth. With Polaris's 4 channels, 256 nodes of 4: 2 × (3 intra + 8 inter hops) of a 512 KiB
    Simple chunk. A channel never moves more than its share of the call, so a small call fills in little time.
    Where the channel count is not known, nothing is added, nor under gloo; a ring (8 nodes) has no such fill."""
    from harness.core.errors import ConfigError
    from harness.costmodel.network import GLOO_PROTOCOLS, NCCL_PROTOCOLS, RCCL_PROTOCOLS

    net = fabric(compose(["system=polaris"]).system)
    unknown = dataclasses.replace(net, channels=None)
    simple = next(p for p in NCCL_PROTOCOLS if p.name == "Simple")
    ll128 = next(p for p in NCCL_PROTOCOLS if p.name == "LL128")
    assert net.channels == 4 and simple.chunk == 512 * 1024
    payload = 128 * 2**20
    fill = 2 * 512 * 1024 * 4 * (3 / net.intra_ring(4) + 8 / net.nic_share(4))
    assert net.tree_fill_s(simple, payload, 1024, 4) == pytest.approx(fill)
    assert net.call_s("all_reduce", payload, 1024, 4) == pytest.approx(
        unknown.call_s("all_reduce", payload, 1024, 4) + fill)
    assert unknown.tree_fill_s(simple, payload, 1024, 4) == 0.0
    assert net.call_s("all_reduce", payload, 32, 4) == unknown.call_s("all_reduce", payload, 32, 4)  # a ring
    # 1 KiB: each channel holds 256 bytes, its whole chunk, so the fill is 2·11 hops of 256 bytes
    assert net.tree_chunk(simple, 1024, 1024, 256) == 256
    assert net.tree_fill_s(simple, 1024, 1024, 4) == pytest.approx(fill * 256 / (512 * 1024))
    # NCCL's depth counts nRanks // nNodes: 10 ranks at 4 per node are a chain of 2 hops on 3 nodes, not 3
    assert net.tree_fill_s(simple, payload, 10, 4) == pytest.approx(
        2 * 512 * 1024 * 4 * (2 / net.intra_ring(4) + 1 / net.nic_share(2)))
    assert dataclasses.replace(net, protocols=GLOO_PROTOCOLS).tree_fill_s(GLOO_PROTOCOLS[0], payload, 1024, 4) == 0
    # NCCL halves an LL128 tree's chunk while a channel's share is short of (1 + log2 nodes + 0.1·ppn)·64/ppn chunks
    assert ll128.chunk == 576000 and net.tree_chunk(ll128, 1 << 30, 1024, 256) == 576000
    # 64 MiB: 29 chunks a channel, short of 9.4·64/4 = 150.4, so halved while above 128 KiB: 288,000, 144,000, 72,000
    assert net.tree_chunk(ll128, 64 * 2**20, 1024, 256) == 72000
    # RCCL (as NCCL up to 2.19) halves a Simple tree's chunk while a channel holds fewer than 8 × depth of them
    rccl = next(p for p in RCCL_PROTOCOLS if p.name == "Simple")
    assert net.tree_chunk(rccl, 1 << 30, 1024, 256) == 512 * 1024
    assert net.tree_chunk(rccl, 128 * 2**20, 1024, 256) == 256 * 1024  # 64 chunks < 8 × 11; 128 ≥ 88
    with pytest.raises(ConfigError, match="system.coll_channels=0"):
        validate(compose(["system=polaris", "system.coll_channels=0"]), 1)


# --- kernels ------------------------------------------------------------------------------------------------------

LLAMA = ["system=dgx-h100", "model.d_model=4096", "model.n_layers=4", "model.n_heads=32", "model.n_kv_heads=8",
         "model.ffn_hidden=14336", "model.vocab_size=128256", "model.seq_len=4096", "model.activation=swiglu",
         "model.norm=rmsnorm", "model.position=rope", "model.tie_embeddings=false", "model.bias=false",
         "train.precision=bf16", "train.micro_batch_size=2", "backend=fsdp"]


def memory_s(job: Job, hw: Any) -> float:
    block, _ = compute_kernels(job)
    rates = hw.rates(job)
    return sum(kernels.kernel_s(k, rates) for k in block if k.kind == "memory")


def test_unfused_norms_and_elementwise_kernels_cost_memory_time_and_fusion_removes_it() -> None:
    eager, hw = job_and_hw(LLAMA)
    compiled, _ = job_and_hw([*LLAMA, "train.compile=true"])
    assert memory_s(eager, hw) > 1.5 * memory_s(compiled, hw) > 0
    names = {k.name for k in compute_kernels(eager)[0]}
    assert {"norm1", "norm2", "rope"} <= names
    assert not {"norm1", "norm2"} & {k.name for k in compute_kernels(compiled)[0]}
    # Memory time scales with the bandwidth: half of it costs the eager block more than the compiled one.
    slow = dataclasses.replace(hw, memory_bw=hw.memory_bw / 2)
    eager_cost = micro_batch_compute_s(eager, slow) - micro_batch_compute_s(eager, hw)
    compiled_cost = micro_batch_compute_s(compiled, slow) - micro_batch_compute_s(compiled, hw)
    assert eager_cost > compiled_cost > 0


def test_the_copies_a_frameworks_reshapes_make_cost_memory_time() -> None:
    """nanotron permutes its merged q/k/v output into contiguous q, k and v, concatenates k and v for the rotary
    kernel, hands o_proj a sequence-first input that F.linear copies (at micro-batch > 1), and splits its merged
    gate/up output, whose backward concatenates the gradients: each a pass over the activations that a framework
    without them does not make."""
    nanotron = [*LLAMA, "costmodel.software=nanotron", "train.micro_batch_size=2"]
    job, hw = job_and_hw(nanotron)
    plain = dataclasses.replace(job, software=dataclasses.replace(
        job.software, attention_reshape_passes=(0.0, 0.0), seq_first_proj_copy=False, split_glu=False))
    block = {k.name: k for k in compute_kernels(job)[0]}
    tokens, h, ffn, E = job.tokens, job.model.d_model, job.model.ffn_width, job.act_bytes
    assert block["attention reshapes"].bytes == pytest.approx(tokens * h * (14 + 16) * E)
    assert block["attention reshapes"].count == 5 + 3  # the kernels those copies launch, each with its startup
    script, _ = job_and_hw([*GPT, "costmodel.software=pytorch-autocast-script"])
    assert block_kernels(script)["attention reshapes"].count == 9  # all in the backward: none for a forward pass
    assert not any(k.name == "attention reshapes" for k in kernels.layer_kernels(script, backward=False))
    assert block["proj input copy"].bytes == pytest.approx(tokens * h * 6 * E)
    plain_block = {k.name: k for k in compute_kernels(plain)[0]}
    assert block["activation"].bytes - plain_block["activation"].bytes == pytest.approx(tokens * ffn * 4 * E)
    assert micro_batch_compute_s(job, hw) > micro_batch_compute_s(plain, hw)
    one, _ = job_and_hw([*nanotron, "train.micro_batch_size=1"])
    assert "proj input copy" not in {k.name for k in compute_kernels(one)[0]}  # a size-1 transpose is contiguous


GPT = ["system=dgx-h100", "model.d_model=2048", "model.n_layers=4", "model.n_heads=16", "model.ffn_hidden=8192",
       "model.vocab_size=32000", "model.seq_len=1024", "model.activation=gelu", "model.norm=layernorm",
       "model.position=learned", "model.tie_embeddings=false", "model.bias=true", "train.precision=bf16",
       "train.micro_batch_size=4", "backend=ddp"]


def block_kernels(job: Job) -> dict[str, kernels.Kernel]:
    return {k.name: k for k in compute_kernels(job)[0]}


def test_eager_bias_gradients_read_each_output_gradient_once_more_and_compiling_fuses_them() -> None:
    """PyTorch's addmm backward sums the output gradient over the tokens for the bias (tools/autograd/
    derivatives.yaml), a kernel of its own in eager mode: one more read of each linear's output gradient, split as
    TP splits the output (a row-parallel bias is added after the reduction, over the whole width, or over 1/TP of
    the tokens with sequence parallelism). Without biases there is none; torch.compile fuses it."""
    biased, hw = job_and_hw(GPT)
    tokens, h, ffn, E = biased.tokens, biased.model.d_model, biased.model.ffn_width, biased.act_bytes
    assert block_kernels(biased)["bias grads"].bytes == pytest.approx(tokens * (3 * h + h + ffn + h) * E)
    unbiased, _ = job_and_hw([*GPT, "model.bias=false"])
    assert "bias grads" not in block_kernels(unbiased)
    assert micro_batch_compute_s(biased, hw) > micro_batch_compute_s(unbiased, hw)
    assert "bias grads" not in block_kernels(job_and_hw([*GPT, "train.compile=true"])[0])
    tp = [*GPT, "backend=fsdp", "parallel.tp=2"]
    split, _ = job_and_hw([*tp, "parallel.sequence_parallel=false"], world=2)
    assert block_kernels(split)["bias grads"].bytes == pytest.approx(tokens * (3 * h / 2 + h + ffn / 2 + h) * E)
    sp, _ = job_and_hw([*tp, "parallel.sequence_parallel=true"], world=2)
    assert block_kernels(sp)["bias grads"].bytes == pytest.approx(tokens * (3 * h + h + ffn + h) / 2 * E)


def test_autocast_keeps_the_residual_stream_in_fp32_and_casts_each_weight_and_its_gradient() -> None:
    """Under torch.autocast over fp32 weights (the harness's DDP, a plain PyTorch script) the residual stream is
    fp32: norms and residual adds move 4-byte elements, each norm's output is cast for the linear after it, autograd
    casts the branch's gradient down at each residual add and each weight's gradient back to fp32. 16-bit weights
    (DeepSpeed, FSDP2's param_dtype) have none of it, and neither has an fp32 run."""
    amp, hw = job_and_hw(GPT)
    assert amp.software.autocast_casts
    plain = dataclasses.replace(amp, software=dataclasses.replace(amp.software, autocast_casts=False))
    tokens, h, E = amp.tokens, amp.model.d_model, amp.act_bytes
    a, p = block_kernels(amp), block_kernels(plain)
    assert a["residual1"].bytes == pytest.approx(tokens * h * ((2 * 4 + E) + (3 * 4 + 4 + E)))
    assert p["residual1"].bytes == pytest.approx(tokens * h * 6 * E)
    assert a["norm1"].bytes == pytest.approx(tokens * h * (7 * 4 + 2 * (4 + E)))
    assert p["norm1"].bytes == pytest.approx(tokens * h * 7 * E)
    weights = sum(spec.n_in * spec.n_out for spec in block_linears(amp.model))
    assert a["weight casts"].bytes == pytest.approx(weights * (4 + E) * 2)
    assert "weight casts" not in p
    assert micro_batch_compute_s(amp, hw) > micro_batch_compute_s(plain, hw)
    recompute = {k.name: k for k in kernels.layer_kernels(amp, backward=False)}
    assert recompute["weight casts"].bytes == pytest.approx(weights * (4 + E))  # a forward casts the weights once
    fp32, _ = job_and_hw([*GPT, "train.precision=fp32"])
    assert "weight casts" not in block_kernels(fp32)
    assert block_kernels(fp32)["residual1"].bytes == pytest.approx(tokens * h * 6 * 4)
    # memory: the norms save their fp32 inputs, a checkpoint is the fp32 stream, the linears save 16-bit weights
    sbh = tokens * h
    assert (layer_activation_bytes(amp, "none") - layer_activation_bytes(plain, "none")
            == pytest.approx(2 * (4 - E) * sbh))
    assert layer_activation_bytes(amp, "full") == pytest.approx(4 * sbh)
    head = amp.model.vocab_size * h
    assert autocast_weight_copies(amp) == pytest.approx((amp.model.n_layers * amp.block_params_per_rank + head) * E)
    full, _ = job_and_hw([*GPT, "train.activation_checkpointing=full"])
    assert autocast_weight_copies(full) == pytest.approx(head * E)  # recomputed blocks save none
    assert autocast_weight_copies(plain) == autocast_weight_copies(fp32) == 0


def test_a_norms_weight_gradient_is_a_second_pass_unless_its_kernel_writes_partial_sums() -> None:
    """PyTorch's native LayerNorm/RMSNorm on a GPU and apex's fused norm compute the weight's gradient in a second
    kernel that reads the output gradient and the input again (5 passes in the backward); flash-attn's Triton norm
    (nanotron), Transformer Engine's and PyTorch's CPU kernel write partial sums from the input gradient's pass (3)."""
    native, _ = job_and_hw([*LLAMA, "costmodel.software=harness-fsdp"])
    triton, _ = job_and_hw([*LLAMA, "costmodel.software=nanotron", "backend=deepspeed3d"])
    assert triton.software.norm_grads_in_one_kernel and not native.software.norm_grads_in_one_kernel
    elements, E = native.tokens * native.model.d_model, native.act_bytes
    assert block_kernels(native)["norm1"].bytes == pytest.approx(elements * (2 + 5) * E)
    assert block_kernels(triton)["norm1"].bytes == pytest.approx(elements * (2 + 3) * E)
    assert block_kernels(native)["norm1"].count == 3 and block_kernels(triton)["norm1"].count == 2
    cfg = compose([*LLAMA, "costmodel.software=harness-fsdp", "system=cpu", "train.precision=fp32"])
    cpu = job_from_config(cfg, validate(cfg, 1))
    assert block_kernels(cpu)["norm1"].bytes == pytest.approx(elements * (2 + 3) * 4)


def test_attention_runs_at_the_devices_measured_flash_attention_rate() -> None:
    job, hw = job_and_hw(LLAMA)
    rates = hw.rates(job)
    assert rates.attention_flops is not None and rates.attention_flops < rates.gemm_flops
    attention = next(k for k in compute_kernels(job)[0] if k.kind == "attention")
    assert kernels.kernel_s(attention, rates) == pytest.approx(attention.flops / rates.attention_flops
                                                        + attention.count * rates.startup_s)
    unmeasured = dataclasses.replace(hw, attention=())
    assert unmeasured.rates(job).attention_flops is None
    assert micro_batch_compute_s(job, unmeasured) < micro_batch_compute_s(job, hw)


def test_sdpa_on_hopper_runs_cudnns_attention_where_the_run_did() -> None:
    """PyTorch's SDPA prefers cuDNN's fused attention on Hopper, and KempnerForge, which leaves it the choice, ran
    cuDNN's kernels (its trace); FlashAttention-3's figure timed cuDNN's forward at 1.6x FlashAttention-2's at head
    dim 128 and 4k tokens, causal, on an H100. A profile that calls FlashAttention keeps its rate, as does a head
    dimension cuDNN is not given (over 128) and an A100 (no cuDNN rate measured; PyTorch does not prefer it);
    `costmodel.attention_kernel` states what a run recorded."""
    def attention_s(overrides: list[str]) -> float:
        job, hw = job_and_hw([*LLAMA, "model.seq_len=4096", *overrides])
        attention = next(k for k in compute_kernels(job)[0] if k.kind == "attention")
        return kernels.kernel_s(attention, hw.rates(job)) - attention.count * hw.startup_s

    flash, cudnn = attention_s([]), attention_s(["costmodel.software=kempnerforge"])
    assert flash / cudnn == pytest.approx(518 / 319, rel=0.01)  # 128 head dim, causal, 4k: cuDNN's forward over FA2's
    assert attention_s(["costmodel.attention_kernel=cudnn"]) == pytest.approx(cudnn, rel=0.01)
    # megatron-core's Transformer Engine attention prefers cuDNN's on Hopper too (get_attention_backend)
    assert attention_s(["costmodel.software=megatron-lm"]) == pytest.approx(cudnn, rel=0.01)
    assert attention_s(["costmodel.software=kempnerforge", "costmodel.attention_kernel=flash"]) == pytest.approx(
        flash, rel=0.01)
    wide = ["model.n_heads=16", "model.n_kv_heads=4"]  # head dim 256: FlashAttention-2 runs
    assert attention_s([*wide, "costmodel.attention_kernel=cudnn"]) == pytest.approx(attention_s(wide))
    a100 = ["system=dgx-a100-80gb"]
    assert attention_s([*a100, "costmodel.software=kempnerforge"]) == pytest.approx(attention_s(a100))
    with pytest.raises(ValueError, match="attention_kernel"):
        dataclasses.replace(PROFILES["kempnerforge"], attention_kernel="flash3")
    with pytest.raises(ConfigError, match="costmodel.attention_kernel=flash3"):
        job_and_hw([*LLAMA, "costmodel.attention_kernel=flash3"])


def test_transformer_engine_gives_cudnn_heads_up_to_256_on_hopper_where_sdpa_stops_at_128() -> None:
    """Nemotron-4 340B's head dimension is 192: megatron-core's Transformer Engine attention runs cuDNN's kernel on
    an H100 there (nvte_get_fused_attn_backend: up to 256 on sm90 with cuDNN 9), PyTorch's SDPA FlashAttention-2."""
    def attention_s(overrides: list[str]) -> float:
        job, hw = job_and_hw([*LLAMA, "model.seq_len=4096", "model.n_heads=16", "model.d_model=3072",
                              "model.n_kv_heads=8", *overrides])
        attention = next(k for k in compute_kernels(job)[0] if k.kind == "attention")
        return kernels.kernel_s(attention, hw.rates(job)) - attention.count * hw.startup_s

    flash = attention_s(["costmodel.attention_kernel=flash"])
    assert attention_s(["costmodel.attention_kernel=cudnn"]) == pytest.approx(flash)  # SDPA: head dim 192 > 128
    assert attention_s(["costmodel.software=megatron-lm", "backend=deepspeed3d"]) < 0.8 * flash
    assert PROFILES["megatron-lm"].cudnn_head_dim_max == 256 and PROFILES["kempnerforge"].cudnn_head_dim_max == 128


MCORE = [*LLAMA, "backend=deepspeed3d", "parallel.zero_stage=1", "costmodel.software=megatron-lm"]


def test_megatron_copies_q_k_v_into_transformer_engines_layout_unless_they_stay_packed() -> None:
    """megatron-core hands Transformer Engine q, k and v as views of the fused QKV output: grouped queries with
    more than one KV group on the rank are merged by a copy, fused RoPE's bshd format makes v contiguous, and the
    backward concatenates dq, dk and dv; GPT-3's packed q/k/v (no groups, no RoPE) are copied nowhere, nor are
    any in software that lays them out itself."""
    from harness.costmodel.kernels import qkv_layout_kernels

    def copies(*extra: str, world: int = 1) -> tuple[float, float, Job]:
        job = job_and_hw([*MCORE, *extra], world, runs=False)[0]
        found = qkv_layout_kernels(job, fwd_only=False)
        return (found[0].bytes, found[0].count, job) if found else (0.0, 0.0, job)

    both, count, job = copies()  # 32 heads over 8 KV groups on one rank
    assert any(k.name == "qkv layout copies" for k in compute_kernels(job)[0])
    q = job.tokens * 32 * 128
    kv = job.tokens * 8 * 128
    assert both == pytest.approx((2 * q + 2 * kv + 2 * (q + 2 * kv)) * 2) and count == 3
    one_group, count, _ = copies("parallel.tp=8", "parallel.sequence_parallel=true", world=8)  # 1 KV group a rank
    assert one_group == pytest.approx((2 * kv + 2 * (q + 2 * kv)) / 8 * 2) and count == 2
    assert copies("model.n_kv_heads=32", "model.position=learned")[0] == 0.0  # packed: sbh3d
    assert copies("costmodel.software=megatron-lm-2021")[0] == 0.0


def test_a_rings_copies_casts_and_merges_beside_its_attention_calls_are_priced() -> None:
    """Transformer Engine's AttnFuncWithCPAndKVP2P concatenates K and V for each send, corrects the output and the
    softmax statistics at every step and accumulates dq, dk and dv step by step; torch's ring casts each step's
    output to fp32, merges it into the running one (_SDPAMerger) and accumulates the gradients in fp32 buffers:
    memory-bound kernels in every layer's attention, more per token the more steps; none without a ring."""
    from harness.costmodel.kernels import ring_attention_kernels

    def job_of(cp: int, *extra: str) -> Job:
        return job_and_hw([*MCORE, "model.seq_len=8192", f"parallel.cp={cp}", "parallel.cp_kind=ring",
                           "train.global_batch_size=2", *extra], cp, runs=False)[0]

    two = job_of(2)
    q, kv, lse, E = two.tokens * 32 * 128, 2 * two.tokens * 8 * 128, two.tokens * 32, 2
    te0 = (5.5 * q + 2 * kv) * E + 56 * lse + (3.5 * q + 10.5 * kv) * E + 4 * lse  # rank 0, forward + backward
    te1 = (7 * q + 2 * kv) * E + 68 * lse + (5 * q + 9 * kv) * E + 4 * lse  # rank 1
    (te,) = ring_attention_kernels(two, fwd_only=False)
    assert te.bytes == pytest.approx((te0 + te1) / 2) and te.count == pytest.approx(8 + (10 + 8) / 2)
    assert te in compute_kernels(two)[0]  # part of the layer, not beside it
    torch_job = job_of(2, "costmodel.software=harness-fsdp", "backend=fsdp", "parallel.zero_stage=0")
    (merges,) = ring_attention_kernels(torch_job, fwd_only=False)
    # rank 0 (its later step on half of q) and rank 1 (on all of it): forward, then backward
    fwd0 = 2 * kv * E + (E + 4) * q + ((E + 4 + 32) / 2 + 8) * q + (4 + E) * q + 36 * lse
    fwd1 = 2 * kv * E + (E + 4) * q + (E + 4 + 32) * q + (4 + E) * q + 56 * lse
    common = 4 * (q + kv) + 2 * kv * E + (8 + E) * (q + kv) + 2 * 8 * kv + (4 + E) * (q + kv)
    # rank 0's backward also copies each step's output slice contiguous for the flash backward (2E, E on a half)
    bwd0 = common + (8 + E) * kv + ((8 + E) / 2 + 8) * q + 4 * lse + 2 * E * q + E * q
    bwd1 = common + ((8 + E) / 2 + 8) * kv + (8 + E) * q
    assert merges.bytes == pytest.approx((fwd0 + fwd1 + bwd0 + bwd1) / 2)
    assert merges in compute_kernels(torch_job)[0]
    four = job_of(4)
    assert ring_attention_kernels(four, False)[0].bytes / four.tokens > te.bytes / two.tokens  # more steps
    assert ring_attention_kernels(job_and_hw(MCORE, 1, runs=False)[0], fwd_only=False) == []


def test_megatrons_fused_loss_reads_the_logits_in_four_kernels() -> None:
    """megatron-core's cross_entropy_loss_fusion (on in NeMo's GPTConfig) compiles the vocab-parallel loss into
    four kernels, 28 + 2E bytes per logit, where the eager one runs eight at 48 + 2E; Megatron-LM leaves it off."""
    from harness.costmodel.kernels import head_kernels

    def loss(*extra: str) -> kernels.Kernel:
        job = job_and_hw([*MCORE, *extra], 1, runs=False)[0]
        return next(k for k in head_kernels(job) if k.name == "cross entropy")

    eager, fused = loss(), loss("costmodel.cross_entropy_loss_fusion=true")
    assert eager.count == 8 and fused.count == 4
    assert fused.bytes / eager.bytes == pytest.approx((28 + 4) / (48 + 4))


def test_a_load_balanced_ring_prices_its_diagonal_step_causal_and_the_rest_as_unmasked_half_blocks() -> None:
    """Ring attention over cp ranks with the sequence in 2·cp chunks: each rank's first step attends its own chunk
    pair under the causal mask (1/cp of its work), every other step an unmasked block of half the queries or keys
    (torch's _templated_ring_attention, Transformer Engine's AttnFuncWithCPAndKVP2P). Each at its measured rate, so
    a rank's attention runs below the unmasked rate at s/cp that a ring of whole blocks would get."""
    from harness.costmodel.peaks import attention_rate
    from harness.costmodel.timing import ring_attention_rate

    for cp in (2, 4):
        job, hw = job_and_hw([*LLAMA, "model.seq_len=8192", f"parallel.cp={cp}", "parallel.cp_kind=ring",
                              "train.global_batch_size=2"], cp)
        table, block = hw.attention, 8192 // cp
        causal, unmasked = attention_rate(table, 128, True, block), attention_rate(table, 128, False, block // 2)
        assert causal is not None and unmasked is not None
        expected = 1 / ((1 / cp) / causal + (1 - 1 / cp) / attention_rate(table, 128, False, int(block / 2 ** 0.5)))
        assert hw.rates(job).attention_flops == pytest.approx(expected * 1e12)
        assert hw.rates(job).attention_flops < attention_rate(table, 128, False, block) * 1e12
        assert ring_attention_rate(table, 128, 8192, cp) == pytest.approx(expected)
    whole, hw = job_and_hw([*LLAMA, "model.seq_len=8192"])
    assert hw.rates(whole).attention_flops == pytest.approx(attention_rate(hw.attention, 128, True, 8192) * 1e12)


def test_a_gpu_runs_prediction_prices_the_attention_kernel_its_sdpa_ran() -> None:
    """A run records which kernel PyTorch's SDPA dispatcher picked on its GPU for its shapes (kernels.attention.
    sdpa_kernel, torch's SDPBackend names); its summary's prediction prices that kernel where the model prices it,
    the config names none and the profile assumed another (cuDNN's on Hopper with a recent PyTorch). Faked here:
    the recorded choice (no GPU); torch.device("cuda") needs none."""
    import torch

    from harness.costmodel.estimate import estimate, predicted_metrics
    from harness.run.rundir import _on_this_device

    def predicted(overrides: list[str], recorded: Optional[str], device: str = "cuda") -> float:
        cfg = compose([*LLAMA, *overrides])
        layout = validate(cfg, 1)
        before = predicted_metrics(estimate(cfg, layout))
        after = _on_this_device(before, cfg, layout, torch.device(device), {"attention": {"sdpa_kernel": recorded}})
        return after["iter_time_ms"] / before["iter_time_ms"]

    assert predicted([], "CUDNN_ATTENTION") < 0.99  # harness-fsdp priced FlashAttention-2; cuDNN ran
    assert predicted(["costmodel.software=kempnerforge"], "FLASH_ATTENTION") > 1.01  # the other way round
    for overrides, recorded, device in (([], "FLASH_ATTENTION", "cuda"), ([], "EFFICIENT_ATTENTION", "cuda"),
                                        ([], "MATH", "cuda"), ([], None, "cuda"), ([], "CUDNN_ATTENTION", "cpu"),
                                        (["costmodel.attention_kernel=flash"], "CUDNN_ATTENTION", "cuda"),
                                        (["model.attention=math"], "CUDNN_ATTENTION", "cuda")):
        assert predicted(overrides, recorded, device) == 1.0, (overrides, recorded, device)


def test_a_gemm_with_a_short_inner_dimension_is_bound_by_its_bytes() -> None:
    rates = kernels.Rates(gemm_flops=800e12, gemm_half_flops=0.0, memory_bw=3e12, attention_flops=None)
    scores = kernels.gemm("qk", 4096, 64, 4096, 2.0)  # one head's QKᵀ: 2·4096²·64 FLOPs over ~34 MB
    assert kernels.kernel_s(scores, rates) == pytest.approx(scores.bytes / rates.memory_bw)
    square = kernels.gemm("fc", 4096, 4096, 4096, 2.0)
    assert kernels.kernel_s(square, rates) == pytest.approx(square.flops / rates.gemm_flops)


def test_a_regular_large_gemm_runs_at_a_regular_sweeps_rate_not_at_the_best_shapes() -> None:
    """A training step's GEMMs are regular shapes, not the best shape an exhaustive search finds (MAMF: A100 271.2,
    MI250X 147.0 TFLOP/s). EleutherAI/cookbook's torch.mm sweep (sizing/results/gemm_data/mm/m_sweep at 27dff48)
    measured 251.5 on an A100 at 8192x4096x8192 and 103.8 and 97.1 on one MI250X GCD at 4096^3 and
    8192x4096x8192: the model predicts those shapes within 8%, and at least 5% below the best shape's rate."""
    measured = {("dgx-a100-80gb", 8192, 4096, 8192): 251.5, ("frontier", 4096, 4096, 4096): 103.8,
                ("frontier", 8192, 4096, 8192): 97.1}
    for (system, m, k, n), tflops in measured.items():
        job, hw = job_and_hw([f"system={system}", "train.precision=fp16"])  # the sweep's dtype
        gemm = kernels.gemm("mm", m, k, n, 2.0)
        predicted = gemm.flops / kernels.kernel_s(gemm, hw.rates(job)) / 1e12
        assert predicted == pytest.approx(tflops, rel=0.08), (system, m, k, n, predicted)
        assert predicted < 0.95 * {"dgx-a100-80gb": 271.2, "frontier": 147.0}[system]  # the best shape's rate


XLA_SM90 = Path(__file__).parent / "data" / "xla_sm90_bf16_gemm.csv"
"""XLA's autotuned bf16 GEMM table for sm_90 (ROCm/xla at d02afb4), its 81 shapes with M, N, K >= 1024."""


def test_a_gemms_library_picks_the_tile_that_fills_the_gpu_and_a_short_inner_dimension_costs_per_tile() -> None:
    """A small output does not leave most of an H100 idle: its library picks smaller tiles that fill the 132 SMs
    in fewer wasted waves (XLA's table: a 1024x2048 output at K = 4096 runs at 666 TFLOP/s, where one wave of 64
    256x128 tiles would allow at most 48% of the large rate); and each tile pays a fixed cost beside its inner loop,
    so a 4096x4096 output slows from 780 at K = 4096 to 685 at K = 1024. With Hopper's tiles and inner cost the
    table's 81 shapes with M, N, K >= 1024 read within 6% on average and 20% at worst; one 256x128 tile and no inner
    cost read 13.8%, and 64% at worst. The rate stays the measured one at the reference shape (8192^3), and at
    12288^3 comes within 2% of what pranjalssh/fast.cu measured through cuBLAS (823 TFLOP/s, README.md at af9ce16).
    These are short benchmarks' rates: the GPU has not yet dropped its clock to its power limit (below)."""
    job, hw = job_and_hw(GPT)  # an H100
    rates = dataclasses.replace(hw, sustained_share=1.0).rates(job)
    one_tile = dataclasses.replace(rates, gemm_shape=kernels.GemmShape())
    errors, naive = [], []
    for line in XLA_SM90.read_text().splitlines():
        if line.startswith("#") or line.startswith("b,"):
            continue
        b, m, n, k, flops = (float(v) for v in line.split(","))
        gemm = kernels.gemm("mm", int(b * m), int(k), int(n), 2.0)  # one batched launch: b x M rows of tiles
        errors.append(gemm.flops / kernels.kernel_s(gemm, rates) / flops - 1)
        naive.append(gemm.flops / kernels.kernel_s(gemm, one_tile) / flops - 1)
    assert len(errors) == 81
    assert sum(map(abs, errors)) / len(errors) < 0.06 and max(map(abs, errors)) < 0.20, errors
    assert sum(map(abs, naive)) / len(naive) > 0.12 and max(map(abs, naive)) > 0.6
    reference = kernels.gemm("ref", 8192, 8192, 8192, 2.0)
    assert reference.flops / kernels.kernel_s(reference, rates) == pytest.approx(
        (reference.flops / (reference.flops + rates.gemm_half_flops)) * rates.gemm_flops)
    larger = kernels.gemm("12288^3", 12288, 12288, 12288, 2.0)  # out of the table: fast.cu's cuBLAS run, 823
    assert larger.flops / kernels.kernel_s(larger, rates) / 1e12 == pytest.approx(823, rel=0.02)
    # a weight gradient of a small TP shard: a 2048x1024 output over 65536 tokens fills one wave of 128x128 tiles
    wgrad = kernels.gemm("wgrad", 2048, 65536, 1024, 2.0)
    assert kernels.kernel_s(wgrad, one_tile) > 1.5 * kernels.kernel_s(wgrad, rates)
    # the inner cost: per FLOP, an inner dimension of 512 costs (1 + 280/512) / (1 + 280/8192) of one of 8192
    short, long = kernels.gemm("s", 8192, 512, 8192, 2.0), kernels.gemm("l", 8192, 8192, 8192, 2.0)
    per_flop = (kernels.kernel_s(short, rates) / short.flops) / (kernels.kernel_s(long, rates) / long.flops)
    assert per_flop == pytest.approx((1 + 280 / 512) / (1 + 280 / 8192), rel=0.02)
    assert job_and_hw([*GPT, "system=dgx-a100-80gb"])[1].gemm_shape == kernels.GemmShape()  # no sweep measured
    # a profile's own efficiency keeps the library's tiles but not the device's inner cost and reference shape
    stated = job_and_hw([*GPT, "system.gemm_efficiency=0.72"])[1].gemm_shape
    assert stated.tiles == rates.gemm_shape.tiles and not stated.inner_overhead and stated.reference is None


def test_a_gpu_at_its_power_limit_runs_its_gemms_below_a_short_benchmarks_rate() -> None:
    """A training step keeps a GPU at its power limit, where it drops its clock below where a short benchmark ran it.
    Kempner's gpu_bench.py timed 50 back-to-back 16384^3 bf16 matmuls: 710 TFLOP/s on an H100, 696 on an H200,
    where the short benchmarks' model (fast.cu, XLA's autotuner) reads about 820. Every GEMM is priced at that share
    of its shape's rate; the A100, which held 267 there, above its sweep's rate, is not raised; a profile that states
    its own efficiency (harness calibrate, a site's figure) is taken as it states it."""
    square = kernels.gemm("16384^3", 16384, 16384, 16384, 2.0)

    def tflops(overrides: list[str], share: Optional[float] = None) -> float:
        job, hw = job_and_hw([*GPT, *overrides])
        hw = hw if share is None else dataclasses.replace(hw, sustained_share=share)
        return square.flops / kernels.kernel_s(square, hw.rates(job)) / 1e12

    for system, held in (("dgx-h100", 710.0), ("h200", 696.0)):
        assert tflops([f"system={system}"]) == pytest.approx(held, rel=0.01), system
        assert tflops([f"system={system}"], share=1.0) > 1.12 * held  # the short benchmarks' rate, left
    assert job_and_hw([*GPT, "system=dgx-a100-80gb"])[1].sustained_share == 1.0
    for stated in (["system.gemm_efficiency=0.72"], ["system.peak_tflops=850", "system.peak_tflops_source=measured"]):
        assert job_and_hw([*GPT, *stated])[1].sustained_share == 1.0, stated
    # a 16-bit measurement: an fp32 GEMM (no tensor cores) keeps its own rate
    fp32_job, fp32_hw = job_and_hw([*GPT, "train.precision=fp32"])
    assert fp32_hw.sustained_share < 1.0
    assert fp32_hw.rates(fp32_job).gemm_flops == dataclasses.replace(fp32_hw, sustained_share=1.0).rates(
        fp32_job).gemm_flops
    # a step of GEMM-bound work takes longer by the share: the mechanism, not a frozen number
    job, hw = job_and_hw(GPT)
    gemms = [k for k in compute_kernels(job)[0] if k.kind == "gemm"]
    held_s = sum(kernels.kernel_s(k, hw.rates(job)) for k in gemms)
    burst_s = sum(kernels.kernel_s(k, dataclasses.replace(hw, sustained_share=1.0).rates(job)) for k in gemms)
    assert held_s > 1.1 * burst_s


def test_a_gemm_runs_at_the_rate_the_vendors_library_gives_its_dtype() -> None:
    """rocBLAS's tuned kernels for gfx90a run bf16 at 0.856 of fp16's rate at the same size and layout (the median
    over the 196 sizes both dtypes were tuned at, ROCm/rocBLAS at rocm-5.2.0, Tensile's aldebaran logic files), on
    tensor cores with one peak for both: a bf16 GEMM on an MI250X GCD takes 1/0.856 of its fp16 time, on an A100 as
    long; a profile that states its own measured efficiency (`harness calibrate`, in the run's dtype) keeps it."""
    gemm = kernels.gemm("mm", 8192, 4096, 8192, 2.0)

    def seconds(*overrides: str) -> float:
        job, hw = job_and_hw(list(overrides))
        return kernels.kernel_s(gemm, hw.rates(job))

    mi250x = seconds("system=frontier", "train.precision=bf16") / seconds("system=frontier", "train.precision=fp16")
    assert mi250x == pytest.approx(1 / 0.856)
    assert seconds("system=dgx-a100-80gb", "train.precision=bf16") == seconds("system=dgx-a100-80gb",
                                                                             "train.precision=fp16")
    own = ["system=frontier", "system.gemm_efficiency=0.5"]
    assert seconds(*own, "train.precision=bf16") == seconds(*own, "train.precision=fp16")
    # and a whole micro-batch on the same system: the rate reaches the step, and its cache tells the dtypes apart
    bf16, hw = job_and_hw([*LLAMA, "system=frontier", "train.precision=bf16"])
    fp16, _ = job_and_hw([*LLAMA, "system=frontier", "train.precision=fp16"])
    assert micro_batch_compute_s(bf16, hw) > 1.1 * micro_batch_compute_s(fp16, hw)


def test_the_optimizer_streams_as_its_implementation_does() -> None:
    fused, hw = job_and_hw([*LLAMA, "train.optimizer=adamw_fused"])
    foreach, _ = job_and_hw([*LLAMA, "train.optimizer=adamw_foreach"])
    assert optimizer_s(foreach, hw) > 2 * optimizer_s(fused, hw) > 0


def test_host_launches_hide_behind_long_kernels_on_a_gpu_and_add_up_on_a_cpu() -> None:
    many = [kernels.Kernel("k", "memory", bytes=1e3, count=1000)]
    rates = kernels.Rates(gemm_flops=1e12, gemm_half_flops=0.0, memory_bw=1e12, attention_flops=None, launch_s=5e-6)
    assert kernels.kernels_s(many, rates, overlap_host=True) == pytest.approx(1000 * 5e-6)
    big = [kernels.Kernel("k", "memory", bytes=1e10, count=10)]
    assert kernels.kernels_s(big, rates, overlap_host=True) == pytest.approx(1e10 / 1e12)
    assert kernels.kernels_s(big, rates, overlap_host=False) == pytest.approx(1e10 / 1e12 + 10 * 5e-6)


def test_each_kernel_launched_back_to_back_costs_a_fixed_device_time_on_a_gpu_and_none_on_a_cpu() -> None:
    """A GPU runs a stream's kernels one after another, and each costs the launch, its first blocks' ramp and its
    last wave's drain beyond its bytes (T = a + V/b, gpu-benches' gpu-small-kernels): the same bytes in ten kernels
    take ten startups. A GEMM's fixed cost is gemm_half_flops, not this. A profile's own figure wins over the
    device's; a CPU's operators are host calls (layer_overhead_us), so none there."""
    rates = kernels.Rates(gemm_flops=1e12, gemm_half_flops=0.0, memory_bw=1e12, attention_flops=None,
                          startup_s=2e-6)
    one, ten = kernels.Kernel("k", "memory", bytes=1e8), kernels.Kernel("k", "memory", bytes=1e8, count=10)
    assert kernels.kernel_s(ten, rates) - kernels.kernel_s(one, rates) == pytest.approx(9 * 2e-6)
    assert kernels.kernel_s(kernels.Kernel("a", "attention", flops=1e9, count=2), rates) == pytest.approx(
        1e-3 + 2 * 2e-6)
    gemm = kernels.gemm("g", 1024, 1024, 1024, 2.0)
    assert kernels.kernel_s(gemm, rates) == kernels.kernel_s(gemm, dataclasses.replace(rates, startup_s=0.0))
    job, h100 = job_and_hw(GPT)
    assert h100.startup_s == pytest.approx(2.433e-6)
    assert job_and_hw([*GPT, "system=frontier"])[1].startup_s == pytest.approx(1.956e-6)
    assert job_and_hw([*GPT, "system.kernel_startup_us=5"])[1].startup_s == pytest.approx(5e-6)
    assert hardware(compose([*GPT, "system=cpu"]).system, 1.0).startup_s == 0.0
    without = dataclasses.replace(h100, startup_s=0.0)
    block, head = ([k.count for k in ks if k.kind != "gemm"] for ks in compute_kernels(job))
    launches = job.model.n_layers * sum(block) + sum(head)
    assert micro_batch_compute_s(job, h100) - micro_batch_compute_s(job, without) == pytest.approx(
        launches * 2.433e-6)


# --- software: what the framework launches -----------------------------------------------------------------------


def tp_calls(job: Job) -> dict[tuple[str, float], float]:
    from harness.costmodel.comm import tp_collectives

    return {(c.kind, c.payload_bytes): c.calls for c in tp_collectives(job)}


def test_gathering_each_projections_input_costs_a_collective_per_projection() -> None:
    """KempnerForge's q, k, v, gate and up are each a ColwiseParallel with a sequence-split input: five gathers per
    block in the forward where Megatron (and the harness) gather once per sub-layer, and as many reduce-scatters in
    the backward; a full recompute gathers again."""
    base = [*LLAMA, "parallel.tp=4", "parallel.sequence_parallel=true", "train.global_batch_size=2"]
    once, _ = job_and_hw([*base, "costmodel.software=harness-fsdp"], 4)
    each = dataclasses.replace(once, software=dataclasses.replace(once.software, tp_gather_per_projection=True))
    payload = once.tokens * once.model.d_model * once.act_bytes
    layers = once.model.n_layers
    gathers, scatters = tp_calls(once)[("all_gather", payload)], tp_calls(once)[("reduce_scatter", payload)]
    assert tp_calls(each)[("all_gather", payload)] - gathers == 3 * layers  # q, k, v: +2; gate, up: +1
    assert tp_calls(each)[("reduce_scatter", payload)] - scatters == 3 * layers
    full = dataclasses.replace(each, checkpointing="full")
    assert tp_calls(full)[("all_gather", payload)] - tp_calls(dataclasses.replace(once, checkpointing="full"))[
        ("all_gather", payload)] == 6 * layers


def test_how_the_vocabulary_runs_under_tp_sets_the_heads_work_its_collectives_and_its_weights() -> None:
    """Megatron splits the embedding, the output layer and the loss over TP ranks (three b·s fp32 all-reduces);
    DTensor's gathered head splits the output layer, all-gathers the b·s·V logits and takes the whole loss on each
    rank; the harness's FSDP TP splits only the blocks."""
    split, hw = job_and_hw([*LLAMA, "parallel.tp=4", "train.global_batch_size=2", "costmodel.software=megatron-lm"], 4)
    v, d, tp = split.model.vocab_size, split.model.d_model, 4
    gathered = dataclasses.replace(split, software=dataclasses.replace(split.software, tp_vocab="gathered"))
    replicated = dataclasses.replace(split, software=dataclasses.replace(split.software, tp_vocab="replicated"))

    def head(job: Job, name: str) -> kernels.Kernel:
        return next(k for k in compute_kernels(job)[1] if k.name == name)

    assert head(gathered, "lm_head.fwd").flops == head(split, "lm_head.fwd").flops
    assert head(replicated, "lm_head.fwd").flops == pytest.approx(tp * head(split, "lm_head.fwd").flops, rel=1e-3)
    assert head(gathered, "cross entropy").bytes == pytest.approx(tp * head(split, "cross entropy").bytes)
    assert ("all_reduce", split.tokens * 4) in tp_calls(split)
    logits = split.tokens * v * split.act_bytes
    assert tp_calls(gathered)[("all_gather", logits)] == split.micro_batches
    assert not any(size in (logits, split.tokens * 4) for _, size in tp_calls(replicated))
    assert gathered.params_per_rank - split.params_per_rank == pytest.approx(v * d * (1 - 1 / tp))
    assert replicated.params_per_rank - split.params_per_rank == pytest.approx(2 * v * d * (1 - 1 / tp))


def test_a_composite_rmsnorm_streams_its_fp32_intermediates_and_compiling_fuses_it() -> None:
    """Llama's reference RMSNorm (fp32 PyTorch operations) moves ~8x a fused norm kernel's bytes; torch.compile of
    the whole model fuses the final norm as well as the blocks' norms, compiling blocks alone leaves it."""
    fused, hw = job_and_hw([*LLAMA, "costmodel.software=kempnerforge"])
    composite = fused
    fused = dataclasses.replace(composite, software=dataclasses.replace(composite.software, rmsnorm_composite=False))

    def norm_bytes(job: Job) -> float:
        return sum(k.bytes for k in compute_kernels(job)[0] if k.name in ("norm1", "norm2"))

    assert norm_bytes(composite) > 7 * norm_bytes(fused) > 0
    whole, _ = job_and_hw([*LLAMA, "costmodel.software=kempnerforge", "train.compile=true"])
    blocks, _ = job_and_hw([*LLAMA, "costmodel.software=harness-fsdp", "train.compile=true"])
    assert norm_bytes(whole) == 0 and "norm_f" not in {k.name for k in compute_kernels(whole)[1]}
    assert "norm_f" in {k.name for k in compute_kernels(blocks)[1]}
    # the loss sits outside the compiled module either way: eager unless the software fuses it
    ce = next(k for k in compute_kernels(blocks)[1] if k.name == "cross entropy")
    fused_ce = dataclasses.replace(blocks, software=dataclasses.replace(blocks.software, fused_cross_entropy=True))
    assert next(k for k in compute_kernels(fused_ce)[1] if k.name == "cross entropy").bytes < ce.bytes / 5


def test_states_kept_in_the_compute_dtype_halve_the_model_state_and_the_optimizers_stream() -> None:
    """KempnerForge casts the model to bf16 before FSDP2: weights, gradients and AdamW's moments are 16-bit (8
    bytes per parameter, not mixed precision's 16), and the optimizer streams half the bytes."""
    from harness.costmodel.memory import model_state_bytes

    mixed, hw = job_and_hw([*LLAMA, "costmodel.software=kempnerforge", "train.optimizer=adamw_fused"])
    mixed = dataclasses.replace(mixed, software=dataclasses.replace(mixed.software, states_in_compute_dtype=False))
    pure = dataclasses.replace(mixed, software=dataclasses.replace(mixed.software, states_in_compute_dtype=True))
    params = mixed.params_per_rank
    assert sum(model_state_bytes(params, pure).values()) == pytest.approx(8 * params)
    assert sum(model_state_bytes(params, mixed).values()) == pytest.approx(16 * params)
    assert optimizer_s(pure, hw) == pytest.approx(optimizer_s(mixed, hw) / 2, rel=1e-3)


def test_fsdp_accumulates_unsharded_gradients_in_fp32_between_micro_batches() -> None:
    """Without gradient sync FSDP2 casts the first micro-batch's bf16 gradient up to the fp32 reduce dtype and adds
    each later one into it: (E + 4) + (m − 1)(8 + E) bytes per parameter, nothing with one micro-batch."""
    from harness.costmodel.timing import grad_accumulation_s

    one, hw = job_and_hw([*LLAMA, "train.global_batch_size=2"])
    four, _ = job_and_hw([*LLAMA, "train.global_batch_size=8"])
    assert grad_accumulation_s(one, hw) == 0
    assert grad_accumulation_s(four, hw) == pytest.approx(four.params_per_rank * (6 + 3 * 10) / hw.memory_bw)


def test_a_loss_on_the_16_bit_logits_keeps_no_fp32_copy_and_streams_fewer_bytes() -> None:
    """KempnerForge takes F.cross_entropy on the bf16 logits and keeps them until the backward: at the loss's peak,
    in its backward, the logits sit beside the bf16 log-softmax the forward saved, the gradient nll_loss hands
    log_softmax's backward and the one that returns (4E bytes per logit); the harness's model upcasts and returns
    only the loss, so its peak is those three in fp32 (12). Its kernels stream 4E, not 24 + 2E."""
    from harness.costmodel.memory import buffer_bytes, busiest_rank, gathered_at_loss

    upcast, _ = job_and_hw([*LLAMA, "costmodel.software=harness-fsdp"])
    native = dataclasses.replace(upcast, software=dataclasses.replace(
        upcast.software, loss_in_compute_dtype=True, loop_holds_logits=True))
    freed = dataclasses.replace(native, software=dataclasses.replace(native.software, loop_holds_logits=False))
    logits = upcast.tokens * upcast.model.vocab_size
    E = native.act_bytes
    # at the loss: nothing gathered where the loop takes the logits (KempnerForge), the root and the last block where
    # the model returns the loss (the root's pre-backward hook runs first)
    assert gathered_at_loss(native, busiest_rank(native)) == 0.0
    units = gathered_at_loss(freed, busiest_rank(freed))
    assert units == pytest.approx((upcast.root_params_per_rank + upcast.block_params_per_rank) * E)
    assert buffer_bytes(native) == pytest.approx(logits * 4 * E)
    assert buffer_bytes(freed) == pytest.approx(logits * 3 * E + units)
    assert buffer_bytes(upcast) == pytest.approx(logits * 12 + units)

    def streamed(job: Job) -> float:
        return next(k.bytes for k in compute_kernels(job)[1] if k.name == "cross entropy")

    assert streamed(native) == pytest.approx(logits * 4 * 2) and streamed(upcast) == pytest.approx(logits * 28)


def test_the_loss_and_the_layer_being_recomputed_are_never_held_at_once() -> None:
    """The loss's backward runs before the first layer is recomputed, and the recompute's working set is freed
    before the next layer's: under full recompute a rank peaks at its checkpoints plus the larger of the loss's
    peak and the working set beside the logits the loop still holds, not at their sum. So a vocabulary whose loss
    fits under the working set costs the peak only the logits the loop holds (E per logit, KempnerForge), and one
    whose loss is larger costs it the loss's whole 4E per logit."""
    from harness.costmodel.memory import (
        activation_bytes,
        buffer_bytes,
        gathered_bytes,
        layer_activation_bytes,
        loss_bytes,
        recompute_working_set,
    )

    def peak(vocab: int) -> tuple[float, Job]:
        job, _ = job_and_hw([*LLAMA, "costmodel.software=kempnerforge", "train.activation_checkpointing=full",
                             f"model.vocab_size={vocab}"])
        return activation_bytes(job) + buffer_bytes(job) - gathered_bytes(job), job  # one rank: no buckets

    small, job = peak(8192)
    loss, held = loss_bytes(job)
    assert held > 0 and loss < recompute_working_set(job)  # the recompute's working set is the larger
    stored = job.model.n_layers * layer_activation_bytes(job, "full")  # each layer's input
    assert small == pytest.approx(stored + recompute_working_set(job) + held)
    E, tokens = job.act_bytes, job.tokens
    assert peak(16384)[0] - small == pytest.approx(tokens * 8192 * E)  # only the held logits grow
    large, job = peak(131072)
    assert loss_bytes(job)[0] > recompute_working_set(job) + loss_bytes(job)[1]
    assert peak(131072 + 8192)[0] - large == pytest.approx(tokens * 8192 * 4 * E)  # the loss's whole peak grows
    assert buffer_bytes(job) - gathered_bytes(job) == pytest.approx(loss_bytes(job)[0] - recompute_working_set(job))
    # GPipe runs every micro-batch's forward before any backward: their losses outlive the first recompute
    piped = dataclasses.replace(job, pp_schedule="GPipe", layout=dataclasses.replace(job.layout, pp=2))
    assert buffer_bytes(piped) - gathered_bytes(piped) == pytest.approx(loss_bytes(piped)[0])


def test_megatrons_vocab_parallel_loss_makes_a_pass_per_operation_over_fp32_logits() -> None:
    """Megatron's vocab_parallel_cross_entropy (and nanotron's copy of it) runs max, subtract, exp, sum and divide
    as separate eager passes over the fp32 logits, and multiplies the gradient in place: 48 + 2E bytes per logit,
    where PyTorch's cross entropy streams 24 + 2E, at TP 1 as well."""
    megatron, _ = job_and_hw([*LLAMA, "backend=deepspeed3d", "costmodel.software=megatron-lm"])
    torch_loss = dataclasses.replace(megatron, software=dataclasses.replace(megatron.software,
                                                                             vocab_parallel_loss=False))

    def loss(job: Job) -> kernels.Kernel:
        return next(k for k in compute_kernels(job)[1] if k.name == "cross entropy")

    logits = megatron.tokens * megatron.model.vocab_size
    assert megatron.layout.tp == 1 and loss(megatron).bytes == pytest.approx(logits * 52)
    from harness.costmodel.memory import buffer_bytes  # in place: the logits, an fp32 copy and its softmax (E + 8)

    assert buffer_bytes(torch_loss) - buffer_bytes(megatron) == pytest.approx(logits * (12 - 2 - 8))  # eager: 12
    for software in ("nanotron", "megatron-deepspeed", "harness-deepspeed3d"):
        other, _ = job_and_hw([*LLAMA, "backend=deepspeed3d", f"costmodel.software={software}"])
        assert loss(other).bytes == loss(megatron).bytes
    assert loss(torch_loss).bytes == pytest.approx(logits * 28) and loss(megatron).count > loss(torch_loss).count


def test_bf16_runs_of_megatron_deepspeeds_bf16_optimizer_and_nanotron_keep_and_reduce_fp32_gradients() -> None:
    """Megatron-LM forces fp32 gradient accumulation and all-reduce for bf16, DeepSpeed's BF16_Optimizer and nanotron
    reduce their fp32 accumulation buffers: in bf16 the gradients take 4 bytes per parameter in memory and twice the
    data-parallel bytes of a bf16 reduction; the parameter gather does not change, and fp16 runs keep 16-bit
    gradients. A run that turns it off (NeMo 2.0's performance mode: megatron-core's grad_reduce_in_fp32=False) says
    so with costmodel.grad_reduce_in_fp32=false."""
    from harness.costmodel.comm import dp_collectives
    from harness.costmodel.memory import model_state_bytes

    for software in ("megatron-lm", "megatron-deepspeed", "nanotron"):
        for stage in (0, 1):
            common = [*LLAMA, "backend=deepspeed3d", f"parallel.zero_stage={stage}", f"costmodel.software={software}"]
            fp32, _ = job_and_hw(common, 8)
            bf16, _ = job_and_hw([*common, "costmodel.grad_reduce_in_fp32=false"], 8)
            assert job_and_hw([*common, "costmodel.grad_reduce_in_fp32=true"], 8)[0].state_bytes == fp32.state_bytes
            mine, theirs = dp_collectives(fp32), dp_collectives(bf16)
            assert [c.kind for c in mine] == [c.kind for c in theirs]
            assert mine[0].payload_bytes == pytest.approx(2 * theirs[0].payload_bytes)
            assert [c.payload_bytes for c in mine[1:]] == [c.payload_bytes for c in theirs[1:]]
            params = fp32.params_per_rank
            grads = model_state_bytes(params, fp32)["grads"]
            assert grads == pytest.approx(2 * model_state_bytes(params, bf16)["grads"])
        fp16, _ = job_and_hw([*LLAMA, "backend=deepspeed3d", "train.precision=fp16", f"costmodel.software={software}"])
        assert fp16.state_bytes.grads == 2


def test_fsdp_holds_unsharded_fp32_gradients_only_while_accumulating() -> None:
    """Accumulating micro-batches, FSDP2 keeps every gradient whole in fp32 (4 bytes per parameter, whatever the
    group: KempnerForge's bf16 states too, and the harness's one GPU); one micro-batch leaves the sharded gradients
    of the model states. KempnerForge on one GPU runs no FSDP: its bf16 gradients accumulate in bf16."""
    from harness.costmodel.memory import model_state_bytes

    four, _ = job_and_hw([*LLAMA, "train.global_batch_size=64"], 8)
    one, _ = job_and_hw([*LLAMA, "train.global_batch_size=16"], 8)
    tp_only, _ = job_and_hw([*LLAMA, "train.global_batch_size=8", "parallel.tp=2",
                             "costmodel.software=kempnerforge"], 2)
    alone, _ = job_and_hw([*LLAMA, "train.global_batch_size=8"], 1)
    plain, _ = job_and_hw([*LLAMA, "train.global_batch_size=8", "costmodel.software=kempnerforge"], 1)
    assert four.micro_batches == 4 and one.micro_batches == 1 and alone.micro_batches == plain.micro_batches == 4
    params = four.params_per_rank
    assert model_state_bytes(params, four)["grads"] == pytest.approx(4 * params)
    assert model_state_bytes(params, one)["grads"] == pytest.approx(4 * params / 8)
    assert model_state_bytes(params, alone)["grads"] == pytest.approx(4 * params)
    assert tp_only.state_bytes.grads == 2 and model_state_bytes(params, tp_only)["grads"] == pytest.approx(4 * params)
    assert plain.state_bytes.grads == 2 and model_state_bytes(params, plain)["grads"] == pytest.approx(2 * params)


def test_fsdp_reducing_every_micro_batch_keeps_its_gradients_sharded_and_reduces_m_times() -> None:
    """Software that reduce-scatters in every micro-batch's backward (costmodel.fsdp_defer_grad_sync=false:
    torchtitan's default, NeMo AutoModel's defer_fsdp_grad_sync: False) holds only the sharded gradients, in the
    parameters' dtype, and reduces (and copies its gradients into the reduction) m times per step where deferring
    software does once; its accumulation adds the shards; torch's pipeline stages defer whatever the software.
    NeMo AutoModel's Llama 3.1 70B on 64 H100, which ran, fits so, and would not with deferral."""
    from harness.costmodel.comm import dp_collectives
    from harness.costmodel.estimate import estimate
    from harness.costmodel.memory import model_state_bytes
    from harness.costmodel.published import RUNS, table_rows
    from harness.costmodel.timing import fsdp_copy_kernels, grad_accumulation_s

    common = [*LLAMA, "train.global_batch_size=64"]
    defers, hw = job_and_hw(common, 8)
    each, _ = job_and_hw([*common, "costmodel.fsdp_defer_grad_sync=false"], 8)
    params, m = each.params_per_rank, each.micro_batches
    assert m == 4 and each.unsharded_grad_bytes is None and defers.unsharded_grad_bytes == 4
    assert model_state_bytes(params, each)["grads"] == pytest.approx(params * each.state_bytes.grads / 8)
    calls = {c.kind: c.calls for c in dp_collectives(each)}
    assert calls["reduce_scatter"] == m and {c.kind: c.calls for c in dp_collectives(defers)}["reduce_scatter"] == 1
    assert grad_accumulation_s(each, hw) < grad_accumulation_s(defers, hw) / 4  # the shards, not whole gradients
    each_in, once_in = (next(k for k in fsdp_copy_kernels(job) if "copy-in" in k.name) for job in (each, defers))
    assert each_in.count == m * once_in.count  # each reduction copies its gradients in
    piped, _ = job_and_hw([*common, "costmodel.fsdp_defer_grad_sync=false", "parallel.pp=2"], 8)
    assert not piped.fsdp_reduces_every_micro_batch and piped.unsharded_grad_bytes == 4  # torch's stages defer
    table = next(t for t in yaml.safe_load(RUNS.read_text())["tables"] if t["id"] == "nemo-automodel-h100-fsdp2")
    _, overrides, world, _ = table_rows(table)[0]
    for defer, verdict in (("false", "fits"), ("true", "too big")):
        cfg = compose([*overrides, f"costmodel.fsdp_defer_grad_sync={defer}"])
        assert estimate(cfg, validate(cfg, world, runs=False))["memory_verdict"] == verdict


def test_megatron_reduces_and_gathers_bucket_by_bucket_each_paying_the_rings_latency() -> None:
    """megatron-core's DDP with overlap_grad_reduce cuts the gradient buffer into buckets of max(40M, 1M × DP)
    parameters (NeMo: 128·2^20), each reduce-scattered and, with the distributed optimizer, all-gathered by its own
    collective: as many latencies per pass, which over a thousand data-parallel ranks are no longer small. Pipeline
    stages after the first keep one bucket per model chunk; Megatron-LM 2021 reduced its buffer in one call."""
    from harness.costmodel.comm import dp_collectives
    from harness.costmodel.timing import collective_s

    base = [*LLAMA, "model.n_layers=16", "backend=deepspeed3d", "parallel.zero_stage=1", "parallel.tp=8",
            "costmodel.software=megatron-lm"]

    def dp(extra: list[str], world: int) -> tuple[Job, Any, list[Any]]:
        job, hw = job_and_hw([*base, f"train.global_batch_size={2 * world // 8}", *extra], world, runs=False)
        return job, hw, [c for c in dp_collectives(job) if c.dim == "dp"]

    job, hw, colls = dp([], 64)
    params = job.params_per_rank
    assert {c.kind: c.units for c in colls} == {"reduce_scatter": -(-int(params) // 40_000_000),
                                                "all_gather": -(-int(params) // 40_000_000)}
    _, _, wide = dp([], 8192)  # 1024 data-parallel ranks: 1.024B-parameter buckets
    assert {c.units for c in wide} == {-(-int(params) // 1_024_000_000)}
    _, _, nemo = dp(["costmodel.grad_bucket_params=134217728"], 64)
    assert {c.units for c in nemo} == {-(-int(params) // 134217728)}
    piped, _, staged = dp(["parallel.pp=2", "parallel.vpp=2"], 128)  # the first stage: its first chunk bucketed
    blocks = 16 // 2 // 2  # the first virtual stage's blocks, beside the embedding
    embedding = piped.stage_params[0] - 16 // 2 * piped.block_params_per_rank
    first = embedding + blocks * piped.block_params_per_rank
    assert {c.units for c in staged} == {-(-int(first) // 40_000_000) + 1} and first > piped.params_per_rank / 2
    with pytest.raises(ConfigError, match="costmodel.grad_bucket_params=0"):
        dp(["costmodel.grad_bucket_params=0"], 64)
    _, _, old = dp(["costmodel.software=megatron-lm-2021"], 64)
    assert {c.units for c in old} == {1}
    one = [dataclasses.replace(c, units=1) for c in colls]
    assert all(collective_s(c, hw) > collective_s(o, hw) for c, o in zip(colls, one))


def test_fsdp_reducing_every_micro_batch_waits_for_each_backwards_last_reduce_scatters() -> None:
    """Unless the loop clears `is_last_backward` (AutoModel does not), FSDP2's post-backward callback makes the
    compute stream wait for the reduce-scatters still in flight at the end of every backward: reducing every
    micro-batch, each micro-batch's last units' reductions are exposed, not only the last micro-batch's."""
    from harness.costmodel.comm import dp_collectives
    from harness.costmodel.timing import collective_s, exposed_dp_s, sharded_edge_share

    each, hw = job_and_hw([*LLAMA, "train.global_batch_size=64", "costmodel.fsdp_defer_grad_sync=false"], 8)
    rs = next(c for c in dp_collectives(each) if c.kind == "reduce_scatter")
    t, m = collective_s(rs, hw), each.micro_batches
    assert m == 4 and rs.calls == m
    idle = exposed_dp_s([(rs, t)], each, per_mb=1e6, hw=hw)  # compute long enough to hide every other reduction
    assert idle == pytest.approx(t * sharded_edge_share(each))
    assert idle > 3 * t / m * sharded_edge_share(each)


def test_a_whole_model_compiled_backward_returns_every_gradient_at_once() -> None:
    """KempnerForge on one GPU compiles the whole model with no FSDP hooks to break its graph, so the backward is one
    graph whose outputs are all the gradients: accumulating micro-batches, they are all live at its end beside the
    .grad kept from the earlier ones, where the activations are gone. One micro-batch, an eager model or FSDP's
    per-unit graphs hold no such second copy."""
    from harness.costmodel.memory import busiest_rank, memory_per_device, whole_graph_gradients

    def job(*extra: str, world: int = 1) -> Job:
        return job_and_hw([*LLAMA, "costmodel.software=kempnerforge", "train.compile=true", *extra], world)[0]

    plain = job("train.global_batch_size=8")
    assert plain.micro_batches == 4 and not plain.fsdp_wraps
    grads = plain.params_per_rank * 2  # bf16, as the parameters
    assert whole_graph_gradients(plain, busiest_rank(plain)) == pytest.approx(grads)
    memory = memory_per_device(plain)
    assert memory["total"] >= memory["weights"] + memory["grads"] + memory["optimizer"] + grads
    for other in (job("train.global_batch_size=2"), job("train.global_batch_size=8", "train.compile=false"),
                  job("train.global_batch_size=16", world=2)):
        assert whole_graph_gradients(other, busiest_rank(other)) == 0.0


def test_hybrid_sharding_shards_within_a_node_beside_tensor_parallelism() -> None:
    """hybrid_shard's default replica is one node's data-parallel ranks: with TP 2 on 8-GPU nodes that is 4 ranks,
    whose gathers stay on NVLink; 8 would span two nodes and go over the NICs."""
    from harness.costmodel.comm import dp_collectives

    job, _ = job_and_hw([*LLAMA, "parallel.tp=2", "backend.sharding=hybrid_shard", "train.global_batch_size=64"], 64)
    assert job.fsdp_group == 4
    gather = next(c for c in dp_collectives(job) if c.kind == "all_gather")
    assert gather.group == 4 and gather.intra_node
    wide, _ = job_and_hw([*LLAMA, "parallel.tp=2", "backend.sharding=hybrid_shard", "backend.hybrid_shard_group=8",
                          "train.global_batch_size=64"], 64)
    assert not next(c for c in dp_collectives(wide) if c.kind == "all_gather").intra_node


def test_fsdp_reduces_and_gathers_in_the_dtypes_its_mixed_precision_policy_names() -> None:
    """The harness's FSDP backend builds MixedPrecisionPolicy(param_dtype=backend.param_dtype or train.precision,
    reduce_dtype=backend.reduce_dtype or fp32) (harness/backends/fsdp.py): a bf16 reduction halves the
    reduce-scatter's bytes and the unsharded gradients held while accumulating; fp32 parameters double the
    gathers' bytes and compute in fp32."""
    from harness.costmodel.comm import dp_collectives
    from harness.costmodel.memory import model_state_bytes

    def job(*extra: str) -> Job:
        return job_and_hw([*LLAMA, "train.global_batch_size=64", *extra], 8)[0]

    default, bf16, fp32 = job(), job("backend.reduce_dtype=bf16"), job("backend.param_dtype=fp32")

    def payload(j: Job, kind: str) -> float:
        return next(c.payload_bytes for c in dp_collectives(j) if c.kind == kind)

    assert payload(bf16, "reduce_scatter") == pytest.approx(payload(default, "reduce_scatter") / 2)
    assert payload(bf16, "all_gather") == payload(default, "all_gather")
    params = default.params_per_rank
    assert model_state_bytes(params, bf16)["grads"] == pytest.approx(model_state_bytes(params, default)["grads"] / 2)
    assert fp32.precision == "fp32" and payload(fp32, "all_gather") == pytest.approx(2 * payload(default, "all_gather"))


def test_deepspeeds_zero_optimizers_hold_a_whole_gradient_bucket_however_small_the_model() -> None:
    """ZeRO-1/2 allocate their contiguous gradient bucket at reduce_bucket_size elements in the model's dtype (two
    with overlap_comm), ZeRO-3 one when it initialises; contiguous_gradients=false and DeepSpeed's BF16_Optimizer
    none (measured: benchmarks/memory_cpu.py)."""
    from harness.costmodel.memory import buffer_bytes

    base = ["model=gpt-tiny", "backend=deepspeed", "train.precision=bf16", "system=dgx-a100-80gb"]

    def buffers(*extra: str) -> float:
        job, _ = job_and_hw([*base, *extra], 2)
        return buffer_bytes(job)

    off = "+backend.ds_config.zero_optimization.contiguous_gradients=false"
    for stage in ("parallel.zero_stage=1", "parallel.zero_stage=2"):
        plain = buffers(stage, off)
        assert buffers(stage) - plain == pytest.approx(5e8 * 2, rel=1e-3)
        assert buffers(stage, "+backend.ds_config.zero_optimization.overlap_comm=true") - plain \
            == pytest.approx(2 * 5e8 * 2, rel=1e-3)
        assert buffers(stage, "+backend.ds_config.zero_optimization.reduce_bucket_size=1000") - plain \
            == pytest.approx(1000 * 2, rel=1e-3)
    # ZeRO-3 allocates one bucket when it initialises (stage3.py), overlap_comm (its default) or not
    assert buffers("parallel.zero_stage=3") - buffers("parallel.zero_stage=3", off) == pytest.approx(5e8 * 2, rel=1e-3)
    # bf16 ZeRO-1 accumulating in fp32 runs DeepSpeed's BF16_Optimizer, which has no such bucket
    assert buffers("parallel.zero_stage=1", "+backend.ds_config.data_types.grad_accum_dtype=fp32") \
        == buffers("parallel.zero_stage=1", off)


def test_tp_comm_overlap_hides_sequence_parallel_traffic_and_is_refused_without_it() -> None:
    """Megatron-LM's --tp-comm-overlap pipelines the sequence-parallel all-gathers and reduce-scatters with their
    GEMMs, leaving about 1/TP of the traffic exposed, and its arguments.py refuses it without sequence parallelism:
    so does the config (one line naming the fix), and a layout without it (as `harness plan` builds them) keeps its
    TP traffic exposed."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import step_time

    base = [*LLAMA, "backend=deepspeed3d", "costmodel.software=megatron-lm", "parallel.tp=8",
            "train.global_batch_size=8"]

    def exposed_tp(*extra: str, sp: bool) -> float:
        job, hw = job_and_hw([*base, f"parallel.sequence_parallel={str(sp).lower()}", *extra], 8)
        return step_time(job, collectives(job), hw).exposed_comm_s["tp"]

    job, hw = job_and_hw([*base, "parallel.sequence_parallel=true"], 8)
    total = step_time(job, collectives(job), hw).comm_s["tp"]
    assert exposed_tp("costmodel.tp_comm_overlap=true", sp=True) == pytest.approx(total / 8)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true"):
        exposed_tp("costmodel.tp_comm_overlap=true", sp=False)
    job, hw = job_and_hw([*base, "parallel.sequence_parallel=true", "costmodel.tp_comm_overlap=true"], 8)
    no_sp = dataclasses.replace(job, sequence_parallel=False)
    assert step_time(no_sp, collectives(no_sp), hw).exposed_comm_s["tp"] == pytest.approx(exposed_tp(sp=False))


def test_sequence_parallel_linears_gather_their_input_again_for_the_weight_gradient() -> None:
    """megatron-core (and the harness's deepspeed3d, which builds its linears from it) and nanotron keep a
    column-parallel linear's sequence-split input and all-gather it again in the backward: one more gather per
    sub-layer and block, and one for the column-parallel output layer. DTensor's ColwiseParallel saves the gathered
    input, and without sequence parallelism there is nothing to gather."""
    base = [*LLAMA, "backend=deepspeed3d", "parallel.tp=4", "parallel.sequence_parallel=true",
            "train.global_batch_size=2"]
    for software in ("megatron-lm", "harness-deepspeed3d"):
        job, _ = job_and_hw([*base, f"costmodel.software={software}"], 4)
        saved = dataclasses.replace(job, software=dataclasses.replace(job.software, tp_regather_input=False))
        payload = job.tokens * job.model.d_model * job.act_bytes
        assert job.vocab.head_split
        assert tp_calls(job)[("all_gather", payload)] - tp_calls(saved)[("all_gather", payload)] \
            == (2 * job.model.n_layers + 1) * job.micro_batches
        assert ("all_gather", payload) not in tp_calls(dataclasses.replace(job, sequence_parallel=False))
    fsdp, _ = job_and_hw([*LLAMA, "parallel.tp=4", "parallel.sequence_parallel=true", "train.global_batch_size=2",
                          "costmodel.software=harness-fsdp"], 4)
    assert not fsdp.software.tp_regather_input


def column_and_row_gemms(job: Job, hw: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per block, the column-parallel linears' forward, input- and weight-gradient GEMM times, the row-parallel
    ones' input-gradient time, and the output layer's three; one micro-batch on one TP rank."""
    from harness.costmodel.kernels import kernel_s, linear_kernels

    t, rates = job.layout.tp, hw.rates(job)
    column = {"fwd": 0.0, "dgrad": 0.0, "wgrad": 0.0}
    row = {"dgrad": 0.0}
    for spec in block_linears(job.model):
        times = dict(zip(("fwd", "dgrad", "wgrad"), (kernel_s(k, rates) for k in linear_kernels(
            spec.name, job.tokens, *spec.on_rank(t), 3, job.act_bytes))))
        part = column if spec.split == "column" else row
        for key in part:
            part[key] += times[key]
    head = dict(zip(("fwd", "dgrad", "wgrad"), (kernel_s(k, rates) for k in linear_kernels(
        "lm_head", job.tokens, job.model.d_model, int(job.vocab_per_rank[0]), 3, job.act_bytes))))
    return column, row, head


def test_a_tp_collective_issued_ahead_of_its_gemm_hides_as_long_as_the_gemm_lasts() -> None:
    """megatron-core's column-parallel backward runs the input's re-gather beside the input-gradient GEMM and the
    input gradient's reduce-scatter (all-reduce without sequence parallelism) beside the weight-gradient GEMM: each
    hides for as long as its GEMM runs, what outlasts the GEMM stays exposed, and the hidden part slows the GEMM
    (contention). Without the overlap every TP collective blocks; under a zero-bubble schedule the weight gradient
    is deferred, so nothing hides the reduce-scatter."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import step_time, tp_hidden_s

    base = [*LLAMA, "backend=deepspeed3d", "costmodel.software=megatron-lm", "parallel.tp=4",
            "train.global_batch_size=2"]
    job, hw = job_and_hw([*base, "parallel.sequence_parallel=true"], 4)
    blocking = dataclasses.replace(job, software=dataclasses.replace(job.software, tp_backward_overlap=False))
    both = step_time(job, collectives(job), hw), step_time(blocking, collectives(blocking), hw)
    assert both[0].comm_s["tp"] == pytest.approx(both[1].comm_s["tp"])
    assert both[1].exposed_comm_s["tp"] - both[0].exposed_comm_s["tp"] == pytest.approx(tp_hidden_s(job, hw))
    assert both[0].memory_bound_s["contention"] > both[1].memory_bound_s["contention"]
    assert tp_hidden_s(blocking, hw) == 0.0

    # Per column-parallel linear, min(collective, GEMM): on a slow fabric each collective outlasts its GEMM and
    # hides exactly the GEMM's time; on a fast one it hides whole.
    column, _, head = column_and_row_gemms(job, hw)
    layers, m = job.model.n_layers, job.micro_batches
    slow = dataclasses.replace(hw, fabric=dataclasses.replace(hw.fabric, link_bw=1e6))
    assert tp_hidden_s(job, slow) == pytest.approx(
        ((column["dgrad"] + column["wgrad"]) * layers + head["dgrad"] + head["wgrad"]) * m)
    fast = dataclasses.replace(hw, fabric=dataclasses.replace(hw.fabric, link_bw=1e15, base_latency=0.0,
                                                               intra_hop=0.0))
    t = job.layout.tp
    payload = job.tokens * job.model.d_model * job.act_bytes
    gather = fast.fabric.call_s("all_gather", payload, t, t)
    scatter = fast.fabric.call_s("reduce_scatter", payload, t, t)
    assert gather < min(column["dgrad"], head["dgrad"]) / 10
    assert tp_hidden_s(job, fast) == pytest.approx((gather + scatter) * (2 * layers + 1) * m)

    # Without sequence parallelism: the input gradient's all-reduce beside the weight-gradient GEMM, no re-gather.
    plain, _ = job_and_hw([*base, "parallel.sequence_parallel=false"], 4)
    assert tp_hidden_s(plain, slow) == pytest.approx((column["wgrad"] * layers + head["wgrad"]) * m)
    zero_bubble = dataclasses.replace(job, pp_schedule="ZBVZeroBubble")
    assert tp_hidden_s(zero_bubble, slow) == pytest.approx(
        (column["dgrad"] * layers + head["dgrad"]) * m)


def test_nanotrons_async_linears_also_hide_a_gather_behind_the_ranks_own_chunk() -> None:
    """nanotron's tp_linear_async_communication computes the rank's own sequence chunk while the column-parallel
    forward gathers the rest, and its row-parallel backward likewise: on a slow fabric those gathers hide 1/TP of
    their GEMMs beyond what megatron-core's backward overlap hides (the output layer's forward too). It runs them
    only in REDUCE_SCATTER mode (sequence parallelism): its ALL_REDUCE mode refuses async communication."""
    from harness.costmodel.timing import tp_hidden_s

    job, hw = job_and_hw([*NANOTRON, "parallel.tp=4", "parallel.sequence_parallel=true"], 8)
    slow = dataclasses.replace(hw, fabric=dataclasses.replace(hw.fabric, link_bw=1e6))
    backward_only = dataclasses.replace(job, software=dataclasses.replace(job.software, tp_shard_overlap=False))
    t = job.layout.tp
    column, row, head = column_and_row_gemms(job, hw)
    extra = tp_hidden_s(job, slow) - tp_hidden_s(backward_only, slow)
    assert extra == pytest.approx(((column["fwd"] + row["dgrad"]) * job.model.n_layers + head["fwd"]) / t
                                  * job.micro_batches)
    full = dataclasses.replace(job, checkpointing="full")  # the recomputed forward gathers again, beside its chunk
    assert tp_hidden_s(full, slow) - tp_hidden_s(job, slow) == pytest.approx(
        column["fwd"] / t * job.model.n_layers * job.micro_batches)
    assert tp_hidden_s(dataclasses.replace(job, sequence_parallel=False), slow) == 0.0


def test_the_busiest_pipeline_stage_is_the_one_the_software_loads_most() -> None:
    """Stages hold the blocks as the software splits them, the output layer on the last: DeepSpeed balances the
    layers its partition regex matches, larger parts first, so 70 blocks on 8 stages are 9 on six and 8 on the last
    two, and the busiest stage is a 9-block one without the head, not 9 blocks plus the head; with the embedding and
    the tied head counted (BLOOM's type:transformer|embedding) the end stages hold one block fewer; megatron's split
    is even, or gives the embedding and the head a block's place; a rank with virtual stages holds every pp-th."""
    from harness.costmodel.timing import _compute_s, stage_loads

    def loads(*extra: str, world: int = 8) -> list[tuple[int, bool]]:
        job, _ = job_and_hw([*LLAMA, "model.n_layers=70", "backend=deepspeed3d", "parallel.pp=8",
                             "train.global_batch_size=64", *extra], world)
        return list(stage_loads(job))

    assert loads("costmodel.software=megatron-deepspeed") == [(9, False)] * 6 + [(8, False), (8, True)]
    with pytest.raises(ConfigError, match=r"costmodel.pp_partition=uniform: unknown; choose one of megatron"):
        loads("costmodel.pp_partition=uniform")
    assert loads("costmodel.software=megatron-deepspeed", "costmodel.pp_partition=type:transformer|embedding",
                 "parallel.pp=12", world=12) == [(5, False)] + [(6, False)] * 10 + [(5, True)]
    assert loads("costmodel.software=megatron-lm", "model.n_layers=64") == [(8, False)] * 7 + [(8, True)]
    assert loads("costmodel.software=megatron-lm", "model.n_layers=6", "parallel.pp=4", world=4) == \
        [(1, False), (2, False), (2, False), (1, True)]  # [embedding, b0], [b1, b2], [b3, b4], [b5, head]
    fsdp, _ = job_and_hw([*LLAMA, "model.n_layers=16", "parallel.pp=2", "parallel.vpp=2",
                          "train.global_batch_size=16"], 2)
    assert stage_loads(fsdp) == ((8, False), (8, True))  # virtual stages of 4: ranks hold 0 and 2, 1 and 3
    zbv, _ = job_and_hw([*LLAMA, "model.n_layers=14", "parallel.pp=2", "parallel.vpp=2",
                         "backend.pp_schedule=ZBVZeroBubble", "train.global_batch_size=16"], 2)
    assert stage_loads(zbv) == ((6, True), (8, False))  # [emb, 3], [4], [4], [3, head]: v places 0 and 3 on rank 0
    job, hw = job_and_hw([*LLAMA, "model.n_layers=70", "backend=deepspeed3d", "parallel.pp=8",
                          "train.global_batch_size=64", "costmodel.software=megatron-deepspeed"], 8)
    block, head = compute_kernels(job)
    rates = hw.rates(job)
    per_layer = kernels.kernels_s(block, rates, overlap_host=True) + hw.layer_overhead_s
    head_s = kernels.kernels_s(head, rates, overlap_host=True)
    busiest = max(9 * per_layer, 8 * per_layer + head_s)  # a 9-block stage, or the last with 8 and the head
    assert _compute_s(job, hw)[0] == pytest.approx(busiest + hw.step_overhead_s)
    assert busiest < 9 * per_layer + head_s  # no stage holds the most blocks and the head


def test_each_pipeline_rank_holds_its_own_blocks_and_micro_batches_in_flight() -> None:
    """Memory is priced per pipeline rank, with the blocks the software's split gives it, the embedding on rank 0,
    the output layer (and a tied copy of the embedding) on the last, and the micro-batches its schedule keeps in
    flight: under 1F1B pp - r, interleaved (pp - r - 1)·2 + (v - 1)·pp + 1 chunks of 1/v of its blocks. BLOOM's split
    (70 blocks and both embeddings on 12 stages) puts 5 blocks beside the embedding on rank 0, which holds 12
    micro-batches, and 6 on rank 1, which holds 11: the device's figure is the larger of the ranks, not 6 blocks x
    12 micro-batches beside the embedding (ceil(70 / 12) on the first stage)."""
    from harness.costmodel.layout import _block_params, _rank_params
    from harness.costmodel.memory import (
        activation_bytes,
        busiest_rank,
        in_flight_micro_batches,
        layer_activation_bytes,
        memory_per_device,
        pipeline_ranks,
        recompute_working_set,
    )

    job, _ = job_and_hw([*LLAMA, "model.n_layers=70", "model.tie_embeddings=true", "backend=deepspeed3d",
                         "costmodel.software=megatron-deepspeed", "costmodel.pp_partition=type:transformer|embedding",
                         "parallel.pp=12", "train.global_batch_size=48", "train.activation_checkpointing=full"], 12)
    ranks = pipeline_ranks(job)
    assert [(r.index, r.blocks, r.last) for r in ranks] == [(0, 5, False), (1, 6, False), (11, 5, True)]
    assert [in_flight_micro_batches(job, r) for r in (0, 1, 11)] == [12, 11, 1]
    layer, tp = _block_params(job.model, 1), 1
    embedding = _rank_params(job.model, tp, ("tok_emb.",))
    assert ranks[0].params == pytest.approx(5 * layer + embedding)
    assert ranks[2].params == pytest.approx(5 * layer + _rank_params(job.model, tp, ("norm_f.",)) + embedding)
    per_layer = layer_activation_bytes(job, "full")
    assert activation_bytes(job, ranks[0]) == pytest.approx(5 * 12 * per_layer + recompute_working_set(job))
    assert activation_bytes(job, ranks[1]) == pytest.approx(6 * 11 * per_layer + recompute_working_set(job))
    assert memory_per_device(job)["activations"] == pytest.approx(activation_bytes(job, busiest_rank(job)))
    ceil_blocks = 6 * 12 * per_layer + recompute_working_set(job)
    assert memory_per_device(job)["activations"] < ceil_blocks


def test_each_pipeline_schedule_keeps_the_micro_batches_torchs_pass_order_keeps() -> None:
    """Chunks of activations a rank holds at once, as torch's schedules order the passes (their
    _calculate_single_rank_operations, counted forward minus weight-gradient passes): interleaved 1F1B
    (v - 1)·r + 2·(pp - rank - 1) + 1, with r the micro-batches per round, which is pp only where pp divides the
    micro-batches; the interleaved zero-bubble schedule (v - 1)·r + pp on every rank, its inputs held for the deferred
    weight gradients; ZB-V 2·pp (pp micro-batches); 1F1B pp - rank."""
    from harness.costmodel.memory import in_flight_micro_batches

    def chunks(schedule: str, pp: int, vpp: int, micro_batches: int) -> list[float]:
        job, _ = job_and_hw([*LLAMA, "model.n_layers=16", f"parallel.pp={pp}", f"parallel.vpp={vpp}",
                             f"backend.pp_schedule={schedule}", f"train.global_batch_size={2 * micro_batches}"], pp)
        assert job.micro_batches == micro_batches
        return [in_flight_micro_batches(job, r) * vpp for r in range(pp)]

    assert chunks("Interleaved1F1B", 4, 2, 8) == [11, 9, 7, 5]
    assert chunks("Interleaved1F1B", 4, 2, 6) == [12, 11, 9, 7]  # one round of 6: (2 - 1)·6 + 2·(3 - rank) + 1
    assert chunks("Interleaved1F1B", 4, 2, 10) == [12, 10, 8, 6]  # two rounds of 5
    assert chunks("InterleavedZeroBubble", 4, 2, 8) == [8, 8, 8, 8]
    assert chunks("ZBVZeroBubble", 4, 2, 8) == [8, 8, 8, 8]
    assert chunks("1F1B", 4, 1, 8) == [4, 3, 2, 1]
    assert chunks("GPipe", 4, 1, 8) == [8, 8, 8, 8]


@pytest.mark.deepspeed
def test_the_stage_split_is_deepspeeds_own_partition() -> None:
    """The partition stage_loads assumes is what DeepSpeed's partition_balanced returns for the binary weights its
    type: regex gives the layers (deepspeed/runtime/pipe/module.py _partition_layers)."""
    from deepspeed.runtime.utils import partition_balanced

    from harness.costmodel.timing import stage_loads

    for layers, pp, method in ((70, 8, "type:transformer"), (70, 12, "type:transformer"), (30, 4, "type:transformer"),
                               (70, 12, "type:transformer|embedding"), (30, 4, "type:transformer|embedding")):
        ends = int(method.endswith("embedding"))
        weights = [0, ends] + [1] * layers + [0, ends, 0]  # fp16 cast, embedding, blocks, norm, head, fp32 cast
        parts = partition_balanced(weights, pp)
        blocks = [sum(weights[parts[s]:parts[s + 1]]) for s in range(pp)]
        blocks[0], blocks[-1] = blocks[0] - ends, blocks[-1] - ends
        job, _ = job_and_hw([*LLAMA, f"model.n_layers={layers}", "backend=deepspeed3d", f"parallel.pp={pp}",
                             f"train.global_batch_size={8 * pp}", "costmodel.software=megatron-deepspeed",
                             f"costmodel.pp_partition={method}"], pp)
        assert [b for b, _ in stage_loads(job)] == blocks, (layers, pp, method)


def test_a_pipeline_that_spans_nodes_sends_across_them() -> None:
    """Stages fill nodes in order (TP fastest, then DP, then PP), so a pipeline of 2-rank stages on 8-GPU nodes keeps
    every boundary in one node at 4 stages; at 8 the boundary between the 4th and 5th stage crosses nodes, and it
    paces every micro-batch: the sends are priced over the network."""
    from harness.costmodel.comm import pp_collectives

    def sends(pp: int) -> Any:
        job, _ = job_and_hw([*LLAMA, "model.n_layers=8", "backend=deepspeed3d", "parallel.tp=2", f"parallel.pp={pp}",
                             "train.global_batch_size=32"], 2 * pp)
        return next(c for c in pp_collectives(job) if c.kind == "send_recv")

    assert sends(4).intra_node and not sends(8).intra_node


def test_pipeline_sends_overlap_compute_only_under_the_interleaved_schedule() -> None:
    """Megatron-LM overlaps its pipeline sends with compute (overlap_p2p_comm) only in the interleaved schedule: it
    turns the flag off without virtual stages, whose schedule raises "Non-interleaved pipeline parallelism does not
    support overlapping p2p communication" (megatron/core/pipeline_parallel/schedules.py). So plain 1F1B exposes
    every send; with virtual stages only the fill and drain sends are exposed."""
    from harness.core.registry import resolve_pp_schedule
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import step_time

    job, hw = job_and_hw([*LLAMA, "model.n_layers=8", "backend=deepspeed3d", "costmodel.software=megatron-lm",
                          "parallel.pp=4", "train.global_batch_size=32"], 4)
    assert job.software.p2p_overlap and job.vpp == 1
    plain = step_time(job, collectives(job), hw)
    assert plain.exposed_comm_s["pp"] == pytest.approx(plain.comm_s["pp"])
    chunked = dataclasses.replace(job, vpp=2, pp_schedule=resolve_pp_schedule(None, 2))
    interleaved = step_time(chunked, collectives(chunked), hw)
    assert 0 < interleaved.exposed_comm_s["pp"] < interleaved.comm_s["pp"] / 2


def test_a_micro_batchs_compute_is_remembered_per_context_parallel_split() -> None:
    """The planner reuses a micro-batch's compute across layouts; a context-parallel rank runs 1/cp of each sequence,
    so a split computed first must not be handed to another (in one process, as `harness plan` searches)."""
    from harness.costmodel.timing import _compute_s

    base = [*LLAMA, "parallel.tp=2", "train.global_batch_size=16"]
    split, hw = job_and_hw([*base, "parallel.cp=2"], 16)
    whole, _ = job_and_hw(base, 16)
    first = micro_batch_compute_s(split, hw)
    second = micro_batch_compute_s(whole, hw)
    assert second == pytest.approx(_compute_s(whole, hw)[0]) and second > 1.5 * first
    ring, _ = job_and_hw([*base, "parallel.cp=2", "parallel.cp_kind=ring"], 16)
    assert micro_batch_compute_s(ring, hw) == pytest.approx(_compute_s(ring, hw)[0])


def test_fsdp_pays_the_collective_latency_once_per_fully_shard_unit() -> None:
    """FSDP2 gathers and reduce-scatters one `fully_shard` unit at a time (each block, then the root), so a pass
    over the model across many nodes is layers + 1 ring collectives, each with the library's latency, not one: the
    same bytes cost more the more ranks the ring has, and the bytes (what a profiler records) do not change."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import collective_s

    def dp(world: int) -> list[tuple[Any, float, float]]:
        job, hw = job_and_hw([*LLAMA, "model.n_layers=16", "parallel.tp=8", f"train.global_batch_size={world // 4}",
                              "system=dgx-h100"], world)
        out = []
        for c in collectives(job):
            if c.dim == "dp":
                one = hw.fabric.call_s(c.kind, c.payload_bytes, c.group, c.local)
                out.append((c, collective_s(c, hw), c.calls * one))
        return out

    for world in (64, 1024):  # FSDP over 8 and 128 nodes, one rank per node
        for c, split, whole in dp(world):
            assert c.units == 17 and c.local == 1
            assert split > whole  # sixteen more latencies
    small = [split / whole for _, split, whole in dp(64)]
    large = [split / whole for _, split, whole in dp(1024)]
    assert all(b > a for a, b in zip(small, large))  # a ring's latency grows with its ranks, the bytes do not


def test_deepspeeds_zero_1_and_2_all_reduce_each_gradient_bucket() -> None:
    """DeepSpeed 0.19 (the version the harness pins) puts every slice of a ZeRO-1/2 gradient bucket in one
    all-reduce (use_multi_rank_bucket_allreduce, default on: stage_1_and_2.py average_tensor), twice a
    reduce-scatter's bytes on the wire; turned off, the slices are reduced to their owners. Megatron-DeepSpeed's
    tables keep the reduce-scatter volume their BF16_Optimizer moves."""
    from harness.costmodel.comm import dp_collectives

    def reduction(*extra: str) -> Any:
        job, _ = job_and_hw(["model=gpt-tiny", "system=dgx-a100-80gb", "train.precision=bf16",
                             "train.global_batch_size=16", *extra], 8)
        return next(c for c in dp_collectives(job) if c.role == "grads")

    for stage in (1, 2):
        whole = reduction("backend=deepspeed", f"parallel.zero_stage={stage}")
        owners = reduction("backend=deepspeed", f"parallel.zero_stage={stage}",
                           "+backend.ds_config.zero_optimization.use_multi_rank_bucket_allreduce=false")
        assert (whole.kind, owners.kind) == ("all_reduce", "reduce_scatter")
        assert whole.wire_bytes == pytest.approx(2 * owners.wire_bytes)
    assert reduction("backend=deepspeed3d", "parallel.zero_stage=1", "costmodel.software=megatron-deepspeed").kind \
        == "reduce_scatter"


def test_megatrons_own_optimizer_holds_no_deepspeed_gradient_bucket() -> None:
    """Predicted under the deepspeed3d backend, Megatron-LM's profiles run Megatron's distributed optimizer and its
    contiguous grad buffer, not DeepSpeed's ZeRO-1 with its preallocated reduce bucket; Megatron-DeepSpeed does run
    DeepSpeed's engine and keeps it."""
    from harness.costmodel.memory import buffer_bytes

    def buffers(software: str, *extra: str) -> float:
        job, _ = job_and_hw([*LLAMA, "backend=deepspeed3d", "parallel.zero_stage=1", "train.global_batch_size=16",
                             f"costmodel.software={software}", *extra], 8)
        return buffer_bytes(job)

    off = "+backend.ds_config.zero_optimization.contiguous_gradients=false"
    for megatron in ("megatron-lm", "megatron-lm-2021"):
        assert buffers(megatron) == buffers(megatron, off)
    assert buffers("harness-deepspeed3d") - buffers("harness-deepspeed3d", off) == pytest.approx(5e8 * 2, rel=1e-3)


def test_fsdp_gathers_hide_only_under_the_phase_that_issues_them() -> None:
    """A block's forward gather must finish within the forward of the block before it: when the forward's compute
    is shorter than its gathers, the excess is exposed even though the whole micro-batch's compute (3-4x the
    forward) would cover all of them (beside the step's first gathers, which nothing precedes)."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import collective_s, exposed_dp_s, forward_share, root_share, sharded_edge_share

    job, hw = job_and_hw([*LLAMA, "model.n_layers=32", "train.global_batch_size=32", "system.devices_per_node=1",
                          "system.nics_per_node=1", "system.nic_bw_gb_per_s=50"], 16)
    gathers = [(c, collective_s(c, hw)) for c in collectives(job) if c.role == "params"]
    per_mb, m = micro_batch_compute_s(job, hw), job.micro_batches
    share = forward_share(job, hw)
    total = sum(t for _, t in gathers)
    assert 0 < share < 0.5 and gathers[0][0].calls == 2 * m  # forward and backward, resharded
    assert share * per_mb * m < total / 2 < total < per_mb * m
    fill = total / (2 * m) * sharded_edge_share(job)  # the step's first forward gathers: exposed whatever the phase
    overflow = total / 2 - fill - share * per_mb * m
    assert overflow > 0
    root = total / 2 * root_share(job)  # each backward's first gather, the root's: see the test below
    assert exposed_dp_s(gathers, job, per_mb, hw) == pytest.approx(fill + overflow + root)


def test_fsdps_root_module_counts_the_vocabulary_layers_as_the_tp_rank_holds_them() -> None:
    """The root module (embedding, final norm, output layer) that FSDP gathers whole per rank is what that TP rank
    holds: KempnerForge splits the output layer over TP and replicates the embedding; the harness's FSDP backend
    replicates a tied embedding. Memory (the gathered root in the backward and at its end) and the exposed ends of
    FSDP's collectives use it."""
    from harness.costmodel.layout import param_split
    from harness.costmodel.memory import buffer_bytes

    V, h, tp = 128256, 4096, 2
    for software, tied, root in (("kempnerforge", "false", V * h + V * h / tp + h),  # embedding, head/TP, norm
                                 ("harness-fsdp", "true", V * h + h)):  # one embedding, the norm
        job, _ = job_and_hw([*LLAMA, "parallel.tp=2", "train.global_batch_size=8", f"costmodel.software={software}",
                             f"model.tie_embeddings={tied}"], 4)
        assert job.root_params_per_rank == pytest.approx(root)
        split = param_split(job.model)
        assert job.block_params_per_rank == pytest.approx(split.per_layer / tp, rel=1e-3)
        if software == "kempnerforge":  # its loss holds 4E per logit, with every unit resharded after the forward
            assert buffer_bytes(job) == pytest.approx(job.tokens * V * 4 * job.act_bytes)


def test_fsdp2_on_a_one_rank_group_still_gathers_and_reduces_through_buffers() -> None:
    """FSDP2 wraps a TP-only mesh (data-parallel size 1) and no_shard's one-rank shard groups in the same units as a
    sharded run: at world size 1 it copies each unit's parameters into unsharded buffers and its gradients into a
    reduce-scatter input (torch FSDPParamGroup.wait_for_unshard, foreach_reduce), so a rank holds two gathered
    blocks, the root and one unsharded block gradient beside its shards, as it does on a larger group. DDP
    holds none of them. On this CPU the harness's own FSDP run at TP 2 on 2 ranks measured 20% more than the
    model gave it without them (benchmarks/memory_cpu.py)."""
    from harness.costmodel.memory import buffer_bytes, gathered_bytes, model_state_bytes

    tp_only, _ = job_and_hw([*LLAMA, "backend=fsdp", "parallel.tp=2", "train.global_batch_size=2"], 2)
    sharded, _ = job_and_hw([*LLAMA, "backend=fsdp", "parallel.tp=2", "train.global_batch_size=4"], 4)
    assert tp_only.layout.dp == 1 and tp_only.shards.weights == 1 and sharded.shards.weights == 2
    E, block, root = tp_only.act_bytes, tp_only.block_params_per_rank, tp_only.root_params_per_rank
    head = tp_only.vocab_per_rank[0] * tp_only.model.d_model  # the output layer's gradient, held in the backward
    assert gathered_bytes(tp_only) == pytest.approx((2 * block + root) * E + block * tp_only.reduce_bytes
                                                    + (block + head) * E)
    assert gathered_bytes(tp_only) == pytest.approx(gathered_bytes(sharded))
    # no_shard never reshards after the forward (harness/backends/fsdp.py): every unit stays gathered
    no_shard, _ = job_and_hw([*LLAMA, "backend=fsdp", "backend.sharding=no_shard"], 2)
    # (the first block's gradient in place of its parameters, freed before its reduction; the output layer's beside)
    ns_block, ns_head = no_shard.block_params_per_rank, no_shard.vocab_per_rank[0] * no_shard.model.d_model
    assert no_shard.shards.weights == 1 and gathered_bytes(no_shard) == pytest.approx(
        no_shard.params_per_rank * no_shard.act_bytes + ns_block * no_shard.reduce_bytes + ns_head * no_shard.act_bytes)
    ddp, _ = job_and_hw([*LLAMA, "backend=ddp"], 2)
    assert gathered_bytes(ddp) == 0.0 and buffer_bytes(tp_only) > gathered_bytes(tp_only)  # counted in the buffers
    # One GPU: the harness wraps it in FSDP2 all the same; KempnerForge builds no mesh and trains the plain model,
    # its gradients accumulating in the parameters' dtype, not FSDP's fp32
    harness, _ = job_and_hw([*LLAMA, "backend=fsdp", "train.global_batch_size=4"], 1)
    kempnerforge, _ = job_and_hw([*LLAMA, "backend=fsdp", "train.global_batch_size=4",
                                  "costmodel.software=kempnerforge"], 1)
    assert harness.micro_batches == kempnerforge.micro_batches == 2
    assert gathered_bytes(harness) > 0 and harness.unsharded_grad_bytes == 4
    assert gathered_bytes(kempnerforge) == 0.0 and kempnerforge.unsharded_grad_bytes is None
    assert model_state_bytes(kempnerforge.params_per_rank, kempnerforge)["grads"] == pytest.approx(
        kempnerforge.params_per_rank * 2)


def test_fsdp2_peaks_in_the_phase_that_holds_the_most_not_at_the_sum_of_all_of_them() -> None:
    """FSDP2's buffers are not all live at once (torch 2.13, _fsdp_param_group.py; torch.profiler memory traces of
    the harness's FSDP2 runs on this CPU show each, docs/costmodel.md). At the loss's peak every unit is resharded
    after its forward (the root too, as the harness and KempnerForge pass reshard_after_forward), except that the
    harness's model returns the loss from the root's forward, so the root's pre-backward hook gathers the root and
    prefetches the last block before the loss's backward runs (KempnerForge's loop computes the loss outside the
    model: nothing). A block's backward holds two blocks, the root, the current block's gradient, the previous
    one's reduce-scatter input and the output layer's gradient. At the backward's end the embedding's backward
    holds the root, block 0's reduce-scatter input and the embedding's dense gradient, three vocabulary × hidden
    tensors for a tied embedding (the output layer's gradient, the embedding's and their sum); then the root's
    reduction holds its gradients beside their reduce-scatter copy, its parameters already freed. The peak is the
    largest of them. shard_grad_op keeps every unit gathered from the forward to the backward."""
    from harness.costmodel.memory import (
        busiest_rank,
        end_of_backward_bytes,
        gathered_at_loss,
        gathered_bytes,
        loss_bytes,
        rank_memories,
        recompute_working_set,
    )

    tiny = ["model=gpt-tiny", "model.d_model=512", "model.n_heads=8", "model.n_layers=4", "model.vocab_size=8192",
            "model.seq_len=64", "train.precision=fp32", "train.micro_batch_size=1", "train.global_batch_size=2",
            "backend=fsdp", "system=dgx-a100-80gb"]
    job, _ = job_and_hw(tiny, 2)
    rank = busiest_rank(job)
    E, block, V, h = job.act_bytes, job.block_params_per_rank, 8192, 512
    root = job.root_params_per_rank
    # the tied token embedding, the learned positions and the final norm
    assert job.model.tie_embeddings and root == pytest.approx(V * h + 64 * h + 2 * h)
    assert gathered_at_loss(job, rank) == pytest.approx((root + block) * E)
    holds_logits = dataclasses.replace(job, software=dataclasses.replace(job.software, loop_holds_logits=True))
    assert gathered_at_loss(holds_logits, rank) == 0.0
    backward = (2 * block + root) * E + block * job.reduce_bytes + (block + V * h) * E
    assert gathered_bytes(job, rank) == pytest.approx(backward)
    embedding_phase = root * E + 3 * V * h * E + block * job.reduce_bytes
    reduce_phase = root * (E + job.reduce_bytes)
    assert end_of_backward_bytes(job, rank, 0.0) == pytest.approx(max(embedding_phase, reduce_phase))
    memory = rank_memories(job, [rank])[0]
    peak, held = loss_bytes(job)
    loss_phase = peak + (root + block) * E - recompute_working_set(job)
    assert memory["buffers"] == pytest.approx(max(loss_phase, held + backward, embedding_phase - memory["activations"]))
    assert memory["buffers"] < loss_phase + backward + embedding_phase - 2 * (root + block) * E  # not their sum
    # a wider vocabulary: the embedding's backward, its three vocabulary × hidden tensors, is the step's peak
    wide, _ = job_and_hw([*tiny, "model.vocab_size=32768"], 2)
    wide_rank = busiest_rank(wide)
    wide_memory = rank_memories(wide, [wide_rank])[0]
    wide_end = (wide.root_params_per_rank + 3 * 32768 * h) * E + block * wide.reduce_bytes
    assert end_of_backward_bytes(wide, wide_rank, 0.0) == pytest.approx(wide_end)
    assert wide_memory["buffers"] == pytest.approx(wide_end - wide_memory["activations"])
    kept, _ = job_and_hw([*tiny, "backend.sharding=shard_grad_op"], 2)
    assert gathered_at_loss(kept, busiest_rank(kept)) == pytest.approx(kept.params_per_rank * E)
    # its backward peaks at the first block's reduction: every unit gathered but that block, whose gradient
    # replaced its parameters, the block's reduce-scatter input and the output layer's gradient
    assert gathered_bytes(kept) == pytest.approx(kept.params_per_rank * E + block * kept.reduce_bytes + V * h * E)


def test_the_ends_of_fsdps_pipeline_of_collectives_are_exposed_however_much_compute_there_is() -> None:
    """Each micro-batch's first gathers (the root module's embedding, norm and head, then block 0's) precede its
    compute: FSDP2's root pre-forward makes them wait for the optimizer's update at a step's first forward and for
    the previous backward after it (torch _fsdp_state._root_pre_forward), and the step's last reduce-scatters
    (block 0's and the root's) follow all compute. A root resharded after the forward (reshard_after_forward
    passed explicitly, as the harness and KempnerForge pass it) is gathered again by its pre-backward hook, which
    fires only once the loss's backward has produced the logits' gradient: the output layer's backward waits for
    it. So even a step whose compute could hide every collective exposes those shares of each micro-batch's
    gathers and of the reduce-scatter. Without sharded parameters nothing is exposed."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.layout import param_split
    from harness.costmodel.timing import collective_s, exposed_dp_s, root_share, sharded_edge_share

    job, hw = job_and_hw([*LLAMA, "train.global_batch_size=64", "train.micro_batch_size=4"], 8)
    timed = [(c, collective_s(c, hw)) for c in collectives(job) if c.dim == "dp"]
    gather = next((c, t) for c, t in timed if c.role == "params")
    scatter = next((c, t) for c, t in timed if c.role == "grads")
    per_mb, m = micro_batch_compute_s(job, hw), job.micro_batches
    assert m == 2 and gather[1] + scatter[1] < 0.2 * per_mb * m  # the compute could cover all of it
    split = param_split(job.model)
    edge = sharded_edge_share(job)
    assert edge == pytest.approx((split.embedding + split.head + split.per_layer) / split.total, rel=1e-3)
    root = root_share(job)
    assert root == pytest.approx((split.embedding + split.head) / split.total, rel=1e-3)
    fill, drain = gather[1] / gather[0].calls * (edge + root), scatter[1] * edge
    assert exposed_dp_s(timed, job, per_mb, hw) == pytest.approx(m * fill + drain)
    # shard_grad_op keeps every unit gathered from its forward to its backward: no second gather of the root
    kept, _ = job_and_hw([*LLAMA, "train.global_batch_size=64", "train.micro_batch_size=4",
                          "backend.sharding=shard_grad_op"], 8)
    timed_kept = [(c, collective_s(c, hw)) for c in collectives(kept) if c.dim == "dp"]
    gathered = next((c, t) for c, t in timed_kept if c.role == "params")
    assert gathered[0].calls == m
    assert exposed_dp_s(timed_kept, kept, per_mb, hw) == pytest.approx(m * gathered[1] / m * edge + drain)
    # HSDP: each block's reduce-scatter is followed by its all-reduce across the replicas (FSDP2's foreach_reduce),
    # so block 0's and the root's all-reduce follow all compute as well
    hsdp, hw = job_and_hw([*LLAMA, "train.global_batch_size=64", "train.micro_batch_size=4",
                           "backend.sharding=hybrid_shard", "backend.hybrid_shard_group=4"], 8)
    timed = [(c, collective_s(c, hw)) for c in collectives(hsdp) if c.dim == "dp"]
    gather = next((c, t) for c, t in timed if c.role == "params")
    reductions = [t for c, t in timed if c.role == "grads"]
    assert len(reductions) == 2 and min(reductions) > 0  # the reduce-scatter, then the replicas' all-reduce
    edge = sharded_edge_share(hsdp)
    per_mb = micro_batch_compute_s(hsdp, hw)
    assert exposed_dp_s(timed, hsdp, per_mb, hw) == pytest.approx(hsdp.micro_batches * gather[1] / gather[0].calls
                                                                  * (edge + root) + sum(reductions) * edge)
    # PyTorch DDP: its last bucket is the input embedding's gradient alone, ready when the backward ends
    ddp, hw = job_and_hw([*LLAMA, "train.global_batch_size=64", "train.micro_batch_size=4", "backend=ddp"], 8)
    tail = (split.embedding + 25 * 2**20 / 2 / 4) / split.total  # beside it, half a 25 MiB bucket of fp32 grads
    assert sharded_edge_share(ddp) == pytest.approx(tail, rel=1e-6)
    timed = [(c, collective_s(c, hw)) for c in collectives(ddp) if c.dim == "dp"]
    ((reduce, t),) = timed
    assert exposed_dp_s(timed, ddp, micro_batch_compute_s(ddp, hw), hw) == pytest.approx(t * tail)
    alone, _ = job_and_hw([*LLAMA, "backend=ddp"], 1)
    assert sharded_edge_share(alone) == 0.0


def test_ddp_copies_the_gradients_into_its_buckets_and_back() -> None:
    """Without gradient_as_bucket_view (DDP's default and Fabric's) the reducer copies each gradient into its
    bucket during the synchronising backward and back into .grad after the bucket's all-reduce: 4 passes of the
    fp32 gradients per step, 16 bytes per parameter, on one rank none."""
    from harness.costmodel.timing import ddp_bucket_copies_s, grad_accumulation_s

    ddp, hw = job_and_hw([*LLAMA, "backend=ddp", "train.global_batch_size=16"], 8)
    assert ddp_bucket_copies_s(ddp, hw) == pytest.approx(ddp.params_per_rank * 16 / hw.memory_bw)
    assert grad_accumulation_s(ddp, hw) == pytest.approx(ddp_bucket_copies_s(ddp, hw))  # one micro-batch
    alone, hw1 = job_and_hw([*LLAMA, "backend=ddp"], 1)
    fsdp, hw8 = job_and_hw([*LLAMA, "train.global_batch_size=16"], 8)
    assert ddp_bucket_copies_s(alone, hw1) == 0.0 and ddp_bucket_copies_s(fsdp, hw8) == 0.0


# --- memory -------------------------------------------------------------------------------------------------------


def test_compute_that_a_collective_overlaps_runs_slower_and_a_cpu_has_no_such_overlap() -> None:
    """FSDP's gathers and reductions hide under compute, which they slow by OVERLAP_SLOWDOWN while they run beside
    it (their kernels hold SMs): the step grows by that share of the hidden communication, and by nothing with the
    slowdown set to 0 or on a CPU (whose cores compute and communicate in turn)."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import OVERLAP_SLOWDOWN, step_time

    base = ["model=gpt-1.3b", "system=dgx-h100", "backend=fsdp", "train.precision=bf16", "parallel.world_size=16",
            "train.global_batch_size=16"]
    job, hw = job_and_hw(base, 16)
    timed = step_time(job, collectives(job), hw)
    hidden = timed.comm_s["dp"] - timed.exposed_comm_s["dp"]
    assert hidden > 0 and hw.overlap_slowdown == OVERLAP_SLOWDOWN
    assert timed.memory_bound_s["contention"] == pytest.approx(OVERLAP_SLOWDOWN * min(hidden, timed.compute_s))
    _, site = job_and_hw([*base, "system.overlap_slowdown=0.0"], 16)
    assert site.overlap_slowdown == 0.0  # a site's own figure, even zero, wins over the published one
    free = step_time(job, collectives(job), site)
    assert timed.step_s - free.step_s == pytest.approx(timed.memory_bound_s["contention"])
    assert hardware(compose(["system=cpu"]).system, 0.1).overlap_slowdown == 0.0


def test_memory_check_refuses_only_clear_cases() -> None:
    have = 80e9
    assert memory_verdict(79e9, have) == "fits"
    assert memory_verdict(have * (1 + REFUSE_ABOVE) / 2, have) == "tight"
    assert memory_verdict(have * REFUSE_ABOVE * 1.01, have) == "too big"
    assert memory_verdict(1e12, None) is None


def test_run_warns_on_a_tight_layout_and_refuses_a_clear_one(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from harness.core.errors import ConfigError
    from harness.run import preflight

    cfg = compose(["model=gpt-tiny"])
    est = preflight.check_config(cfg, 1).estimate
    need = est["memory_per_device_bytes"]["total"]
    monkeypatch.setattr(preflight, "available_bytes", lambda device, ranks: (need / 1.1, "the test device"))
    preflight.check_memory_fit(cfg, est, "cuda", 1)
    assert "warning" in capsys.readouterr().err
    monkeypatch.setattr(preflight, "available_bytes", lambda device, ranks: (need / 1.5, "the test device"))
    with pytest.raises(ConfigError, match="needs"):
        preflight.check_memory_fit(cfg, est, "cuda", 1)


def test_the_memory_check_refuses_the_175b_layout_that_ran_out_of_memory_and_passes_the_ones_that_ran() -> None:
    """KempnerForge's 175B on 360 H200 (TP 4 x FSDP 90) ran at 8 sequences per GPU in one micro-batch (53.8 GiB)
    and at 1 (19.7 GiB), and ran out of memory at 1 x 8 accumulation steps, its README says because FSDP2 keeps
    the unsharded fp32 gradient while it accumulates ("the model size in fp32 divided by TP": 4 bytes per
    parameter of the TP shard, 175 GB, where the README's own "about 87 GB" would be 2)."""
    from harness.costmodel.estimate import estimate
    from harness.costmodel.published import RUNS, table_rows

    table = next(t for t in yaml.safe_load(RUNS.read_text())["tables"] if t["id"] == "kempnerforge-h200-175b")
    ran = []
    for _, overrides, world, _ in table_rows(table):
        cfg = compose(overrides)
        ran.append(estimate(cfg, validate(cfg, world))["memory_verdict"])
    assert ran == ["fits", "fits"]
    batch_1 = table_rows(table)[1][1]
    cfg = compose([*batch_1, "train.global_batch_size=720"])  # 1 sequence per GPU, 8 accumulation steps
    est = estimate(cfg, validate(cfg, 360))
    assert est["memory_verdict"] == "too big"
    assert est["memory_per_device_bytes"]["grads"] >= 4 * 175e9 / 4 * 0.95


def test_a_ranks_fsdp_units_and_tp_collectives_follow_the_blocks_it_holds() -> None:
    """The rank that holds the most blocks sets the FSDP units it gathers and the TP collectives it runs: under
    ZBV's v placement 14 blocks on 2 ranks are [embedding, 3] + [3, head] on rank 0 and [4] + [4] on rank 1, so
    rank 1 runs 8 blocks' collectives, not ceil(14 / 2) = 7."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.layout import layers_per_stage

    zbv, _ = job_and_hw([*LLAMA, "model.n_layers=14", "parallel.pp=2", "parallel.vpp=2", "parallel.tp=2",
                         "parallel.sequence_parallel=true", "backend.pp_schedule=ZBVZeroBubble",
                         "train.global_batch_size=16"], 8)
    assert layers_per_stage(zbv) == 8
    by_kind = {(c.dim, c.kind): c for c in collectives(zbv)}
    # one fully_shard per block; each stage module is a root of its own, and rank 1's two (middle stages) hold no
    # parameters outside their blocks
    assert by_kind[("dp", "all_gather")].units == 8 and zbv.fsdp_units == 8
    assert dataclasses.replace(zbv, layout=dataclasses.replace(zbv.layout, pp=1)).fsdp_units == 14 + 1
    looped = dataclasses.replace(zbv, pp_schedule="Interleaved1F1B")
    assert layers_per_stage(looped) == 7  # looped: rank r holds virtual stages r and r + 2, 4 + 3 blocks
    looped_gathers = {(c.dim, c.kind): c for c in collectives(looped)}[("tp", "all_gather")].calls
    assert by_kind[("tp", "all_gather")].calls > looped_gathers  # a block more of sequence-parallel gathers


def test_fsdp2s_copies_around_its_collectives_cost_hbm_time_on_the_compute_stream() -> None:
    """After each all-gather FSDP2 copies the gathered buffer into the unit's parameters, and before the
    reduce-scatter it copies the unsharded gradients into the collective's input, both on the compute stream
    (torch foreach_all_gather_copy_out in wait_for_unshard, foreach_reduce_scatter_copy_in in foreach_reduce): a
    read and a write of the unit each. full_shard gathers twice per micro-batch, shard_grad_op once; on a one-rank
    group the fp32 shards' cast to bf16 runs there too; after one micro-batch the reduce-scatter's input is cast from
    bf16, after several copied from the fp32 sum. DDP copies none of them."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import StepTime, fsdp_copies_s, fsdp_copy_kernels, step_time

    def copies(*extra: str, world: int = 8) -> tuple[Job, dict[str, float]]:
        job, hw = job_and_hw([*LLAMA, "train.micro_batch_size=4", *extra], world)
        timed = step_time(job, collectives(job), hw)
        assert isinstance(timed, StepTime) and timed.memory_bound_s["fsdp_copies"] == fsdp_copies_s(job, hw)
        return job, {k.name.split()[-1]: k.bytes for k in fsdp_copy_kernels(job)}

    full, out = copies("train.global_batch_size=64")
    P, m = full.params_per_rank, full.micro_batches
    assert m == 2 and full.act_bytes == 2 and full.reduce_bytes == 4 and full.fsdp_units == 4 + 1
    assert out == {"copy-out": 2 * m * P * (2 + 2), "copy-in": P * (4 + 4)}  # bf16 gathers, fp32 sum
    kept, out = copies("train.global_batch_size=64", "backend.sharding=shard_grad_op")
    assert out == {"copy-out": m * P * (2 + 2), "copy-in": P * (4 + 4)}  # one gather per micro-batch
    one, out = copies("train.global_batch_size=4", world=1)
    assert one.micro_batches == 1 and one.state_bytes.weights == 4
    assert out == {"copy-out": 2 * P * (4 + 2 + 2 + 2), "copy-in": P * (2 + 4)}  # cast, copy; bf16 grads cast up
    _, out = copies("train.global_batch_size=64", "backend=ddp")
    assert out == {}


NANOTRON = ["system=dgx-h100", "backend=deepspeed3d", "costmodel.software=nanotron", "model.d_model=2048",
            "model.n_layers=4", "model.n_heads=32", "model.ffn_hidden=8192", "model.vocab_size=131072",
            "model.seq_len=4096", "model.activation=swiglu", "model.norm=rmsnorm", "model.position=rope",
            "model.bias=false", "model.tie_embeddings=true", "train.precision=bf16",
            "train.activation_checkpointing=none", "train.micro_batch_size=2", "train.global_batch_size=64"]


def test_nanotrons_zero1_all_reduces_the_whole_fp32_buffer_after_the_backward() -> None:
    """nanotron with fp32 gradient accumulation builds no DDP under ZeRO-1 (trainer.py make_ddp) and reduces the
    whole contiguous fp32 gradient buffer in one all-reduce after the backward (sync_gradients_across_dp with
    reduce_scatter=False): nothing hides it. Under ZeRO-0 DDP's buckets reduce during the last backward."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import collective_s, exposed_dp_s

    zero1, hw = job_and_hw([*NANOTRON, "parallel.zero_stage=1"], 8)
    timed = [(c, collective_s(c, hw)) for c in collectives(zero1) if c.dim == "dp"]
    reduce = next(c for c, _ in timed if c.role == "grads")
    assert reduce.kind == "all_reduce" and reduce.calls == 1
    assert reduce.payload_bytes == pytest.approx(zero1.params_per_rank * 4)  # the fp32 buffer
    assert not zero1.grad_reduce_overlap
    per_mb = micro_batch_compute_s(zero1, hw)
    assert exposed_dp_s(timed, zero1, per_mb, hw) == pytest.approx(sum(t for _, t in timed))
    zero0, hw = job_and_hw([*NANOTRON, "parallel.zero_stage=0"], 8)
    timed = [(c, collective_s(c, hw)) for c in collectives(zero0) if c.dim == "dp"]
    assert zero0.grad_reduce_overlap
    assert exposed_dp_s(timed, zero0, micro_batch_compute_s(zero0, hw), hw) < sum(t for _, t in timed) / 2


def test_the_embeddings_dense_gradient_is_filled_and_a_tied_heads_is_added_to_it() -> None:
    """PyTorch's embedding backward zero-fills a vocabulary x hidden gradient every micro-batch (rows split over TP
    where the embedding is vocabulary-parallel), and a tied output layer's gradient of the same tensor is summed
    with it by autograd, where both sit on one pipeline stage."""
    from harness.costmodel.kernels import head_kernels

    def gradient_bytes(*extra: str, world: int = 1) -> dict[str, float]:
        job, _ = job_and_hw([*NANOTRON, *extra], world)
        return {k.name: k.bytes for k in head_kernels(job) if "embedding gradient" in k.name}

    V, h, E = 131072, 2048, 2
    assert gradient_bytes("train.global_batch_size=2") == {"embedding gradient fill": V * h * E,
                                                           "tied embedding gradient sum": 3 * V * h * E}
    assert gradient_bytes("train.global_batch_size=2", "parallel.tp=2", world=2) == {
        "embedding gradient fill": V / 2 * h * E, "tied embedding gradient sum": 3 * V / 2 * h * E}  # vocab-parallel
    assert gradient_bytes("train.global_batch_size=4", "parallel.pp=2", world=2) == {
        "embedding gradient fill": V * h * E}  # the tied copy on the last stage is summed by an all-reduce instead
    autocast, _ = job_and_hw([*LLAMA, "backend=ddp", "costmodel.software=pytorch-autocast-script",
                              "train.global_batch_size=2"], 1)
    assert {k.name: k.bytes for k in head_kernels(autocast) if "embedding gradient" in k.name} == {
        "embedding gradient fill": 128256 * 4096 * 4}  # fp32 weights under autocast, untied


def test_a_group_inside_one_package_talks_over_the_packages_own_link() -> None:
    """Aurora's devices are tiles, two per Max 1550: the two tiles of one GPU move 196 GB/s between them (ALCF's
    node performance overview), the tiles of different GPUs about 20 over Xe Link. TP 2 on tiles 0 and 1 runs over
    the package's link; a group with a tile on another GPU (a data-parallel pair 2 apart, TP 4) over the fabric."""
    system = compose(["system=aurora"]).system
    net = fabric(system)
    assert net.package == 2 and net.package_bw == pytest.approx(196e9)
    assert net.intra_ring(2) == pytest.approx(196e9 * net.intra_efficiency)
    assert net.intra_ring(2, stride=2) == pytest.approx(20e9 * net.intra_efficiency)
    assert net.intra_ring(4) == pytest.approx(20e9 * net.intra_efficiency)
    inside, across = (net.call_s("all_reduce", 2**30, 2, 2, stride) for stride in (1, 2))
    assert across / inside == pytest.approx(196 / 20, rel=0.02)  # large: bandwidth, not latency
    flat = fabric(compose(["system=aurora", "system.devices_per_package=1"]).system)
    assert flat.call_s("all_reduce", 2**30, 2, 2) == pytest.approx(across)
    from harness.costmodel.whatif import SCENARIOS  # the intra-node what-if doubles the package's link too

    hw = hardware(system, lookup_peak(system.accelerator, "bf16").tflops)
    doubled = SCENARIOS["2x intra-node bandwidth"](hw).fabric
    assert doubled.intra_ring(2) == pytest.approx(2 * hw.fabric.intra_ring(2))


def test_nvls_tree_goes_beyond_the_nics_on_two_nodes_only() -> None:
    """On nodes with NVLink SHARP NCCL's NVLS tree reduces inside each node's switch and sends each rank's 1/local
    share between nodes: on two nodes at the node's whole NIC bandwidth, beyond the ring's limit (nccl-tests issue
    196; NCCL's tuning model doubles its inter-node bandwidth for two nodes), so a two-node all-reduce runs at the
    switch's NVLS rate; on four nodes at half of it, within the ring's limit; not at all where the site's network
    does not carry it (system.nvls_across_nodes) or without NVLink SHARP (A100)."""
    def busbw(*overrides: str, nodes: int) -> float:
        net = fabric(compose(list(overrides)).system)
        ranks, size = 8 * nodes, 2**30
        return 2 * (ranks - 1) / ranks * size / net.call_s("all_reduce", size, ranks, 8) / 1e9

    h100, off = ("system=dgx-h100",), ("system=dgx-h100", "system.nvls_across_nodes=false")
    nics = 8 * 50 * 0.94  # the ring's limit across nodes, GB/s
    assert busbw(*off, nodes=2) < nics < busbw(*h100, nodes=2)
    nvls = 450 * 0.61  # the switch's NVLS rate per device: the two-node tree's algorithm bandwidth
    assert busbw(*h100, nodes=2) == pytest.approx(2 * 15 / 16 * nvls, rel=0.02)  # beside 67 µs of latency
    assert busbw(*h100, nodes=1) == pytest.approx(2 * 7 / 8 * nvls, rel=0.01)  # what one node runs at
    assert busbw(*off, nodes=4) <= busbw(*h100, nodes=4) < nics  # half the NICs per tree: not beyond the ring's limit
    assert busbw("system=dgx-a100-80gb", nodes=2) < 8 * 25 * 0.96  # no NVLink SHARP: the ring's NIC limit


def test_fsdp_inside_pipeline_stages_gathers_each_unit_once_per_micro_batch_and_one_more() -> None:
    """torch's pipeline stages run every backward with set_reshard_after_backward(False): under 1F1B a unit is
    gathered for each backward, and for the forwards that follow a forward (the warm-up's and the first of the
    steady state), m + 1 times a step where a step outside a pipeline gathers it 2m times; never again under the
    zero-bubble schedules, whose units stay gathered from the first forward. Those gathers still hide under the
    compute: they are not all exposed for not being a multiple of the micro-batches."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.timing import collective_s, exposed_dp_s

    def job(*extra: str, world: int = 4) -> Job:
        return job_and_hw([*LLAMA, "model.n_layers=8", "train.global_batch_size=16", *extra], world)[0]

    flat = job(world=2)
    assert flat.fsdp_gathers == 2 * flat.micro_batches and not flat.keeps_units_gathered
    assert job("backend.sharding=shard_grad_op", world=2).fsdp_gathers == flat.micro_batches
    piped = job("parallel.pp=2")
    assert piped.keeps_units_gathered and piped.fsdp_gathers == piped.micro_batches + 1
    zbv = job("parallel.pp=2", "parallel.vpp=2", "backend.pp_schedule=ZBVZeroBubble")
    assert zbv.fsdp_gathers == 1
    piped, hw = job_and_hw([*LLAMA, "model.n_layers=8", "train.global_batch_size=16", "parallel.pp=2"], 4)
    timed = [(c, collective_s(c, hw)) for c in collectives(piped) if c.dim == "dp" and c.role == "params"]
    assert timed[0][0].calls == piped.micro_batches + 1
    total = sum(t for _, t in timed)
    assert 0 < exposed_dp_s(timed, piped, micro_batch_compute_s(piped, hw), hw) < total / 2
