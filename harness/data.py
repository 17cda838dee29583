"""`harness data prepare`: local text into a Megatron .bin/.idx pair that `data=megatron` (and Megatron-LM,
Megatron-DeepSpeed) read, tokenized by a Hugging Face tokenizer in worker processes and written by
megatron-core's own IndexedDatasetBuilder (the format is megatron-core's; nothing here re-writes it).

Documents: one per line of a JSON-lines file (its `text` field, or --text-key), and one per blank-line
separated paragraph of any other text file. Each document ends with the tokenizer's end-of-text id, as
Megatron's preprocess_data.py --append-eod does, so samples that cross documents see the boundary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from harness.core.console import quiet_library_warnings
from harness.core.errors import ConfigError

USAGE = """usage: harness data prepare INPUT [INPUT ...] --out PREFIX --tokenizer PATH [--workers N]
                            [--text-key KEY] [--eod-token TOKEN]

Tokenize local text into PREFIX.bin and PREFIX.idx (Megatron's indexed dataset), then train on it with
`harness run data=megatron data.prefix=PREFIX`.

  INPUT           .jsonl/.json files (one document per line, its "text" field) or plain text files
                  (one document per blank-line separated paragraph)
  --tokenizer     a Hugging Face tokenizer on this machine: a tokenizer.json file, or a directory that
                  transformers' AutoTokenizer loads (no download: local files only)
  --workers N     tokenizing processes (default: the CPUs this process may use, at most 8)
  --text-key KEY  the JSON field holding the text (default: text)
  --eod-token T   the token ending each document (default: the tokenizer's EOS, <|endoftext|> or </s>)

  harness data prepare corpus.jsonl --out data/corpus_text_document --tokenizer tokenizer.json"""

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")

_tokenizer: Any = None
"""The worker process's tokenizer (loaded once per worker by _load)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"data prepare: {message} (harness data --help)")


def data_command(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] != "prepare":
        raise ConfigError(f"data: unknown subcommand '{args[0]}'; choose prepare (harness data --help)")
    if any(a in ("-h", "--help") for a in args[1:]):
        print(USAGE)
        return 0
    ns = prepare_parser().parse_args(args[1:])
    _check(ns)
    prepare(ns.inputs, ns.out, ns.tokenizer, workers=ns.workers, text_key=ns.text_key, eod_token=ns.eod_token)
    return 0


def prepare_parser() -> _Parser:
    """`harness data prepare`'s options."""
    parser = _Parser(prog="harness data prepare", add_help=False)
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--eod-token")
    return parser


def _check(ns: argparse.Namespace) -> None:
    for path in ns.inputs:
        if not path.is_file():
            raise ConfigError(f"data prepare: {path}: no such file; give text or JSON-lines files")
    if not ns.tokenizer.exists():
        raise ConfigError(f"data prepare: --tokenizer={ns.tokenizer}: no such file or directory; give a local "
                          "tokenizer.json or a tokenizer directory")
    if ns.workers < 1:
        raise ConfigError(f"data prepare: --workers={ns.workers}: must be at least 1")
    held = [ns.out + suffix for suffix in (".bin", ".idx") if Path(ns.out + suffix).exists()]
    if held:
        raise ConfigError(f"data prepare: --out={ns.out}: {', '.join(held)} already exist; choose another prefix "
                          "(nothing is overwritten)")
    parent = Path(ns.out).parent
    if not parent.is_dir():
        raise ConfigError(f"data prepare: --out={ns.out}: directory {parent} does not exist; create it first")
    load_tokenizer(ns.tokenizer)  # a file that is not a tokenizer fails here, before the workers start
    for path in ns.inputs:
        _sniff(path, ns.text_key)


SNIFF_BYTES = 64 * 2**10
"""What of each input is read before tokenizing starts: binary or malformed input fails at once, not after the
workers have started (the rest is checked as it is read)."""


def _sniff(path: Path, text_key: str) -> None:
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    whole = head if len(head) < SNIFF_BYTES else head[: head.rfind(b"\n") + 1]
    try:
        text = whole.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data prepare: {path}: not UTF-8 text (byte {exc.start}); give text or JSON-lines "
                          "files") from None
    if path.suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), 1):
            _json_text(line, path, number, text_key)


def load_tokenizer(path: Path) -> Any:
    """A tokenizers.Tokenizer from a tokenizer.json file, else transformers' AutoTokenizer from a directory."""
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust library raises a bare Exception for any bad file
            raise ConfigError(f"data prepare: --tokenizer={path}: not a Hugging Face tokenizer.json "
                              f"({str(exc).splitlines()[0][:200]}); give the tokenizer.json of a tokenizer, or "
                              "its directory") from None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"data prepare: --tokenizer={path} is a directory, which needs transformers "
                          "(pip install transformers), or give its tokenizer.json") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data prepare: --tokenizer={path}: not a tokenizer ({exc})".splitlines()[0]) from None


def vocab_size(tokenizer: Any) -> int:
    return tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else len(tokenizer)


def eod_id(tokenizer: Any, token: Optional[str]) -> int:
    """The id that ends each document: --eod-token, else the tokenizer's EOS or a usual end-of-text token."""
    vocab = tokenizer.get_vocab()
    if token is not None:
        if token not in vocab:
            raise ConfigError(f"data prepare: --eod-token={token} is not in the tokenizer's vocabulary")
        return int(vocab[token])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return int(eos)
    for candidate in EOD_CANDIDATES:
        if candidate in vocab:
            return int(vocab[candidate])
    raise ConfigError("data prepare: the tokenizer has no end-of-text token (" + ", ".join(EOD_CANDIDATES)
                      + "); name one with --eod-token")


def documents(paths: list[Path], text_key: str) -> Iterator[str]:
    """Each document's text in input order; a JSON line that does not parse, or a file that is not UTF-8 text,
    is one error line naming it."""
    for path in paths:
        try:
            yield from _documents(path, text_key)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"data prepare: {path}: not UTF-8 text (byte {exc.start} of a line or paragraph); "
                              "give text or JSON-lines files") from None


def _json_text(line: str, path: Path, number: int, text_key: str) -> Optional[str]:
    """The text of one JSON line (None for a blank line); one error line naming a line that is not one."""
    if not line.strip():
        return None
    try:
        text = json.loads(line)[text_key]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"data prepare: {path}:{number}: not a JSON object with a '{text_key}' field "
                          "(--text-key names another)") from None
    return str(text) if text else None


def _documents(path: Path, text_key: str) -> Iterator[str]:
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                text = _json_text(line, path, number, text_key)
                if text:
                    yield text
    else:
        for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
            if paragraph.strip():
                yield paragraph.strip()


def _load(path: str) -> None:
    global _tokenizer
    _tokenizer = load_tokenizer(Path(path))


def _encode(text: str) -> tuple[list[int], int]:
    """(token ids, bytes of text) of one document, in a worker."""
    size = len(text.encode("utf-8"))
    if hasattr(_tokenizer, "get_vocab_size"):
        return _tokenizer.encode(text, add_special_tokens=False).ids, size
    return _tokenizer(text, add_special_tokens=False)["input_ids"], size


def prepare(inputs: list[Path], out: str, tokenizer_path: Path, *, workers: int, text_key: str,
            eod_token: Optional[str]) -> dict[str, Any]:
    """Tokenize `inputs` with `workers` processes into out.bin/out.idx; prints and returns the summary."""
    import multiprocessing

    import numpy as np
    import torch

    quiet_library_warnings()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from rich.progress import Progress

    tokenizer = load_tokenizer(tokenizer_path)
    vocab, eod = vocab_size(tokenizer), eod_id(tokenizer, eod_token)
    dtype = DType.optimal_dtype(vocab)
    total_bytes = sum(p.stat().st_size for p in inputs)
    start, n_docs, n_tokens = time.perf_counter(), 0, 0
    builder = IndexedDatasetBuilder(out + ".bin", dtype=dtype)
    try:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_load, initargs=(str(tokenizer_path),)) \
                as pool, Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task("tokenizing", total=total_bytes)
            for ids, size in pool.imap(_encode, documents(inputs, text_key), chunksize=64):
                ids = [*ids, eod]
                builder.add_document(torch.from_numpy(np.asarray(ids, dtype=np.int64)), [len(ids)])
                n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
                progress.advance(task, size)
        if not n_docs:
            raise ConfigError(f"data prepare: {', '.join(map(str, inputs))}: no documents (empty files?)")
        builder.finalize(out + ".idx")
    except BaseException:
        for suffix in (".bin", ".idx"):  # ours, half-written: a later run must not read them
            Path(out + suffix).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    summary = {"prefix": out, "documents": n_docs, "tokens": n_tokens, "seconds": seconds,
               "tokens_per_s": n_tokens / seconds, "workers": workers, "vocab_size": vocab, "eod": eod,
               "dtype": np.dtype(dtype).name}
    print(f"harness: wrote {out}.bin and {out}.idx: {n_docs} documents, {n_tokens} tokens ({summary['dtype']}, "
          f"vocabulary {vocab}, end-of-text id {eod}) in {seconds:.1f} s = {n_tokens / seconds:,.0f} tokens/s "
          f"with {workers} worker(s); train on it: harness run data=megatron data.prefix={out}")
    return summary
