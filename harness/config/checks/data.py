"""The data section: the kind, Megatron datasets and their blends, and files of token ids (read once, by a memory
map, to check every id against the vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from harness.config.checks.common import choice
from harness.config.schema import (
    DataConfig,
)
from harness.core.errors import ConfigError

DATA_KINDS = ("synthetic", "tokens", "megatron")


TOKEN_DTYPES = {"uint16": 2, "uint32": 4}


def megatron_blend(d: DataConfig) -> tuple[list[str], Optional[list[float]]]:
    """(prefixes, weights or None) of data=megatron, from data.prefix, data.blend or data.blend_file: the
    blend tuple megatron-core's BlendedMegatronDatasetConfig takes. ConfigError (one line) for bad input."""
    given = [key for key in ("prefix", "blend", "blend_file") if d[key]]
    if len(given) != 1:
        raise ConfigError("data=megatron needs exactly one of data.prefix=PATH, data.blend=[w,PATH,...] or "
                          f"data.blend_file=FILE (given: {', '.join(given) or 'none'})")
    if d.prefix:
        return [str(d.prefix)], None
    if d.blend_file:
        path = Path(d.blend_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.blend_file={d.blend_file}: no such file; give a list of `weight prefix` lines")
        items: list[Any] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) not in (2, 3):
                raise ConfigError(f"data.blend_file={d.blend_file} line {number}: expected `weight prefix [corpus]`, "
                                  f"got {line.strip()!r}")
            items += fields[:2]
        where = f"data.blend_file={d.blend_file}"
    else:
        items, where = list(d.blend), "data.blend"
    if not items or len(items) % 2:
        raise ConfigError(f"{where}: give weight, prefix pairs (e.g. [0.3,/data/a_text_document,0.7,/data/b]); "
                          f"got {len(items)} item(s)")
    weights = []
    for weight in items[0::2]:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: weight {weight!r} is not a number; give weight, prefix pairs") from None
        if not value > 0:
            raise ConfigError(f"{where}: weight {weight!r} must be positive")
        weights.append(value)
    return [str(p) for p in items[1::2]], weights


def check_megatron(d: DataConfig) -> None:
    prefixes, _ = megatron_blend(d)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).expanduser().is_file():
                raise ConfigError(f"data: {prefix}{suffix}: no such file; give the prefix of a .bin/.idx pair "
                                  "(harness data prepare writes one)")


def check_data(d: DataConfig, seq_len: int, vocab_size: int) -> None:
    choice(d.kind, DATA_KINDS, "data.kind")
    if d.workers < 0:
        raise ConfigError(f"data.workers={d.workers}: must be 0 (load in the step) or more loader processes")
    if d.kind == "megatron":
        check_megatron(d)
    if d.kind != "tokens":
        return
    choice(d.dtype, TOKEN_DTYPES, "data.dtype")
    if not d.path:
        raise ConfigError("data.path is not set; data=tokens needs data.path=/path/to/tokens.bin")
    path = Path(d.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path={d.path}: no such file; give an existing token file")
    size = path.stat().st_size
    item = TOKEN_DTYPES[d.dtype]
    if size % item:
        other = [name for name, width in TOKEN_DTYPES.items() if size % width == 0 and name != d.dtype]
        fix = f"use data.dtype={other[0]}" if other else "the file is truncated or not a token file"
        raise ConfigError(f"data.path={d.path} is {size} bytes, not a whole number of {d.dtype} tokens "
                          f"({item} bytes each); {fix}")
    check_token_ids(f"data.path={d.path}", path, d.dtype, size // item, seq_len, vocab_size)


def check_token_ids(label: str, path: Path, dtype: str, n_tokens: int, seq_len: int, vocab_size: int) -> None:
    """A file of token ids (data=tokens, or a Megatron .bin) holds at least one sample (seq_len+1 tokens) and
    only ids the model's vocabulary covers (one pass over the file through a memory map)."""
    if n_tokens < seq_len + 1:
        raise ConfigError(
            f"{label} holds {n_tokens} {dtype} tokens, fewer than model.seq_len+1={seq_len + 1}; "
            "use a larger file or a shorter model.seq_len"
        )
    import numpy as np  # only for token files; keeps the common path light

    largest = int(np.memmap(path, dtype=np.dtype(dtype), mode="r").max())
    if largest >= vocab_size:
        raise ConfigError(
            f"{label} holds token id {largest}, outside model.vocab_size={vocab_size}; "
            "use a model whose vocab_size exceeds the tokenizer's ids"
        )
