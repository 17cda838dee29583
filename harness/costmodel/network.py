"""Collectives as NCCL and RCCL run them, over a node's fabric and its NICs.

A collective over p ranks, g of them in each of n nodes, is a ring (or, for an all-reduce across nodes, a
tree) over channels: each channel is a ring through the g local devices that enters and leaves the node on
one NIC, and the channels are spread over the node's NICs (NCCL's `ncclTopoSearchRecNet` takes the next NIC
for each channel, GPU-local first; RCCL's Frontier model prescribes 8 rings over its 4 NICs). So the bus
bandwidth of a ring is the smaller of

- the intra-node ring bandwidth of the g local devices: a switch (NVSwitch) gives each device its full link
  bandwidth; point-to-point links (xGMI on MI250X, NVLink without a switch) give what the channels found over
  the links carry at once (`ring_bandwidth`, a greedy channel search as NCCL's and RCCL's are); devices that
  share a package (Aurora's tiles, two per Max 1550) reach each other over the package's own link
  (`system.package_bw_gb_per_s`) when the group fits in one;
- the NICs' bandwidth that this group's share of the node's devices owns: all of a node's NICs when the group
  holds all of its devices (a data-parallel all-reduce with TP 1), 1/8 of them when it holds one device of
  eight (data parallelism beside TP 8: eight such groups share the node's NICs, one rail each),

each times the efficiency a published nccl-tests/rccl-tests measurement of the fabric reached (the system
profile's `intra_node_efficiency`, `nic_efficiency`, with their sources). Time = latency + the ring volume
over the bus bandwidth; the latency follows NCCL's own model (src/graph/tuning.cc, `ncclTopoTuneModel`): a
base per call plus a per-hop latency inside (`intra_hop_latency_us`) and between nodes
(`inter_hop_latency_us`), 2(p−1) hops for a ring all-reduce, 2·((g−1) + ⌊log2 n⌋) for a tree, which NCCL picks
across nodes when it is faster (its bandwidth is 0.92 of the ring's: the same file's tree cap). The profile's
latencies are the low-latency (LL) protocol's; each call runs in the protocol the library's model finds fastest
(`Protocol`: LL at a quarter of the bandwidth, LL128 at 0.92, Simple at all of it with 5× LL's per-hop latency
between nodes and 5.7× inside), so a small call pays LL's latency and a large one Simple's. On a
third-generation NVSwitch (H100, H200) NCCL runs an all-reduce inside a node with NVLink SHARP (NVLS), which
reduces in the switch: each device moves its payload once each way, at the measured `nvls_efficiency`; across
nodes its NVLS tree, which on two nodes goes beyond the NICs' ring limit (`Fabric._nvls_s`). NCCL's
own corrections apply as its `ncclTopoGetAlgoTime` applies them: a tree all-reduce's bandwidth times its
`treeCorrectionFactor` for the size (up to 256 MiB), a Simple ring all-reduce across nodes at 1.4× its latency (1.9×
before Ampere). RCCL's per-model correction tables (factors down to 0.1, there to steer its choice of algorithm)
are not rates and are not used. A tree all-reduce also pays its pipeline's fill and drain, 2 × depth chunk times,
where the profile states the library's channel count (`Fabric.tree_fill_s`, `system.coll_channels`).

Scored against published nccl-tests bus bandwidths (published_runs.yaml, kind `collective`): 128 MiB to 8 GiB,
2 to 540 nodes; at 128 MiB on one node nccl-tests still measures up to 26% less than this model (A100), and
11% less at 1 GiB over 540 Polaris nodes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from harness.core.registry import NIC_PATHS
from harness.trace.comm import GLOO_KIND

RING_FACTOR = {"all_reduce": lambda p: 2 * (p - 1) / p, "all_gather": lambda p: (p - 1) / p,
               "reduce_scatter": lambda p: (p - 1) / p, "send_recv": lambda p: 1.0,
               "all_to_all": lambda p: (p - 1) / p}
"""Bytes each rank sends per byte of the full tensor, for a ring of p ranks (Patarasuk & Yuan 2009); an
all-to-all's tensor is each rank's own, of which it keeps 1/p and sends the rest."""
def log2_down(n: int) -> int:
    """log2 rounded down, as NCCL counts a tree's levels over n nodes (`log2i`, src/include/utils.h: log2Down)."""
    return max(0, int(n).bit_length() - 1)


TREE_BANDWIDTH = 0.92
"""NCCL caps a tree all-reduce's bus bandwidth at 0.92 of the channels' (src/graph/tuning.cc)."""


@dataclass(frozen=True)
class Protocol:
    """One of the collective library's protocols as its tuning model costs it (NVIDIA/nccl and ROCm/rccl
    src/graph/tuning.cc, `ncclTopoTuneModel`): its latencies as multiples of the low-latency (LL) protocol's ring
    latencies, which the system profile states, and the share of the channels' bus bandwidth it moves. LL sends
    8-byte stores of 4 bytes of data and a flag; LL128 128-byte lines of 120; Simple whole buffers behind a fence,
    the slowest to start and the only one at full bandwidth. The library runs each collective with the protocol
    its model says is fastest, so small calls pay LL's latency and large ones Simple's; point-to-point calls (and
    an all-to-all, which NCCL runs as grouped sends) use LL up to `P2P_LL_THRESHOLD` bytes and Simple above."""

    name: str
    base: float
    """Per-call latency over LL's (the ring's `baseLat`)."""
    intra: float
    """Per ring hop inside a node (NVLink, xGMI) over LL's."""
    inter: float
    """Per ring hop between nodes over LL's."""
    tree_intra: float
    """Per tree hop inside a node over LL's ring hop."""
    tree_inter: float
    """Per tree hop between nodes over LL's ring hop."""
    share: float = 1.0
    """A ring's share of the channels' bus bandwidth."""
    share_in_node: Optional[float] = None
    """A ring's share for a call other than an all-reduce inside one node (NCCL's LL: 1/3 there, 1/4 otherwise)."""
    share_one_per_node: Optional[float] = None
    """A ring's share where each node holds one rank of the group (NCCL's LL128: 0.7 instead of 0.92)."""
    tree_share: float = 1.0
    """A tree's share of the tree's bandwidth (itself 0.92 of the channels': TREE_BANDWIDTH)."""
    tree_correction: tuple[float, ...] = ()
    """A tree all-reduce's bandwidth factor by log2(bytes / 64), for calls under 2^len × 64 bytes (NCCL's
    `treeCorrectionFactor`: "trees are not perfectly sticking to the model for medium sizes")."""
    ring_plateau: bool = False
    """A multi-node ring all-reduce in this protocol pays its latency `Fabric.ring_plateau` times (NCCL's
    "plateau effect of ring", Simple only)."""
    chunk: float = 524288.0
    """Bytes of data one channel moves per pipeline step of a tree (`computeCollChunkInfo`: the protocol's buffer
    over NCCL_STEPS, 8; LL carries 8 bytes of data per 16-byte line, LL128 120 of every 128)."""
    tree_chunk_halving: tuple[tuple[float, int], ...] = ()
    """How the library shrinks a tree's chunk for a call too small to fill its pipeline: (steps, floor) pairs, each
    halving the chunk while a channel's share of the call is fewer than steps × the tree's depth chunks and the
    chunk is above floor (RCCL's Simple tree; NCCL's up to 2.19, none from 2.20 on, still so at 2.30)."""

    def tree_factor(self, payload: float) -> float:
        """The tree correction for a call of `payload` bytes (1 where the table ends)."""
        index = int(payload) >> 6
        log = index.bit_length() - 1 if index > 0 else 0
        return self.tree_correction[log] if log < len(self.tree_correction) else 1.0

    def bandwidth_share(self, kind: str, local: int, nodes: int) -> float:
        if self.share_in_node is not None and nodes == 1 and kind != "all_reduce":
            return self.share_in_node
        if self.share_one_per_node is not None and local < 2:
            return self.share_one_per_node
        return self.share


NCCL_PROTOCOLS = (
    Protocol("LL", 1.0, 1.0, 1.0, 1.0, 5.0 / 2.7, share=1 / 4, share_in_node=1 / 3, tree_share=1 / 3.8,
             tree_correction=(1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0,
                              1.0, 1.0, 1.0), chunk=8 * 512 * 16 / 2),
    Protocol("LL128", 14.0 / 6.6, 1.9 / 0.6, 4.0 / 2.7, 1.25 / 0.6, 8.5 / 2.7, share=0.92, share_one_per_node=0.7,
             tree_share=120 / 128,
             tree_correction=(1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9,
                              .9, 1.0, 1.0), chunk=120 * 640 * 8 * 120 / 128),
    Protocol("Simple", 8.4 / 6.6, 3.4 / 0.6, 14.0 / 2.7, 4.0 / 0.6, 14.0 / 2.7,
             tree_correction=(.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8,
                              .9, .9), ring_plateau=True, chunk=(1 << 22) / 8),
)
"""NCCL's: ring base latency LL 6.6, LL128 14.0, Simple 8.4 µs; per NVLink hop ring 0.6, 1.9, 3.4 and tree 0.6,
1.25, 4.0; per network hop ring 2.7, 4.0, 14.0 and tree 5.0, 8.5, 14; a ring's LL at a quarter of the bandwidth (a
third for an in-node call other than an all-reduce), LL128 at 0.92 (0.7 with one rank per node); a tree's LL at
1/3.8, LL128 at 120/128 (NVIDIA/nccl src/graph/tuning.cc). A tree's chunk per channel and step (src/enqueue.cc
computeCollChunkInfo, from 2.20 on and unchanged at 2.30, over src/init.cc's default buffers): LL 32 KiB (8 lines
of 16 bytes for each of 512 threads over 8 steps, half of it data), LL128 576,000 bytes (120 8-byte words for each
of 640 threads over 8 steps, 120 of 128 data; halved for small calls: `Fabric.tree_chunk`), Simple 512 KiB (4 MiB
over 8 steps). Up to 2.19 NCCL also halved Simple's chunk for small calls, as RCCL still does, and started LL128's
halving from its whole 614,400-byte step; the model follows 2.20 on."""
RCCL_PROTOCOLS = (
    Protocol("LL", 1.0, 1.0, 1.0, 1.0, 12.5 / 9.5, share=0.20, tree_share=0.20, chunk=8 * 256 * 16 / 2),
    Protocol("Simple", 17.0 / 12.0, 3.6 / 0.8, 19.8 / 9.5, 2.5 / 0.8, 22.4 / 9.5, chunk=(1 << 22) / 8,
             tree_chunk_halving=((8, 131072), (4, 65536), (1, 32768))),
)
"""RCCL's for MI250X nodes (ROCm/rccl src/graph/tuning.cc, `tuning_model_3`, the model the system profile's LL
figures come from): base latency LL 12, Simple 17 µs; per xGMI hop ring 0.8, 3.6 and tree 0.8, 2.5; per network
hop ring 9.5, 19.8 and tree 12.5, 22.4; LL at 0.20 of the bandwidth (`bwRatio`); no LL128 on this model. Its tree
chunks (src/enqueue.cc at 0cbce2a): LL 16 KiB (256 threads where NCCL has 512), Simple 512 KiB, halved while a
channel's share of the call is fewer than 8, 4 and 1 times the tree's depth chunks, down to 128, 64 and 32 KiB."""
P2P_LL_THRESHOLD = 16384
"""Bytes up to which NCCL sends a point-to-point message with LL, above which with Simple (`NCCL_P2P_LL_THRESHOLD`'s
default); it never uses LL128 for them."""
GLOO_PROTOCOLS = (Protocol("gloo", 1.0, 1.0, 1.0, 1.0, 1.0),)
"""gloo on CPU hosts: one protocol, at the profile's latencies and bandwidth."""
NVLS_LATENCY = 25e-6
"""An NVLink SHARP all-reduce's latency inside a node (NCCL's `hwLat` NVLink NVLS Simple; its `baseLat` is 0)."""
NVLS_TREE_NET_LATENCY = 20.9e-6
"""Per tree level between nodes of NCCL's NVLS tree (`hwLat` NET NVLSTree Simple), twice per level (up and down)."""


@dataclass(frozen=True)
class Fabric:
    """A system's node and network, in bytes per second and seconds."""

    devices_per_node: int
    link_bw: Optional[float]
    """Per device, per direction, into the node's fabric (switch) or over all of its links (point-to-point)."""
    links: tuple[tuple[float, ...], ...] = ()
    """Point-to-point fabrics: per-direction bandwidth between each pair of a node's devices (0: no link)."""
    intra_efficiency: float = 0.8
    package: int = 1
    """Devices per package (Aurora: a Max 1550's two tiles)."""
    package_bw: Optional[float] = None
    """Per direction between two devices of one package, over the package's own link (None: none)."""
    nics: Optional[int] = None
    nic_bw: Optional[float] = None
    nic_efficiency: float = 0.8
    base_latency: float = 6.6e-6
    intra_hop: float = 0.6e-6
    inter_hop: float = 2.7e-6
    """The library's LL-protocol latencies (the other protocols' are multiples of them: `Protocol`)."""
    nvls_efficiency: Optional[float] = None
    """NVLink SHARP (third-generation NVSwitch): an all-reduce inside a node is reduced in the switch, so each device
    sends its data once and receives the sum once, at this fraction of its link bandwidth (None: no such switch)."""
    nvls_across_nodes: bool = True
    """NCCL's NVLS tree runs across nodes where the nodes have NVLink SHARP (`nvls_efficiency`)."""
    protocols: tuple[Protocol, ...] = NCCL_PROTOCOLS
    """The collective library's protocols (NCCL's, RCCL's, or gloo's one)."""
    ll128_across_nodes: bool = True
    """NCCL offers LL128 to a collective that spans nodes only where a GPU reaches its NIC over a PCIe switch (PXB,
    PXN from Hopper on; `ncclTopoTuneModel`'s `typeInter` check): not through the CPU's root complex (PHB, SYS)."""
    ring_plateau: float = 1.0
    """How many times its latency a multi-node ring all-reduce pays in a `Protocol.ring_plateau` protocol (NCCL:
    1.4 from compute capability 8.0, 1.9 below)."""
    channels: Optional[int] = None
    """The channels the library runs a collective on across nodes (NCCL's "N coll channels" line at init); None:
    not known, so a tree's pipeline fill is not priced (`tree_fill_s`)."""

    @property
    def gloo(self) -> bool:
        """The ranks talk through gloo (CPU hosts), which runs some collectives as others (trace.comm.GLOO_KIND: a
        reduce-scatter as an all-reduce of the whole tensor)."""
        return self.protocols is GLOO_PROTOCOLS

    def intra_ring(self, local: int, stride: int = 1) -> Optional[float]:
        """Bus bandwidth of a ring over the `local` devices 0, stride, 2·stride, ... of one node (a group whose ranks
        are `stride` apart: a data-parallel group beside TP, a pipeline's neighbours); None where the profile lacks
        it."""
        if local <= 1:
            return math.inf
        if self.package_bw and (local - 1) * stride < self.package:  # inside one package: its link joins each pair
            return (local - 1) * self.package_bw * self.intra_efficiency
        if self.links:
            held = range(0, min(local * stride, len(self.links)), stride)
            found = ring_bandwidth(tuple(tuple(self.links[i][j] for j in held) for i in held))
            if not found:  # no ring over direct links: over the widest routes through the node's other devices,
                # which share physical links, so at most what the whole node's rings carry
                routed = widest_routes(self.links)
                whole = ring_bandwidth(self.links)
                found = min(whole, ring_bandwidth(tuple(tuple(routed[i][j] for j in held) for i in held))) or whole
            return found * self.intra_efficiency
        return None if self.link_bw is None else self.link_bw * self.intra_efficiency

    def nic_share(self, local: int) -> Optional[float]:
        """The NIC bandwidth a group holding `local` of a node's devices owns (rails split among the groups)."""
        if self.nics is None or self.nic_bw is None:
            return None
        return self.nics * self.nic_bw * self.nic_efficiency * min(1.0, local / self.devices_per_node)

    def bus_bandwidth(self, local: int, nodes: int, stride: int = 1, fewest: Optional[int] = None) -> Optional[float]:
        """A ring's bus bandwidth: its slowest link, inside a node or out of the node whose members own the least
        of its NICs (`fewest` members: a group that ends in part of a node)."""
        intra = self.intra_ring(local, stride)
        net = self.nic_share(fewest or local) if nodes > 1 else math.inf
        if intra is None or net is None:
            return None
        return min(intra, net)

    def call_s(self, kind: str, payload: float, group: int, local: int, stride: int = 1) -> Optional[float]:
        """One call of a collective over `group` ranks, `local` of them per node, `stride` apart there; None where
        the profile lacks a bandwidth it needs."""
        if group <= 1:
            return 0.0
        if self.gloo:
            kind = GLOO_KIND.get(kind, kind)
        local = max(1, min(local, group))
        nodes = -(-group // local)  # a group that does not fill its last node still spans it
        fewest = group - (nodes - 1) * local
        if kind == "send_recv":
            return self._send_s(payload, local, nodes, stride)
        bw = self.bus_bandwidth(local, nodes, stride, fewest)
        if bw is None:
            return None
        if kind == "all_to_all" and nodes > 1:
            return self._all_to_all_s(payload, group, local, nodes, stride, fewest)
        steps = 2 * (group - 1) if kind == "all_reduce" else group - 1  # an all-to-all: p − 1 pairwise exchanges
        inter_steps = (2 if kind == "all_reduce" else 1) * (nodes - 1)
        tree = kind == "all_reduce" and nodes > 1
        protocols = self.p2p_protocols(payload / group) if kind == "all_to_all" else self.protocols
        if nodes > 1 and not self.ll128_across_nodes:
            protocols = tuple(p for p in protocols if p.name != "LL128")
        best = math.inf
        for p in protocols:
            rate = bw * p.bandwidth_share(kind, local, nodes)
            latency = (self.base_latency * p.base + (steps - inter_steps) * self.intra_hop * p.intra
                       + inter_steps * self.inter_hop * p.inter)
            if tree and p.ring_plateau:
                latency *= self.ring_plateau
            best = min(best, latency + RING_FACTOR[kind](group) * payload / rate)
            if tree:
                best = min(best, self.base_latency * p.base
                           + 2 * ((local - 1) * self.intra_hop * p.tree_intra
                                  + log2_down(nodes) * self.inter_hop * p.tree_inter)
                           + 2 * payload / (TREE_BANDWIDTH * bw * p.tree_share * p.tree_factor(payload))
                           + self.tree_fill_s(p, payload, group, local, stride, fewest))
        if kind == "all_reduce" and local > 1 and self.nvls_efficiency and not self.links and self.link_bw:
            best = min(best, self._nvls_s(payload, nodes, fewest))
        return best

    def tree_chunk(self, p: Protocol, payload: float, group: int, nodes: int) -> float:
        """The chunk each channel of a tree all-reduce over `group` ranks on `nodes` nodes moves per step in protocol
        `p` for a call of `payload` bytes (NCCL's and RCCL's computeCollChunkInfo): the protocol's, halved for a
        call too small to fill the pipeline where the library does so (NCCL's LL128 by the tree's steps per
        node-rank, RCCL's Simple by its depth), and never more than a channel's share of the call (the kernel
        moves min(chunk, what is left of the channel's share): src/device/all_reduce.h)."""
        channels = self.channels or 1
        ppn = group // nodes  # NCCL's nRanks / nNodes
        if p.name == "LL128":
            steps = 1 + log2_down(nodes) + 0.1 * ppn
            rules: tuple[tuple[float, float], ...] = ((steps * 64 / ppn, 131072), (steps * 16 / ppn, 32768))
        else:
            depth = ppn - 1 + log2_down(nodes)
            rules = tuple((depth * k, floor) for k, floor in p.tree_chunk_halving)
        chunk = p.chunk
        for least, floor in rules:
            while payload // (channels * chunk) < least and chunk > floor:
                chunk /= 2
        return min(chunk, math.ceil(payload / channels))

    def tree_fill_s(self, p: Protocol, payload: float, group: int, local: int, stride: int = 1,
                    fewest: Optional[int] = None) -> float:
        """The time a tree all-reduce's pipeline takes to fill and drain: a chunk reaches the root only after it
        has crossed every level of the tree, one chunk time per level, and comes back down the same way, so the
        call ends 2 × depth chunk times after its bandwidth term alone would have it. The tree's depth is NCCL's
        (src/graph/connect.cc connectTrees: nRanks/nNodes − 1 hops of the node's chain and ⌊log2 nodes⌋ levels
        between nodes); a chunk crosses a hop at its channel's share of that hop's bandwidth (the node's ring
        inside it, the members' NICs between nodes). What nccl-tests shows: over 256 and 540 Polaris nodes (a
        tree) an all-reduce of 128 MiB to 1 GiB takes about 2.4 ms beyond its bandwidth term, 2.0–3.4 ms from 8 to
        128 MiB, where over 8 nodes (a ring) it takes about 0.2 ms beyond at 64 MiB and up
        (argonne-lcf/alcf-nccl-tests results_polaris/nccl_2_21). 0 where the channel count is not known, and
        under gloo. The channel count is the library's for the group the profile's log shows; NCCL may build
        more or fewer channels for another group shape (one rank per node beside TP), which is not modelled."""
        local = max(1, min(local, group))
        nodes = -(-group // local)
        if self.channels is None or nodes <= 1 or self.gloo:
            return 0.0
        intra, net = self.intra_ring(local, stride), self.nic_share(fewest or group - (nodes - 1) * local)
        if intra is None or net is None:
            return 0.0
        hop = self.tree_chunk(p, payload, group, nodes) * self.channels / p.tree_share
        return 2 * hop * ((group // nodes - 1) / intra + log2_down(nodes) / net)

    def _nvls_s(self, payload: float, nodes: int, fewest: int) -> float:
        """An all-reduce with NVLink SHARP: inside a node NCCL's NVLS reduces in the switch, each device moving its
        payload once each way; across nodes its NVLS tree reduces in each node's switch and between nodes over a
        tree whose every rank sends its 1/local share on its rail. The network then carries the payload once each
        way per node, not a ring's 2(p−1)/p, and on two nodes (a tree of one edge, both directions busy at once)
        at the node's whole NIC bandwidth, on more at half of it: NCCL's `ncclTopoTuneModel` doubles the NVLS
        tree's inter-node bandwidth for nNodes ≤ 2 and halves every tree's bus bandwidth into its algorithm
        bandwidth (src/graph/tuning.cc). So on two nodes an all-reduce can beat the NICs' ring limit (nccl-tests
        issue 196: "on two nodes, NCCL uses the tree (or nvlstree) algorithm which can indeed go beyond the
        network bottleneck"; NVIDIA/nccl issue 1221, 8 H100 and 8 × 400 Gb/s per node: 430 GB/s bus bandwidth
        with NVLS on one or two nodes, 320–330 on more or without)."""
        intra = self.link_bw * self.nvls_efficiency  # type: ignore[operator]  # the caller checked both
        if nodes == 1:
            return NVLS_LATENCY + payload / intra
        net = self.nic_share(fewest)
        if net is None or not self.nvls_across_nodes:
            return math.inf
        inter = net if nodes <= 2 else net / 2
        return NVLS_LATENCY + 2 * log2_down(nodes) * NVLS_TREE_NET_LATENCY + payload / min(intra, inter)

    def _all_to_all_s(self, payload: float, group: int, local: int, nodes: int, stride: int,
                      fewest: int) -> Optional[float]:
        """An all-to-all across nodes: every rank sends payload/group to each other rank itself, so each member of a
        node pushes (group − local)/group of a payload out through its share of the node's NICs while it sends
        (local − 1)/group to its node-mates over the node's links; the slower of the two, in the protocol a
        pairwise message of payload/group goes in. A ring's collectives pass each byte through every node once
        at the node's whole NIC bandwidth; an all-to-all cannot."""
        intra, net = self.intra_ring(local, stride), self.nic_share(fewest)
        if intra is None or net is None:
            return None
        # the node with the fewest members owns the fewest NICs, and each of them sends the most out of it
        network_s = (group - fewest) / group * payload / (net / fewest)
        best = math.inf
        for p in self.p2p_protocols(payload / group):
            latency = (self.base_latency * p.base + (local - 1) * self.intra_hop * p.intra
                       + (group - local) * self.inter_hop * p.inter)
            moved = max((local - 1) / group * payload / intra, network_s)
            best = min(best, latency + moved / p.bandwidth_share("all_to_all", local, nodes))
        return best

    def pair_bandwidth(self, stride: int) -> Optional[float]:
        """Per-direction bandwidth of the slowest pair of a node's devices `stride` apart, over their link or the
        widest route between them: every rank sends to the one `stride` further at once (a pipeline's stage
        boundaries, a ring's shift), and the slowest pair paces them all."""
        if not self.links:
            return None if self.link_bw is None else self.link_bw * self.intra_efficiency
        routed = widest_routes(self.links)
        n = len(self.links)
        return min(routed[i][i + stride] for i in range(n - stride)) * self.intra_efficiency

    def _send_s(self, payload: float, local: int, nodes: int, stride: int = 1) -> Optional[float]:
        """A point-to-point transfer between ranks `stride` apart: over the slowest such pair's link or route in a
        node (pair_bandwidth), else over this device's share of the node's NICs (each pipeline rank sends on its own
        rail), in the library's fastest protocol."""
        if nodes > 1:
            bw = self.nic_share(1)
            hop, scale = self.inter_hop, (lambda p: p.inter)
        else:
            bw = self.pair_bandwidth(stride)
            hop, scale = self.intra_hop, (lambda p: p.intra)
        if bw is None:
            return None
        return min(self.base_latency * p.base + hop * scale(p) + payload / (bw * p.share)
                   for p in self.p2p_protocols(payload))

    def p2p_protocols(self, message: float) -> tuple[Protocol, ...]:
        """The protocol a point-to-point message of this size goes in: LL up to P2P_LL_THRESHOLD, else Simple (or
        the library's only one)."""
        if len(self.protocols) == 1:
            return self.protocols
        name = "LL" if message <= P2P_LL_THRESHOLD else "Simple"
        return tuple(p for p in self.protocols if p.name == name)


def fabric(system: Any) -> Fabric:
    """The Fabric of a system profile (bandwidths in GB/s, latencies in µs)."""
    gb = lambda v: None if v is None else float(v) * 1e9  # noqa: E731
    default = float(getattr(system, "comm_efficiency", 0.8))
    links = tuple(tuple(float(x) * 1e9 for x in row) for row in (getattr(system, "intra_node_links", None) or ()))
    protocols = protocols_for(system)
    return Fabric(
        devices_per_node=int(system.devices_per_node),
        link_bw=gb(system.intra_node_bw_gb_per_s),
        links=links,
        intra_efficiency=float(getattr(system, "intra_node_efficiency", None) or default),
        package=int(getattr(system, "devices_per_package", 1) or 1),
        package_bw=gb(getattr(system, "package_bw_gb_per_s", None)),
        nics=getattr(system, "nics_per_node", None),
        nic_bw=gb(getattr(system, "nic_bw_gb_per_s", None)),
        nic_efficiency=float(getattr(system, "nic_efficiency", None) or default),
        base_latency=float(system.comm_latency_us) * 1e-6,
        intra_hop=float(getattr(system, "intra_hop_latency_us", 0.6)) * 1e-6,
        inter_hop=float(getattr(system, "inter_hop_latency_us", 2.7)) * 1e-6,
        nvls_efficiency=getattr(system, "nvls_efficiency", None),
        nvls_across_nodes=bool(getattr(system, "nvls_across_nodes", True)),
        protocols=protocols,
        ring_plateau=ring_plateau_for(system, protocols),
        ll128_across_nodes=ll128_across_nodes(system),
        channels=getattr(system, "coll_channels", None),
    )


def ll128_across_nodes(system: Any) -> bool:
    """Whether NCCL may run LL128 over the NICs: the GPU-to-NIC path no farther than PXB (PXN on Hopper and later)."""
    path = getattr(system, "nic_gpu_path", None)
    if path is None:
        return True
    hopper = _accelerator(system).startswith(("H100", "H200", "GH200", "B200", "GB200"))
    return NIC_PATHS.index(path) <= NIC_PATHS.index("PXN" if hopper else "PXB")


def ring_plateau_for(system: Any, protocols: tuple[Protocol, ...]) -> float:
    """NCCL's plateau factor: 1.9 on Volta (V100), 1.4 on Ampere and later, 1 for other libraries."""
    if protocols is not NCCL_PROTOCOLS:
        return 1.0
    return 1.9 if _accelerator(system).startswith(("V100", "P100")) else 1.4


def _accelerator(system: Any) -> str:
    return str(getattr(system, "accelerator", "") or "").upper()


def protocols_for(system: Any) -> tuple[Protocol, ...]:
    """gloo's on a CPU host, RCCL's on an AMD Instinct accelerator, NCCL's otherwise."""
    if getattr(system, "device", None) == "cpu":
        return GLOO_PROTOCOLS
    if _accelerator(system).startswith("MI"):
        return RCCL_PROTOCOLS
    return NCCL_PROTOCOLS


@lru_cache(maxsize=64)
def widest_routes(links: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """Per pair of devices, the bandwidth of the best route between them over the node's links, through other
    devices where they share none: its slowest link (the widest-path closure of the link matrix). Two devices with
    no link of their own reach each other over the node's fabric hop by hop (an xGMI hive routes peer traffic
    through the GCDs between; NVLink paths through a third GPU), at most as fast as the route's slowest link."""
    n = len(links)
    w = [list(row) for row in links]
    for k in range(n):
        for i in range(n):
            for j in range(n):
                if i != j:
                    w[i][j] = max(w[i][j], min(w[i][k], w[k][j]))
    return tuple(tuple(row) for row in w)


@lru_cache(maxsize=256)
def ring_bandwidth(links: tuple[tuple[float, ...], ...]) -> float:
    """The bus bandwidth of ring channels over point-to-point links, found as NCCL's and RCCL's ring search
    finds them: for each per-channel bandwidth of a ladder (each link's bandwidth over 1, 2, 3, 4), as many
    directed rings through every device as the links' remaining bandwidth carries at that rate (one ring after
    another, round robin); the ladder step
    that carries the most wins. A ring's reverse uses the links' other direction, so it is a channel of its own.

    A pair of devices is a ring of two (each sends to the other over their link). Devices of which no ring
    passes through direct links (a subset split across Summit's sockets, GCDs 0 and 4 of a Frontier node) are
    costed over the widest routes between them (widest_routes)."""
    n = len(links)
    if n == 2:
        return min(links[0][1], links[1][0])
    rings = [((0, *order)) for order in itertools.permutations(range(1, n))]
    edges = [[(ring[k], ring[(k + 1) % n]) for k in range(n)] for ring in rings]
    ladder = sorted({bw / k for row in links for bw in row if bw > 0 for k in (1, 2, 3, 4)}, reverse=True)
    best = 0.0
    for rate in ladder:
        left = {(i, j): links[i][j] for i in range(n) for j in range(n) if i != j}
        channels, added = 0, True
        while added:  # round robin over the rings: one channel each per pass, while any still fits
            added = False
            for cycle in edges:
                if all(left[e] >= rate - 1e-9 for e in cycle):
                    for e in cycle:
                        left[e] -= rate
                    channels, added = channels + 1, True
        best = max(best, channels * rate)
    return best
