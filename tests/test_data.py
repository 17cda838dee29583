"""Samples depend on (seed, global index) only, so every layout reads the same global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harness.core.layout import Layout
from harness.run.data import SyntheticTokens, TokenFile, rank_micro_batches

CPU = torch.device("cpu")


def layout(dp: int, micro: int, global_batch: int = 8) -> Layout:
    return Layout(world_size=dp, tp=1, pp=1, dp=dp, zero_stage=0, micro_batch_size=micro,
                  global_batch_size=global_batch, grad_accum=global_batch // (micro * dp))


def global_batch(source, dp: int, micro: int, step: int) -> torch.Tensor:
    parts = [x for r in range(dp) for x, _ in rank_micro_batches(source, step=step, layout=layout(dp, micro),
                                                                  dp_rank=r, device=CPU)]
    return torch.cat(parts)


def test_every_layout_reads_the_same_global_batch() -> None:
    source = SyntheticTokens(vocab_size=100, seq_len=16, seed=3)
    reference = global_batch(source, dp=1, micro=8, step=5)
    for dp, micro in [(1, 2), (2, 4), (4, 1), (8, 1)]:
        assert torch.equal(global_batch(source, dp, micro, step=5), reference)
    assert not torch.equal(global_batch(source, 1, 8, step=6), reference)  # steps differ
    assert not torch.equal(global_batch(SyntheticTokens(vocab_size=100, seq_len=16, seed=4), 1, 8, 5), reference)


def test_targets_are_inputs_shifted_by_one() -> None:
    (x, y), *_ = rank_micro_batches(SyntheticTokens(vocab_size=100, seq_len=16, seed=0), step=0,
                                    layout=layout(1, 2), dp_rank=0, device=CPU)
    assert x.shape == y.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_token_file_windows_come_from_the_file(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.uint32)
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    source = TokenFile(path, dtype="uint32", seq_len=32, seed=1)
    for index in range(20):
        sample = source.sample(index)
        assert sample.dtype == torch.int64 and len(sample) == 33
        assert torch.equal(sample, torch.arange(int(sample[0]), int(sample[0]) + 33))  # a contiguous window
        assert torch.equal(sample, TokenFile(path, dtype="uint32", seq_len=32, seed=1).sample(index))
