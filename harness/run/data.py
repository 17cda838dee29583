"""Training data whose every sample is fixed by (seed, global sample index).

Sample `i` of step `s` has global index `s * global_batch + i` and the same tokens under every
layout; each data-parallel rank reads its contiguous share of the global batch and cuts it into
micro-batches. So a 1-rank run and a 4-rank run see the same samples in the same optimizer step,
and their losses can be compared step by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from harness.config.checks import Layout

_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive indices over the seed space


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _GOLDEN + index) % (1 << 63))


class TokenSource(Protocol):
    def sample(self, index: int) -> torch.Tensor:
        """`seq_len + 1` token ids (int64) of global sample `index`."""
        ...


class SyntheticTokens:
    """Uniform random token ids: enough to time a step, and a loss that starts at ln(vocab)."""

    def __init__(self, *, vocab_size: int, seq_len: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def sample(self, index: int) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=_generator(self.seed, index))


class TokenFile:
    """A flat file of token ids (uint16 or uint32), read through a memory map at seeded offsets."""

    def __init__(self, path: str | Path, *, dtype: str, seq_len: int, seed: int) -> None:
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len, self.seed = seq_len, seed
        self.max_offset = len(self.tokens) - (seq_len + 1)

    def sample(self, index: int) -> torch.Tensor:
        offset = int(torch.randint(0, self.max_offset + 1, (1,), generator=_generator(self.seed, index)))
        return torch.from_numpy(self.tokens[offset : offset + self.seq_len + 1].astype(np.int64))


def token_source(*, kind: str, vocab_size: int, seq_len: int, seed: int, path: str | None, dtype: str) -> TokenSource:
    if kind == "tokens":
        assert path is not None
        return TokenFile(path, dtype=dtype, seq_len=seq_len, seed=seed)
    return SyntheticTokens(vocab_size=vocab_size, seq_len=seq_len, seed=seed)


def rank_micro_batches(
    source: TokenSource, *, step: int, layout: Layout, dp_rank: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's micro-batches of optimizer step `step`, as (inputs, targets)."""
    per_rank = layout.global_batch_size // layout.dp
    first = step * layout.global_batch_size + dp_rank * per_rank
    samples = torch.stack([source.sample(first + i) for i in range(per_rank)])
    batches = []
    for chunk in samples.split(layout.micro_batch_size):
        chunk = chunk.to(device, non_blocking=True)
        batches.append((chunk[:, :-1], chunk[:, 1:]))
    return batches
