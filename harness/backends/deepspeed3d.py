"""Megatron-DeepSpeed-style 3D parallelism: megatron-core tensor parallelism x DeepSpeed pipeline x data (ZeRO-1).

megatron-core's `parallel_state` owns the tensor/data/pipeline groups its `tensor_parallel` layers
use; DeepSpeed's `PipelineModule` gets a `PipeModelDataParallelTopology` with the same order (TP
fastest, then DP, then PP), builds only this rank's stage from one `LayerSpec` per block (the
embedding and the tied output projection share weights through `TiedLayerSpec`), and
`PipelineEngine.train_batch` runs its 1F1B schedule over the step's micro-batches.

The stages follow `harness.models.gpt` exactly: each block *is* a `harness.models.gpt.Block` whose linears are
swapped for column/row-parallel ones, so the block's forward is the model file's own. Weights:
on CPU the full `harness.models.gpt.GPT` is initialised with the seed and every rank copies its slice
(parity with one rank); on GPU each rank initialises only its own shard with megatron-core's
model-parallel RNG (`model_parallel_cuda_manual_seed`), so a 175B model never exists whole.

Sequence parallelism (Korthikanti et al. 2022) is megatron-core's own (`sequence_parallel=True`):
between the TP regions every rank holds seq_len/tp tokens; column-parallel linears all-gather
their input along the sequence and row-parallel ones reduce-scatter their output. megatron-core
splits the first dimension ([sequence, batch, hidden]); the model file is batch-first, so the
linears here transpose around megatron's (free at micro-batch 1, a copy otherwise) and the block's
forward stays the model file's.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Sequence
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.backends.base import MicroBatch, checkpoint_inside_block
from harness.backends.deepspeed import DeepSpeedEngineBackend
from harness.core.console import quiet_library_warnings
from harness.core.registry import CHECKPOINTING
from harness.models.config import block_linears
from harness.models.gpt import GPT, Block, GPTConfig, make_norm, rope_cache
from harness.trace.capture import phase
from harness.trace.events import PHASES

quiet_library_warnings()
from megatron.core import parallel_state, tensor_parallel  # noqa: E402  (after the filters: it warns on import)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron pads the vocabulary so every TP rank holds an equal slice of the embedding."""
    return -(-vocab_size // tp) * tp


def _mark_partitioned(param: nn.Parameter, dim: int) -> None:
    """What megatron's own init would set: DeepSpeed's gradient norm counts TP shards on every rank."""
    tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)


def _column(in_features: int, out_features: int, *, bias: bool, mp: Any, init: Callable) -> nn.Module:
    layer = _ColumnLinear(in_features, out_features, config=mp, init_method=init, bias=bias, gather_output=False)
    _mark_partitioned(layer.weight, 0)
    return layer


def _row(in_features: int, out_features: int, *, bias: bool, mp: Any, init: Callable) -> nn.Module:
    layer = _RowLinear(in_features, out_features, config=mp, init_method=init, bias=bias, input_is_parallel=True,
                       skip_bias_add=False)
    _mark_partitioned(layer.weight, 1)
    return layer


def _swap_batch_and_sequence(x: torch.Tensor) -> torch.Tensor:
    """Batch-first <-> megatron's sequence-first layout, whose first dimension sequence parallelism splits."""
    return x.transpose(0, 1).contiguous()


class _AsLinear:
    """A megatron linear used as `nn.Linear`: the output tensor alone (megatron returns `(output, bias)`),
    batch-first (under sequence parallelism megatron gathers/scatters the first dimension: swap around it)."""

    sequence_parallel: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return super().forward(x)[0]  # type: ignore[misc]
        return _swap_batch_and_sequence(super().forward(_swap_batch_and_sequence(x))[0])  # type: ignore[misc]


class _ColumnLinear(_AsLinear, tensor_parallel.ColumnParallelLinear):
    pass


class _RowLinear(_AsLinear, tensor_parallel.RowParallelLinear):
    pass


def _mark_sequence_parallel(module: nn.Module, mp: Any) -> nn.Module:
    """A replicated parameter that sees only a sequence shard (megatron's attribute, set on norms)."""
    for param in module.parameters():
        param.sequence_parallel = mp.sequence_parallel
    return module


def scatter_to_sequence_shards(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> this TP rank's (B, T/tp, H); the backward all-gathers."""
    return _swap_batch_and_sequence(tensor_parallel.scatter_to_sequence_parallel_region(_swap_batch_and_sequence(x)))


def gather_sequence_shards(x: torch.Tensor) -> torch.Tensor:
    """(B, T/tp, H) -> (B, T, H) before a TP region; the backward reduce-scatters the partial gradients."""
    gathered = tensor_parallel.gather_from_sequence_parallel_region(_swap_batch_and_sequence(x),
                                                                    tensor_parallel_output_grad=True)
    return _swap_batch_and_sequence(gathered)


def _normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return functools.partial(nn.init.normal_, mean=0.0, std=std)


class Stage(nn.Module):
    """A pipeline layer whose parameter names are `harness.models.gpt.GPT`'s after `prefix` (to copy a full model's
    slices)."""

    prefix = ""


class EmbeddingPipe(Stage):
    """Vocab-parallel token embedding (+ learned positions). Also the tied output projection."""

    def __init__(self, config: GPTConfig, mp: Any) -> None:
        super().__init__()
        self.learned = config.position == "learned"
        self.sequence_parallel = mp.sequence_parallel
        self.tok_emb = tensor_parallel.VocabParallelEmbedding(
            padded_vocab_size(config.vocab_size, mp.tensor_model_parallel_size), config.d_model,
            init_method=_normal(config.init_std), config=mp)
        _mark_partitioned(self.tok_emb.weight, 0)
        if self.learned:
            self.pos_emb = nn.Embedding(config.seq_len, config.d_model)

    @property
    def weight(self) -> nn.Parameter:
        """The tied weight, for `TiedLayerSpec(tied_weight_attr="weight")`."""
        return self.tok_emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens)
        if self.learned:
            x = x + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))
        return scatter_to_sequence_shards(x) if self.sequence_parallel else x


def tied_logits(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary slice of the logits (Megatron's `parallel_lm_logits`)."""
    if embedding.sequence_parallel:
        x = gather_sequence_shards(x)
    else:
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
    return F.linear(x, embedding.weight)


class BlockPipe(Block, Stage):
    """`harness.models.gpt.Block` with its linears column/row-parallel; its forward is the model file's own."""

    def __init__(self, config: GPTConfig, mp: Any, index: int, checkpointing: str) -> None:
        with torch.device("meta"):  # the structure is the model file's; every parameter is replaced below
            super().__init__(config)
        self.prefix = f"blocks.{index}."
        std, resid_std = config.init_std, config.init_std / (2 * config.n_layers) ** 0.5
        self.norm1, self.norm2 = (_mark_sequence_parallel(make_norm(config), mp) for _ in range(2))
        for spec in block_linears(config):  # the model's description: which linears split by column, which by row
            parent, _, name = spec.name.rpartition(".")
            make = _row if spec.split == "row" else _column
            setattr(getattr(self, parent), name, make(spec.n_in, spec.n_out, bias=config.bias, mp=mp,
                                                      init=_normal(resid_std if spec.residual else std)))
        checkpoint_inside_block(self, checkpointing)  # `full`: DeepSpeed's activation_checkpoint_interval
        self.rope = config.position == "rope"
        self.sequence_shards = mp.tensor_model_parallel_size if mp.sequence_parallel else 1
        if self.rope:
            cos, sin = rope_cache(config, torch.get_default_device())
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        T = x.shape[1] * self.sequence_shards
        return super().forward(x, (self.rope_cos[:T], self.rope_sin[:T]) if self.rope else None)


class FinalNormPipe(Stage):
    def __init__(self, config: GPTConfig, mp: Any) -> None:
        super().__init__()
        self.norm_f = _mark_sequence_parallel(make_norm(config), mp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x)


class LMHeadPipe(Stage):
    """The untied output projection, column-parallel over the (padded) vocabulary."""

    def __init__(self, config: GPTConfig, mp: Any) -> None:
        super().__init__()
        vocab = padded_vocab_size(config.vocab_size, mp.tensor_model_parallel_size)
        self.lm_head = _column(config.d_model, vocab, bias=False, mp=mp, init=_normal(config.init_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions, with the softmax spread over the TP ranks' vocabulary slices."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets).mean()


def layer_specs(config: GPTConfig, mp: Any, *, checkpointing: str = "none") -> list[Any]:
    """The whole model as DeepSpeed layer specs, in `harness.models.gpt.GPT.forward` order; each rank builds its
    stage's."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if config.tie_embeddings:
        embedding = TiedLayerSpec("embedding", EmbeddingPipe, config, mp, tied_weight_attr="weight")
        head = TiedLayerSpec("embedding", EmbeddingPipe, config, mp, forward_fn=tied_logits, tied_weight_attr="weight")
    else:
        embedding, head = LayerSpec(EmbeddingPipe, config, mp), LayerSpec(LMHeadPipe, config, mp)
    blocks = [LayerSpec(BlockPipe, config, mp, i, checkpointing) for i in range(config.n_layers)]
    return [embedding, *blocks, LayerSpec(FinalNormPipe, config, mp), head]


BLOCK_PARTITION = "type:BlockPipe"
"""DeepSpeed balances the number of blocks per stage; the embedding joins the first, the head the last."""


def model_parallel_config(tp: int, pp: int, *, on_gpu: bool, dtype: torch.dtype = torch.float32,
                          sequence_parallel: bool = False) -> Any:
    """megatron-core layer settings. On CPU nothing is initialised here (weights are copied in later)."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               sequence_parallel=sequence_parallel, use_cpu_initialization=not on_gpu,
                               perform_initialization=on_gpu, params_dtype=dtype, pipeline_dtype=dtype)


def _sum_over_tensor_parallel_ranks(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.contiguous()
    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def sum_sequence_parallel_grads(stage: nn.Module) -> int:
    """Norms (and row-parallel biases) are replicated over TP but each rank sees only its sequence shard,
    so their gradients are partial sums; Megatron all-reduces them over the TP group before the optimizer.

    DeepSpeed's pipeline engine offers no step between the last backward and its own gradient
    reduction, so a gradient hook does it on every micro-batch's gradient, before it is accumulated
    (the sum is linear, so this is exact): one small all-reduce per such parameter and micro-batch,
    where Megatron does one per step. Returns how many parameters it hooked.
    """
    params = [p for p in stage.parameters() if getattr(p, "sequence_parallel", False)]
    for param in params:
        param.register_hook(_sum_over_tensor_parallel_ranks)
    return len(params)


@torch.no_grad()
def copy_slices(stage: nn.Module, full: GPT, tp_rank: int) -> None:
    """Give this rank's TP/PP shard the values of the same parameters in a full model.

    A TP-partitioned parameter takes its slice along `partition_dim`; the vocabulary padding has
    no counterpart in the full model and starts at zero.
    """
    for layer in stage.modules():
        if not isinstance(layer, Stage):
            continue
        for name, param in layer.named_parameters():
            source = full.get_parameter(_gpt_name(layer, name))
            dim = getattr(param, "partition_dim", 0) if getattr(param, "tensor_model_parallel", False) else None
            if dim is not None:
                size = param.shape[dim]
                start = min(tp_rank * size, source.shape[dim])
                source = source.narrow(dim, start, min(size, source.shape[dim] - start))
            param.zero_()
            param.narrow(dim or 0, 0, source.shape[dim or 0]).copy_(source)


def _gpt_name(layer: Stage, name: str) -> str:
    """`harness.models.gpt.GPT`'s name for a stage parameter (a checkpoint wrapper adds a component to strip)."""
    return layer.prefix + name.replace("_checkpoint_wrapped_module.", "")


class DeepSpeed3DBackend(DeepSpeedEngineBackend):
    name = "deepspeed3d"

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def setup(self, model: nn.Module) -> None:
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        layout, on_gpu = self.layout, self.device.type == "cuda"
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                                 pipeline_model_parallel_size=layout.pp, order="tp-cp-ep-dp-pp")
        if on_gpu:
            tensor_parallel.model_parallel_cuda_manual_seed(self.cfg.train.seed)
        config: GPTConfig = model.config
        self.padded_vocab = padded_vocab_size(config.vocab_size, layout.tp)
        mode = self.cfg.train.activation_checkpointing
        pipe = PipelineModule(
            layers=layer_specs(config, model_parallel_config(layout.tp, layout.pp, on_gpu=on_gpu,
                                                             sequence_parallel=self.cfg.parallel.sequence_parallel),
                               checkpointing=mode),
            topology=PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp),
            loss_fn=vocab_parallel_loss,
            partition_method=BLOCK_PARTITION,
            activation_checkpoint_interval=1 if CHECKPOINTING[mode].region == "block" else 0,
            activation_checkpoint_func=functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
        )
        if model.tok_emb.weight.is_meta:
            self._init_replicated(pipe)
        else:
            copy_slices(pipe, model, parallel_state.get_tensor_model_parallel_rank())
        self.sequence_parallel_params = sum_sequence_parallel_grads(pipe)
        self._record_block_input_shape(pipe)
        self.initialize(pipe)
        self.rank_table = self._rank_table()

    @torch.no_grad()
    def _init_replicated(self, pipe: nn.Module) -> None:
        """megatron-core initialised the TP shards; the replicated learned positions get GPT's init here."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.train.seed)
        for layer in pipe.modules():
            if isinstance(layer, EmbeddingPipe) and layer.learned:
                layer.pos_emb.weight.normal_(0.0, self.cfg.model.init_std, generator=generator)

    def _record_block_input_shape(self, pipe: nn.Module) -> None:
        """What one block of this rank really receives (B, T/tp, H under sequence parallelism), seen once."""
        self.block_input_shape: list[int] | None = None
        block = next((layer for layer in pipe.modules() if isinstance(layer, BlockPipe)), None)
        if block is None:
            return

        def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.block_input_shape = list(args[0].shape)
            handle.remove()

        handle = block.register_forward_pre_hook(record)

    def _rank_table(self) -> list[dict[str, Any]]:
        """Every rank's (tp, dp, pp) coordinates as megatron-core and DeepSpeed see them; their groups must agree."""
        ps = parallel_state
        grid = self.engine.grid
        megatron_groups = [dist.get_process_group_ranks(group) for group in (
            ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group())]
        deepspeed_groups = [sorted(grid.slice_group), sorted(grid.dp_group), sorted(grid.pp_group)]
        if megatron_groups != deepspeed_groups:
            raise RuntimeError(f"rank {dist.get_rank()}: megatron-core's (tp, dp, pp) groups {megatron_groups} differ "
                               f"from DeepSpeed's {deepspeed_groups}")
        coord = grid._topo.get_coord(dist.get_rank())
        mine = {"rank": dist.get_rank(),
                "megatron": [ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                             ps.get_pipeline_model_parallel_rank()],
                "deepspeed": [coord.model, coord.data, coord.pipe]}
        table: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(table, mine)
        return table

    def _megatron_buffers_on_cpu(self) -> ContextManager[Any]:
        """megatron-core allocates its sequence-parallel gather/scatter buffers on `torch.cuda.current_device()`;
        on a CPU run (no CUDA) they must land on the CPU instead. Scoped to the step, nothing else changes."""
        if self.device.type != "cpu" or not self.cfg.parallel.sequence_parallel:
            return contextlib.nullcontext()
        return mock.patch.object(torch.cuda, "current_device", return_value=torch.device("cpu"))

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        """1F1B over the micro-batches; DeepSpeed returns the DP-averaged mean loss on every stage."""
        with self._megatron_buffers_on_cpu(), phase(PHASES.pipeline):
            return self.engine.train_batch(data_iter=iter(micro_batches)).detach().float()

    def summary_notes(self) -> dict[str, dict[str, Any]]:
        notes = super().summary_notes()
        notes["layout"] = {"micro_batches_per_step": self.layout.grad_accum,
                           "rank_coordinates": getattr(self, "rank_table", None),
                           "rank_coordinates_order": "tp, dp, pp",
                           "sequence_parallel": self.cfg.parallel.sequence_parallel,
                           "block_input_shape": getattr(self, "block_input_shape", None),
                           "sequence_parallel_params": getattr(self, "sequence_parallel_params", None)}
        notes["model"] = {"padded_vocab_size": getattr(self, "padded_vocab", None)}
        return notes
