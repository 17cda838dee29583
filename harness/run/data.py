"""Training data whose every sample is fixed by (seed, global sample index).

Sample `i` of step `s` has global index `s * global_batch + i` and the same tokens under every
layout; each data-parallel rank reads its contiguous share of the global batch and cuts it into
micro-batches. So a 1-rank run and a 4-rank run see the same samples in the same optimizer step,
and their losses can be compared step by step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from harness.config.checks.data import check_token_ids, megatron_blend
from harness.config.schema import DataConfig
from harness.core.console import quiet_library_warnings
from harness.core.errors import ConfigError
from harness.core.layout import Layout

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


@dataclass
class _SpecialTokens:
    """What megatron-core's GPTDataset reads of a tokenizer: the vocabulary size (token width), an
    end-of-document id (used only for document-reset masks, which the harness does not ask for: -1, none),
    and the identifiers its index-cache hash includes. No pad: GPTDataset then uses its own (-1)."""

    vocab_size: int
    eod: int = -1

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "harness.run.data._SpecialTokens", "vocab_size": self.vocab_size, "eod": self.eod}


def cache_dir(configured: Optional[str]) -> str:
    """Where megatron-core's sample-index cache lives: the same path for every rank of a job, reused by runs."""
    if configured:
        return str(Path(configured).expanduser())
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = os.environ.get("HARNESS_CACHE_DIR") or xdg / "harness"
    return str(Path(root) / "megatron-indices")


def check_indexed(d: DataConfig, vocab_size: int, seq_len: int) -> None:
    """Before launch: each .bin of data=megatron holds exactly what its .idx says, at least one sample, in
    ids the model's vocabulary covers."""
    quiet_library_warnings()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in megatron_blend(d)[0]:
        try:
            index = IndexedDataset(prefix, mmap=True)
        except Exception as exc:  # megatron-core raises AssertionError/ValueError/OSError on a bad index
            raise ConfigError(f"data: {prefix}.idx is not a Megatron index ({type(exc).__name__}: {exc}); "
                              "rebuild it with harness data prepare") from None
        dtype = np.dtype(index.index.dtype)
        n_tokens = int(index.sequence_lengths.sum())
        bin_path = Path(prefix + ".bin")
        size = bin_path.stat().st_size
        if size != n_tokens * dtype.itemsize:
            raise ConfigError(f"data: {bin_path} is {size} bytes but its .idx describes {n_tokens * dtype.itemsize} "
                              f"({dtype.name} tokens); the pair is truncated or mismatched, rebuild it")
        check_token_ids(f"data: {bin_path}", bin_path, dtype.name, n_tokens, seq_len, vocab_size)


class MegatronTokens:
    """Megatron .bin/.idx datasets through megatron-core's own builders: GPTDataset's document shuffle and
    sample index, BlendedDataset's weighted draw. Built on rank 0 first (megatron-core's builder waits at a
    barrier when a process group is up), then read from the cache by every rank."""

    def __init__(self, d: DataConfig, *, vocab_size: int, seq_len: int, seed: int, num_samples: int) -> None:
        quiet_library_warnings()
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)  # its build log is per file
        prefixes, weights = megatron_blend(d)
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_len, blend_per_split=[(prefixes, weights), None, None],
            path_to_cache=cache_dir(d.cache_dir), tokenizer=_SpecialTokens(vocab_size),  # type: ignore[arg-type]
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        self.dataset = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True,
                                                     config).build()[0]

    def sample(self, index: int) -> torch.Tensor:
        item = self.dataset[index % len(self.dataset)]
        return torch.cat([item["tokens"], item["labels"][-1:]]).long()  # the seq_len+1 tokens it was cut from


def token_source(d: DataConfig, *, vocab_size: int, seq_len: int, seed: int, num_samples: int) -> TokenSource:
    if d.kind == "tokens":
        assert d.path is not None
        return TokenFile(d.path, dtype=d.dtype, seq_len=seq_len, seed=seed)
    if d.kind == "megatron":
        return MegatronTokens(d, vocab_size=vocab_size, seq_len=seq_len, seed=seed, num_samples=num_samples)
    return SyntheticTokens(vocab_size=vocab_size, seq_len=seq_len, seed=seed)


def rank_samples(source: TokenSource, *, step: int, layout: Layout, dp_rank: int) -> torch.Tensor:
    """This data-parallel rank's contiguous share of the global batch of optimizer step `step`."""
    per_rank = layout.global_batch_size // layout.dp
    first = step * layout.global_batch_size + dp_rank * per_rank
    return torch.stack([source.sample(first + i) for i in range(per_rank)])


def micro_batches(samples: torch.Tensor, *, layout: Layout, device: torch.device
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) micro-batches on the device; a pinned batch copies without blocking the host."""
    batches = []
    for chunk in samples.split(layout.micro_batch_size):
        chunk = chunk.to(device, non_blocking=True)
        batches.append((chunk[:, :-1], chunk[:, 1:]))
    return batches


def rank_micro_batches(
    source: TokenSource, *, step: int, layout: Layout, dp_rank: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's micro-batches of optimizer step `step`, as (inputs, targets)."""
    return micro_batches(rank_samples(source, step=step, layout=layout, dp_rank=dp_rank), layout=layout, device=device)


class _RankSteps(torch.utils.data.Dataset):
    """Item s: this rank's samples of step s, so a DataLoader prepares later steps while a step runs."""

    def __init__(self, source: TokenSource, layout: Layout, dp_rank: int, steps: int, start: int = 0) -> None:
        self.source, self.layout, self.dp_rank, self.steps, self.start = source, layout, dp_rank, steps, start

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> torch.Tensor:
        return rank_samples(self.source, step=self.start + index, layout=self.layout, dp_rank=self.dp_rank)


def step_batches(source: TokenSource, *, layout: Layout, dp_rank: int, steps: int, workers: int,
                 device: torch.device, start: int = 0) -> Iterator[torch.Tensor]:
    """Each step's samples in order from step `start` (a resumed run's data position), from torch's DataLoader:
    `workers` background processes keep two steps ahead each, into pinned memory on a GPU, so the step waits for
    data only when loading is the bottleneck."""
    loader = torch.utils.data.DataLoader(
        _RankSteps(source, layout, dp_rank, steps, start), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None, persistent_workers=False)
    return iter(loader)
