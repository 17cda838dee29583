"""Each backend's own options: a key another backend owns is refused; DeepSpeed's and FSDP2's settings are held to
what those libraries accept."""

from __future__ import annotations

from harness.config.checks.common import at_least, choice
from harness.config.schema import (
    BackendConfig,
    ParallelConfig,
)
from harness.core.errors import ConfigError
from harness.core.registry import (
    BACKENDS,
    PRECISIONS,
    backend_spec,
    fsdp_replica_group,
)
from harness.models.config import nearest_divisor

DS_BATCH_KEYS = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu":
                 "train.micro_batch_size", "gradient_accumulation_steps": "train.global_batch_size"}


def check_backend_options(b: BackendConfig) -> None:
    """A `backend.*` option the chosen backend does not read is refused, not silently ignored."""
    defaults = BackendConfig()
    spec = backend_spec(b.name)
    for key in BackendConfig.__dataclass_fields__:
        if key == "name" or key in spec.options:
            continue
        value = b[key] if hasattr(b, "__getitem__") else getattr(b, key)
        if value != getattr(defaults, key) and value:
            owners = [n for n, s in BACKENDS.items() if key in s.options]
            raise ConfigError(f"backend.{key}={value}: backend={b.name} has no such option; it belongs to "
                              f"backend={' or backend='.join(owners)}")


def check_deepspeed(b: BackendConfig, p: ParallelConfig, precision: str, device: str) -> None:
    """Offload and the extra DeepSpeed keys, never against the harness's own fields."""
    for key, needs in (("offload_optimizer", 1), ("offload_param", 3)):
        if getattr(b, key) and p.zero_stage < needs:
            raise ConfigError(f"backend.{key}=true needs parallel.zero_stage>={needs}; got {p.zero_stage}")
    extra = b.ds_config or {}
    for key, owner in DS_BATCH_KEYS.items():
        if key in extra:
            raise ConfigError(f"backend.ds_config.{key}: the batch is set by {owner}; drop the DeepSpeed key")
    asked = {name for name, keys in (("fp16", ("fp16",)), ("bf16", ("bf16", "bfloat16")))
             if any(hasattr(extra.get(k), "get") and extra[k].get("enabled") for k in keys)}
    requested = sorted(asked | ({precision} - {"fp32"}))
    if len(requested) > 1:
        raise ConfigError(f"fp16 and bf16 both requested (train.precision={precision}, backend.ds_config enables "
                          f"{' and '.join(sorted(asked))}); choose one with train.precision and drop the ds_config key")
    if asked and precision == "fp32":
        raise ConfigError(f"backend.ds_config enables {requested[0]} but train.precision=fp32; "
                          f"set train.precision={requested[0]} instead of the ds_config key")
    if precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision=fp16: DeepSpeed's CPU accelerator has no fp16; use bf16 or fp32 on CPU")
    at_least(b, "backend", ("loss_scale_window", "hysteresis"), 1, "at least 1")
    if b.min_loss_scale <= 0:
        raise ConfigError(f"backend.min_loss_scale={b.min_loss_scale}: must be positive")


def hybrid_shard_divides(hybrid_shard_group: int | None, devices_per_node: int, dp: int, tp: int) -> bool:
    """Whether hybrid_shard's group (registry.fsdp_replica_group) splits the data-parallel ranks into whole replicas."""
    group = fsdp_replica_group("hybrid_shard", hybrid_shard_group, devices_per_node, dp, tp)
    return group >= 1 and dp % group == 0


def check_fsdp(b: BackendConfig, devices_per_node: int, dp: int, precision: str, tp: int, device: str) -> None:
    """The FSDP2 options; the hybrid group splits the data-parallel ranks into replicas of `group` shards."""
    choice(b.sharding, backend_spec(b.name).shardings, "backend.sharding")
    if b.sharding == "hybrid_shard":
        group = fsdp_replica_group(b.sharding, b.hybrid_shard_group, devices_per_node, dp, tp)
        if not hybrid_shard_divides(b.hybrid_shard_group, devices_per_node, dp, tp):
            raise ConfigError(f"backend.hybrid_shard_group={group} does not divide the {dp} data-parallel ranks; "
                              f"choose a divisor of {dp} (e.g. {nearest_divisor(dp, max(group, 1))})")
    if b.prefetch_depth < 0:
        raise ConfigError(f"backend.prefetch_depth={b.prefetch_depth}: must be 0 (FSDP2's implicit one) or more")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(b, key) is not None:
            choice(getattr(b, key), PRECISIONS, f"backend.{key}")
    if b.param_dtype == "fp16" and precision != "fp16":
        raise ConfigError(f"backend.param_dtype=fp16 with train.precision={precision}: fp16 needs the loss scaler "
                          "that train.precision=fp16 turns on; set train.precision=fp16")
    if precision == "fp16" and b.param_dtype not in (None, "fp16"):
        raise ConfigError(f"train.precision=fp16 with backend.param_dtype={b.param_dtype}: the loss scaler is for "
                          "fp16 compute; drop backend.param_dtype")
    at_least(b, "backend", ("loss_scale_window",), 1, "at least 1")
    if b.offload and tp > 1 and device != "cpu":
        raise ConfigError(f"backend.offload=true with parallel.tp={tp}: torch's parallelize_module moves "
                          "tensor-parallel shards to the GPU and FSDP2's CPUOffloadPolicy refuses parameters not "
                          "on the CPU; use parallel.tp=1 with offload (or system=cpu)")
