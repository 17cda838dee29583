"""The GPU path builds the model on the meta device; `materialize` must give it GPT's own init.

On a GPU the backends receive a meta-built model (nothing is allocated before sharding). These tests
run that path on the CPU: a replica (DDP, ZeRO) and an FSDP2-sharded model must start with exactly
the weights of a model initialised directly, tied embeddings still tied.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import GLOBAL_BATCH, TINY, Run, clean_env

from harness.backends.base import materialize
from harness.models.gpt import GPT, GPTConfig

CONFIG = GPTConfig(n_layers=2, d_model=64, n_heads=4, seq_len=32, vocab_size=128)


def reference() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def meta_built() -> GPT:
    with torch.device("meta"):
        model = GPT(CONFIG)
    torch.manual_seed(0)
    return model


def assert_same_weights(model: torch.nn.Module, expected: GPT) -> None:
    got = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_replica_gets_gpt_init_and_stays_tied() -> None:
    model = meta_built()
    materialize(model, torch.device("cpu"))
    assert model.lm_head.weight is model.tok_emb.weight
    assert_same_weights(model, reference())


@pytest.fixture
def one_rank_group():  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_sharded_meta_model_gets_gpt_init_and_trains(one_rank_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = meta_built()
    mesh = init_device_mesh("cpu", (1,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    materialize(model, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.tok_emb.weight
    assert_same_weights(model, reference())
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_len))
    model(tokens, tokens).backward()
    assert model.tok_emb.weight.grad is not None


META_RUN = """
import sys
from pathlib import Path
from harness.backends.base import Backend
from harness.backends.fsdp import FSDPBackend
from harness.config.compose import compose
from harness.run.launch import run
for cls in (Backend, FSDPBackend):  # down the GPU path: the model is built on the meta device
    cls.materialize_before_setup = property(lambda self: False)
sys.exit(run(compose(sys.argv[2:]), Path(sys.argv[1])) != "ok")
"""


@pytest.mark.parametrize("backend", ["ddp", "fsdp", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
def test_backends_train_a_meta_built_model_like_the_reference(backend: str, reference: Run, tmp_path: Path) -> None:
    """The 1-rank reference (built whole on the CPU) against the same run built on the meta device."""
    overrides = [*TINY, *GLOBAL_BATCH, "launcher.nproc=1", "train.micro_batch_size=2", f"backend={backend}"]
    proc = subprocess.run([sys.executable, "-c", META_RUN, str(tmp_path), *overrides], capture_output=True,
                          text=True, timeout=300, env=clean_env())
    run = Run(proc, tmp_path)
    assert proc.returncode == 0, run.summary.get("error") if (tmp_path / "summary.json").exists() else proc.stderr
    assert run.losses == pytest.approx(reference.losses, abs=1e-5)
