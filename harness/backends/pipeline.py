"""The PyTorch-native 3D path: FSDP2 + DTensor TP stages driven by `torch.distributed.pipelining` schedules.

`backend=fsdp parallel.pp>1` runs here (torchtitan's stack). Fabric's ModelParallelStrategy knows a
(data, tensor) mesh only, so this backend builds one `DeviceMesh` of (pp, data-parallel dims, tp) itself,
row-major like every other layout here (TP fastest, then DP, then PP; deepspeed3d's order), over the
process group the runner already started. Each pipeline stage is the model with the parts other stages
hold set to None (`harness.models.gpt.GPT.forward`), split at block boundaries: the embedding on the first stage,
the final norm and output projection on the last. Each stage is parallelised exactly as the FSDP backend
parallelises a whole model (`FSDPBackend.shard`: TP -> AC -> compile -> FSDP2 on the data-parallel dims).

`backend.pp_schedule` picks the schedule class; with `parallel.vpp` > 1 a rank holds several stages,
looped (rank r: r, r+pp, ...: Megatron's interleaving) or, for the V schedules, r and 2pp-1-r.

Tied embeddings across stages follow Megatron (Shoeybi et al. 2019; `megatron/core/distributed/
finalize_model_grads.py`): the last stage keeps its own copy of the word embedding as the output
projection, both copies start equal (broadcast from the first stage) and, after every backward, each
copy's gradient becomes their sum (an all-reduce between the first and last stage, or a local add when
one rank holds both, as in the V schedules), so they stay equal; the global gradient norm counts the
weight once. torchtitan instead unties them under pipelining, which changes the model.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from harness.backends.base import MicroBatch, local
from harness.backends.fsdp import FSDPBackend
from harness.core.registry import PP_SCHEDULES, pipeline_bubble, pipeline_split, resolve_pp_schedule
from harness.models.gpt import GPT
from harness.trace.capture import phase
from harness.trace.events import PHASES

PP_DIM = "pp"


def stage_owners(pp: int, vpp: int, placement: str) -> dict[int, int]:
    """The pipeline rank holding each stage: torch's own mapping for the schedule's placement."""
    from torch.distributed.pipelining.schedules import generate_stage_to_rank_mapping

    return generate_stage_to_rank_mapping(pp, pp * vpp, style="v" if placement == "v" else "loop")


def seed_stage(seed: int, stage: int) -> None:
    """Seed a stage's own initialisation (on a GPU each stage initialises only itself, on the meta-built copy).

    One seed per stage, as torchtitan seeds each pipeline rank: with the run's seed everywhere, every stage
    would draw the same numbers and blocks of equal shape on different stages would start equal.
    """
    torch.manual_seed(seed + stage)


def stage_module(model: GPT, blocks: range, first: bool, last: bool) -> GPT:
    """A copy of `model` with only `blocks`, the embeddings only on the first stage and the final norm and
    output projection only on the last (there, a tied output weight becomes the stage's own copy).

    A deep copy, as torchtitan's: on a GPU the model is still on the meta device, so nothing is allocated.
    """
    part = copy.deepcopy(model)
    part.blocks = nn.ModuleList(part.blocks[blocks.start:blocks.stop])
    if not first:
        part.tok_emb = None
        if "pos_emb" in part._modules:
            part.pos_emb = None
    if not last:
        part.norm_f = None
        part.lm_head = None
    return part


class FSDPPipelineBackend(FSDPBackend):
    """FSDP2 (+ TP) on each pipeline stage, a `torch.distributed.pipelining` schedule over the stages."""

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

        p, pp = self.cfg.parallel, self.layout.pp
        self.scaler = self.loss_scaler()
        sizes, names = self.data_parallel_dims()
        self.mesh = init_device_mesh(self.device.type, (pp, *sizes, self.layout.tp),
                                     mesh_dim_names=(PP_DIM, *names, "tensor_parallel"))
        self.pp_group = self.mesh[PP_DIM].get_group()
        self.pp_rank = self.mesh[PP_DIM].get_local_rank()
        self.schedule_name = resolve_pp_schedule(self.cfg.backend.pp_schedule, p.vpp)
        schedule = PP_SCHEDULES[self.schedule_name]
        placement = schedule.placement
        self.n_stages = pp * p.vpp
        owners = stage_owners(pp, p.vpp, placement)
        self.stage_ids = sorted(s for s, rank in owners.items() if rank == self.pp_rank)
        self.last_rank = owners[self.n_stages - 1]
        stage_mesh = self.mesh[(*names, "tensor_parallel")]
        # Zero-bubble schedules defer each weight-gradient pass. Parameters FSDP2 resharded after the forward
        # are gathered again for the input-gradient pass and freed after it, and the later weight gradients
        # never reach the shards (measured with torch 2.13: those stages got no or wrong gradients), so
        # there the parameters stay gathered from the forward to the end of the backward (shard_grad_op).
        split = pipeline_split(len(model.blocks), self.n_stages)
        assert split is not None  # validated before launch
        self.blocks_by_stage = [len(blocks) for blocks in split]
        self.modules = []
        for s in self.stage_ids:
            if not self.materialize_before_setup:
                seed_stage(self.cfg.train.seed, s)
            self.modules.append(self.shard(stage_module(model, split[s], s == 0, s == self.n_stages - 1), stage_mesh,
                                           reshard_after_forward=not schedule.split_backward,
                                           first_block=split[s].start))
        self.stages = [PipelineStage(m, s, self.n_stages, self.device, group=self.pp_group)
                       for m, s in zip(self.modules, self.stage_ids)]
        self.holds_first, self.holds_last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
        schedule_cls = get_schedule_class(self.schedule_name)
        single = issubclass(schedule_cls, PipelineScheduleSingle)
        self.schedule = schedule_cls(self.stages[0] if single else self.stages, n_microbatches=self.layout.grad_accum,
                                     loss_fn=self.pipeline_loss, scale_grads=True)
        self.tied = self.tie_embeddings(placement)
        self.optimizer = self.build_optimizer(self.parameters())
        self.params_per_rank = self.gather_local_params()

    def state_objects(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        return nn.ModuleList(self.modules), self.optimizer  # this rank's stages, keyed by their order here

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: its (replicate, shard) coordinates read row-major under HSDP."""
        sizes, _ = self.data_parallel_dims()
        coordinate = self.mesh.get_coordinate()[1:-1]
        rank = 0
        for size, index in zip(sizes, coordinate):
            rank = rank * size + index
        return rank

    def parameters(self) -> list[nn.Parameter]:
        return [param for module in self.modules for param in module.parameters()]

    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's own loss on the last stage, scaled for fp16 (the schedule runs its backward)."""
        return self.scale_loss(GPT.loss(logits, targets))

    def tie_embeddings(self, placement: str) -> list[nn.Parameter]:
        """This rank's copies of the tied word embedding (first stage's input, last stage's output), made equal.

        Pairs (first stage rank, last stage rank) with the same data- and tensor-parallel coordinates hold the
        same FSDP shard of the weight; every rank creates every pair's group (a collective call), in one order.
        """
        if not self.cfg.model.tie_embeddings:
            return []
        copies = [m.lm_head.weight for m in self.modules if m.lm_head is not None and m.tok_emb is None]
        self.output_copies = {id(p) for p in copies}  # counted once in the global norm: as the first stage's
        mine = [m.tok_emb.weight for m in self.modules if m.tok_emb is not None] + copies
        self.tie_group = None
        if placement == "v":  # one rank holds the first and the last stage
            return mine
        grid = self.mesh.mesh.reshape(self.layout.pp, -1)
        for first, last in zip(grid[0].tolist(), grid[-1].tolist()):
            group = dist.new_group([first, last])
            if dist.get_rank() in (first, last):
                self.tie_group, self.tie_src = group, first
        with torch.no_grad():  # equal at the start (on a GPU each stage initialised its own copy)
            if len(mine) == 2:
                local(mine[1]).copy_(local(mine[0]))
            elif mine:
                dist.broadcast(local(mine[0]), src=self.tie_src, group=self.tie_group)
        return mine

    def sum_tied_gradients(self) -> None:
        """Each copy's gradient becomes the sum of both: the gradient of the one tied weight."""
        grads = [local(p.grad) for p in self.tied if p.grad is not None]
        if len(grads) == 2:
            total = grads[0] + grads[1]
            for g in grads:
                g.copy_(total)
        elif grads and self.tie_group is not None:
            dist.all_reduce(grads[0], group=self.tie_group)

    output_copies: set[int] = set()
    """ids of the last stage's copies of a tied embedding on this rank (set by `tie_embeddings`)."""

    def counted_once(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if id(p) not in self.output_copies]

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        """One schedule over the step's micro-batches; every rank returns the last stage's mean loss."""
        inputs = torch.cat([mb[0] for mb in micro_batches])
        targets = torch.cat([mb[1] for mb in micro_batches])
        losses: list[torch.Tensor] = []
        first, last = self.holds_first, self.holds_last
        # The scale the losses were multiplied by, as a tensor (reading it as a number would wait for the device).
        scale = self.scale_loss(torch.ones((), device=self.device))
        with phase(PHASES.pipeline):
            self.schedule.step(*((inputs,) if first else ()),
                               **(dict(target=targets, losses=losses) if last else {}))
        loss = (torch.stack(losses).detach().float().mean() / scale if last
                else torch.zeros((), device=self.device))
        dist.broadcast(loss, group=self.pp_group, group_src=self.last_rank)
        with phase(PHASES.optimizer):
            self.sum_tied_gradients()
            self.optimizer_step()
        return loss

    def gather_local_params(self) -> list[int]:
        """Parameter elements each rank stores (a collective: every rank calls it during setup)."""
        counts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(counts, self.local_params())
        return counts

    def summary_notes(self) -> dict[str, dict[str, Any]]:
        notes = super().summary_notes()
        p = self.cfg.parallel
        notes["layout"] = {
            "pp_schedule": self.schedule_name,
            "stages_per_rank": len(self.stage_ids),
            "stages_on_rank0": self.stage_ids,
            "blocks_by_stage": self.blocks_by_stage,
            "micro_batches_per_step": self.layout.grad_accum,
            "bubble_fraction": pipeline_bubble(self.schedule_name, self.layout.pp, p.vpp, self.layout.grad_accum),
            "mesh": dict(zip(self.mesh.mesh_dim_names, self.mesh.mesh.shape)),
            "params_per_rank": self.params_per_rank,
        }
        return notes
