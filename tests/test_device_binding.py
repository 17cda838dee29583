"""One device per rank, per site: which index each local rank takes, and which process-group backend.

No GPU here: `torch.cuda` / `torch.xpu` are replaced by stand-ins that count devices the way the real
ones do under each site's binding (one visible device per task when the scheduler binds, all of them
otherwise), so the tests check the harness's choice, not the hardware.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import harness

from harness.core.errors import ConfigError
from harness.launchers.env import LaunchEnvError, device_index
from harness.run import preflight, rank


@pytest.mark.parametrize(("local_rank", "visible", "order", "index"), [
    (0, 4, "local_rank", 0), (3, 4, "local_rank", 3),       # Perlmutter: 4 GPUs visible to every task
    (0, 4, "reversed", 3), (1, 4, "reversed", 2), (3, 4, "reversed", 0),  # Polaris' affinity script order
    (5, 1, "local_rank", 0), (5, 1, "reversed", 0),        # Frontier --gpu-bind=closest: one GCD per task
    (11, 12, "local_rank", 11),                            # Aurora: 12 tiles per node
])
def test_device_index(local_rank: int, visible: int, order: str, index: int) -> None:
    assert device_index(local_rank, visible, order) == index


def test_more_local_ranks_than_devices_is_an_error() -> None:
    with pytest.raises(LaunchEnvError, match="local rank 4 but only 4 devices are visible"):
        device_index(4, 4)


def test_no_visible_device_is_an_error() -> None:
    with pytest.raises(LaunchEnvError, match="sees no device"):
        device_index(0, 0)


class FakeAccelerator:
    """`torch.cuda`/`torch.xpu`'s device_count/set_device/is_available, with `count` visible devices."""

    def __init__(self, count: int) -> None:
        self.count, self.current = count, None

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        self.current = index


@pytest.mark.parametrize(("choice", "cuda", "xpu", "local_rank", "order", "expected"), [
    ("auto", 0, 0, 1, "local_rank", "cpu"),
    ("auto", 4, 0, 1, "reversed", "cuda:2"),
    ("cuda", 1, 0, 7, "local_rank", "cuda:0"),
    ("auto", 0, 12, 5, "local_rank", "xpu:5"),
    ("xpu", 0, 1, 5, "local_rank", "xpu:0"),
])
def test_rank_device(monkeypatch: pytest.MonkeyPatch, choice: str, cuda: int, xpu: int, local_rank: int,
                     order: str, expected: str) -> None:
    fakes = {"cuda": FakeAccelerator(cuda), "xpu": FakeAccelerator(xpu)}
    monkeypatch.setattr(torch, "cuda", fakes["cuda"])
    monkeypatch.setattr(torch, "xpu", fakes["xpu"], raising=False)
    device = rank.select_device(choice, local_rank, order)
    assert str(device) == expected
    if device.type != "cpu":
        assert fakes[device.type].current == device.index


@pytest.mark.parametrize(("device", "xccl", "backend"), [
    ("cpu", False, "gloo"), ("cuda:0", False, "nccl"), ("xpu:3", True, "xccl"),
])
def test_process_group_backend(monkeypatch: pytest.MonkeyPatch, device: str, xccl: bool, backend: str) -> None:
    monkeypatch.setattr(rank.dist, "is_xccl_available", lambda: xccl)
    assert rank.process_group_backend(torch.device(device)) == backend


def test_xpu_without_xccl_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank.dist, "is_xccl_available", lambda: False)
    with pytest.raises(RuntimeError, match="no xccl backend"):
        rank.process_group_backend(torch.device("xpu", 0))


def test_installed_torch_knows_xccl() -> None:
    # torch 2.13 registers the xccl backend name and answers is_xccl_available (False on a CPU build).
    assert "xccl" in torch.distributed.Backend.backend_list
    assert torch.distributed.is_xccl_available() is False or torch.xpu.is_available()


def test_bad_gpu_order_fails_before_launch(tmp_path: Path) -> None:
    proc = harness(["run", "launcher.gpu_order=backwards"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "harness: error: launcher.gpu_order=backwards: unknown value; choose one of: local_rank, reversed")


def test_xpu_on_a_host_without_one_fails_before_launch() -> None:
    with pytest.raises(ConfigError, match="system.device=xpu but torch sees no Intel GPU"):
        preflight.check_device("xpu")
