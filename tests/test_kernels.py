"""Kernel options (model.attention, model.norm_impl, train.optimizer) and the environment record.

What runs on a CPU is checked against its reference: the written-out `math` attention against PyTorch's
sdpa, the foreach and fused AdamW against the plain loop over three real optimizer steps of the model.
What needs a GPU or a package that is not installed (flash-attn, NVIDIA apex, DeepSpeed's FusedAdam) is
refused before launch in one line that names the alternative; NVIDIA apex is told apart from the package
index's unrelated `apex` by its modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from harness.config.compose import compose
from harness.core.errors import ConfigError
from harness.models.gpt import GPT, GPTConfig, math_attention


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_math_attention_matches_sdpa(kv_heads: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    k, v = torch.randn(2, kv_heads, 16, 8), torch.randn(2, kv_heads, 16, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(math_attention(q, k, v), expected, atol=1e-6, rtol=1e-5)


def test_model_with_math_attention_gives_the_sdpa_model_s_loss() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 128))
    losses = {}
    for kernel in ("sdpa", "math"):
        torch.manual_seed(1)
        model = GPT(GPTConfig(n_kv_heads=2, attention=kernel))
        losses[kernel] = model(tokens, tokens).item()
    assert losses["math"] == pytest.approx(losses["sdpa"], abs=1e-5)


def _losses(kind: str, steps: int = 3) -> list[float]:
    from types import SimpleNamespace

    from harness.backends.base import make_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig())
    optimizer = make_optimizer(model.parameters(), SimpleNamespace(lr=1e-3, weight_decay=0.1), kind)
    tokens = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(3))
    out = []
    for _ in range(steps):
        loss = model(tokens, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.parametrize("kind", ["adamw_foreach", "adamw_fused"])
def test_foreach_and_fused_adamw_follow_the_plain_loop(kind: str) -> None:
    reference, got = _losses("adamw"), _losses(kind)
    assert got == pytest.approx(reference, abs=1e-5) and reference[-1] < reference[0] - 0.01


@pytest.mark.parametrize("overrides,message", [
    (["model.attention=flash_attn"], "model.attention=flash_attn: runs on CUDA GPUs only and this run uses the cpu; "
                                     "use model.attention=sdpa"),
    (["model.norm_impl=apex"], "use model.norm_impl=torch"),
    (["train.optimizer=apex_fused_adam"], "use train.optimizer=adamw_fused"),
    (["backend=deepspeed", "train.optimizer=deepspeed_fused_adam"], "runs on CUDA GPUs only"),
    (["train.optimizer=deepspeed_fused_adam"], "built by DeepSpeed's engine; backend=ddp builds torch's"),
    (["backend=deepspeed", "train.optimizer=apex_fused_adam"], "use deepspeed_fused_adam"),
    (["train.optimizer=sgd"], "train.optimizer=sgd: unknown value"),
    (["model.attention=xformers"], "model.attention=xformers: unknown value"),
])
def test_kernels_that_cannot_run_here_are_refused_in_one_line(overrides: list[str], message: str) -> None:
    from harness.run.preflight import preflight

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        preflight(compose(overrides), 1, 1)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("backend,device,expected", [
    ("deepspeed", "cuda", "deepspeed_fused_adam"), ("deepspeed3d", "cuda", "deepspeed_fused_adam"),
    ("deepspeed", "cpu", "adamw"), ("fsdp", "cuda", "adamw"), ("ddp", "cpu", "adamw")])
def test_auto_optimizer_is_deepspeeds_fused_adam_on_a_gpu(backend: str, device: str, expected: str) -> None:
    from harness.backends.deepspeed import ds_config
    from harness.config.checks import validate
    from harness.core.registry import resolve_optimizer

    assert resolve_optimizer("auto", backend, device) == expected
    if backend == "deepspeed":
        cfg = compose([f"backend={backend}"])
        params = ds_config(cfg, validate(cfg, 1), device)["optimizer"]["params"]
        assert params["torch_adam"] is (device == "cpu")


def test_nvidia_apex_is_told_apart_from_the_package_index_apex(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.run.environment import nvidia_apex_version

    web = tmp_path / "web" / "apex"  # the index's `apex`: a web toolkit, no CUDA modules
    web.mkdir(parents=True)
    (web / "__init__.py").write_text("")
    nvidia = tmp_path / "nvidia" / "apex"
    for sub in ("optimizers", "normalization"):
        (nvidia / sub).mkdir(parents=True)
        (nvidia / sub / "__init__.py").write_text("")
    (nvidia / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(web.parent))
    sys.modules.pop("apex", None)
    assert nvidia_apex_version() is None
    monkeypatch.syspath_prepend(str(nvidia.parent))
    assert nvidia_apex_version() is not None


def test_scheduler_job_from_each_scheduler(tmp_path: Path) -> None:
    from harness.run.environment import scheduler_job

    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1\nx1\nx2\nx2\n")
    assert scheduler_job({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8"}) == {
        "scheduler": "slurm", "job_id": "7", "nodes": 2, "tasks": 8}
    assert scheduler_job({"PBS_JOBID": "9.polaris", "PBS_NODEFILE": str(nodefile)})["nodes"] == 2
    assert scheduler_job({"LSB_JOBID": "3", "LSB_MCPU_HOSTS": "batch1 1 h1 42 h2 42"})["nodes"] == 2
    assert scheduler_job({})["scheduler"] is None


def test_gpu_acceptance_refuses_without_a_gpu(tmp_path: Path) -> None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_acceptance.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA or ROCm GPU" in proc.stderr
    assert not list(tmp_path.iterdir())
