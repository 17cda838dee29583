"""Real training data: `harness data prepare` writes a .bin/.idx pair megatron-core reads back token for
token; `data=megatron` keeps the layout contract (1 rank and 2 ranks with a background loader give the
same losses), blends draw in their stated proportions, every step records its wait for data, and bad
datasets fail before launch in one line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from harness.core.errors import ConfigError
from tests.conftest import GLOBAL_BATCH, TINY, assert_losses_match, harness, harness_run
from tests.test_parity import TOLERANCE

WORDS = "the model trains on tokens of text and every layout sees the same batch at the same step".split()
DATA = ["data=megatron", "model.vocab_size=64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """300 documents in a JSON-lines file and a text file, a word-level tokenizer trained on them here
    (no download), and the dataset `harness data prepare` makes of them with 2 workers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(300)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:200]))
    (root / "notes.txt").write_text("\n\n".join(docs[200:]))
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tokenizer.save(str(root / "tokenizer.json"))
    proc = harness(["data", "prepare", "corpus.jsonl", "notes.txt", "--out", "corpus_text_document",
                    "--tokenizer", "tokenizer.json", "--workers", "2"], cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "300 documents" in proc.stdout, proc.stdout
    return {"root": root, "prefix": str(root / "corpus_text_document"), "docs": docs, "tokenizer": tokenizer}


def test_prepared_dataset_reads_back_token_for_token(corpus: dict) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer, eod = corpus["tokenizer"], corpus["tokenizer"].token_to_id("<|endoftext|>")
    dataset = IndexedDataset(corpus["prefix"])
    assert len(dataset) == len(corpus["docs"]) == 300
    for i, doc in enumerate(corpus["docs"]):
        assert dataset[i].tolist() == [*tokenizer.encode(doc).ids, eod], f"document {i}"


def test_layouts_see_the_same_megatron_samples_and_record_data_time(corpus: dict, tmp_path: Path) -> None:
    data = [*DATA, f"data.prefix={corpus['prefix']}", f"data.cache_dir={tmp_path / 'cache'}"]
    reference = harness_run(tmp_path / "one", *TINY, *GLOBAL_BATCH, *data)
    two = harness_run(tmp_path / "two", *TINY, *GLOBAL_BATCH, *data, "launcher.nproc=2", "data.workers=1")
    assert_losses_match(reference, two, TOLERANCE, "ddp-2 on megatron data, 1 loader worker")
    for run in (reference, two):
        assert all(step["data_time_ms"] >= 0 for step in run.steps)
        assert run.summary["metrics"]["data_time_ms"] is not None
    report = harness(["report", str(tmp_path / "one"), str(tmp_path / "two"), "--view", "sweep", "--format",
                      "json"], cwd=tmp_path, timeout=120)
    rows = json.loads(report.stdout)["sweep"]
    assert sorted(r["data ms"] for r in rows) == pytest.approx(
        sorted(r.summary["metrics"]["data_time_ms"] for r in (reference, two)))


def _indexed(prefix: Path, first_id: int) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(first_id)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(40):
        doc = rng.integers(first_id, first_id + 50, size=int(rng.integers(20, 120)))
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_a_blend_draws_each_dataset_in_its_stated_proportion(tmp_path: Path) -> None:
    """Dataset a holds ids 0-49 and b ids 100-149, so each sample says where it came from."""
    from omegaconf import OmegaConf

    from harness.config.schema import DataConfig
    from harness.run.data import MegatronTokens

    a, b = _indexed(tmp_path / "a", 0), _indexed(tmp_path / "b", 100)
    (tmp_path / "list.txt").write_text(f"# ALCF-style data list\n0.25 {a} corpus-a\n0.75 {b} corpus-b\n")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # as every rank has one
    try:
        for blend in ({"blend": [0.25, a, 0.75, b]}, {"blend_file": str(tmp_path / "list.txt")}):
            d = OmegaConf.merge(OmegaConf.structured(DataConfig),
                                {"kind": "megatron", "cache_dir": str(tmp_path / "c"), **blend})
            source = MegatronTokens(d, vocab_size=256, seq_len=16, seed=1, num_samples=400)
            from_b = [bool(source.sample(i)[0] >= 100) for i in range(400)]
            assert sum(from_b) / 400 == pytest.approx(0.75, abs=0.01), blend
    finally:
        dist.destroy_process_group()


def _broken(corpus: dict, tmp_path: Path, damage: str) -> str:
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus["prefix"] + suffix, str(prefix) + suffix)
    if damage == "no-idx":
        Path(f"{prefix}.idx").unlink()
    if damage == "short-bin":
        with open(f"{prefix}.bin", "r+b") as f:
            f.truncate(Path(f"{prefix}.bin").stat().st_size - 2)
    return str(prefix)


@pytest.mark.parametrize("overrides, needle", [
    (["data.prefix={no-idx}"], "copy.idx: no such file"),
    (["data.prefix={short-bin}"], "copy.bin is"),
    (["data.prefix={intact}", "model.vocab_size=8"], "outside model.vocab_size=8"),
    (["data.blend=[]"], "needs exactly one of data.prefix"),
    (["data.blend=[0.5]"], "data.blend: give weight, prefix pairs"),
    (["data.blend=[x,{intact}]"], "weight 'x' is not a number"),
    (["data.blend=[-1,{intact}]"], "must be positive"),
    (["data.blend_file={tmp}/none.txt"], "data.blend_file="),
    (["data.prefix={intact}", "data.workers=-1"], "data.workers=-1"),
])
def test_a_bad_dataset_fails_before_launch_in_one_line(corpus: dict, tmp_path: Path, overrides: list[str],
                                                        needle: str) -> None:
    damage = next((d for d in ("no-idx", "short-bin", "intact") if any(d in o for o in overrides)), None)
    prefix = _broken(corpus, tmp_path, damage) if damage else ""
    args = [o.replace("{" + str(damage) + "}", prefix).replace("{tmp}", str(tmp_path)) for o in overrides]
    proc = harness(["run", "model=gpt-tiny", *DATA, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                   timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needle", [
    (["prepare", "missing.jsonl", "--out", "x", "--tokenizer", "tokenizer.json"], "missing.jsonl: no such file"),
    (["prepare", "corpus.jsonl", "--out", "corpus_text_document", "--tokenizer", "tokenizer.json"],
     "already exist"),
    (["prepare", "corpus.jsonl", "--out", "y", "--tokenizer", "nope.json"], "--tokenizer=nope.json"),
    (["prepare", "bad.jsonl", "--out", "z", "--tokenizer", "tokenizer.json"], "bad.jsonl:2: not a JSON object"),
    (["prepare", "corpus.jsonl", "--tokenizer", "tokenizer.json"], "--out"),
    (["convert"], "unknown subcommand 'convert'"),
    (["prepare", "binary.txt", "--out", "b", "--tokenizer", "tokenizer.json"], "binary.txt: not UTF-8 text"),
    (["prepare", "binary.jsonl", "--out", "b", "--tokenizer", "tokenizer.json"], "binary.jsonl: not UTF-8 text"),
    (["prepare", "corpus.jsonl", "--out", "g", "--tokenizer", "garbage.json"],
     "--tokenizer=garbage.json: not a Hugging Face tokenizer.json"),
])
def test_data_prepare_answers_bad_input_in_one_line(corpus: dict, args: list[str], needle: str) -> None:
    root = corpus["root"]
    (root / "bad.jsonl").write_text('{"text": "the model"}\nnot json\n')
    for name in ("binary.txt", "binary.jsonl"):
        (root / name).write_bytes(b"\x00\x01\xff\xfe binary\n\x89PNG\r\n")
    (root / "garbage.json").write_text("{garbage")
    proc = harness(["data", *args], cwd=root, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not any((root / f"{p}.{suffix}").exists() for p in ("x", "y", "z", "b", "g") for suffix in ("bin", "idx"))


def test_megatron_blend_needs_exactly_one_source() -> None:
    from omegaconf import OmegaConf

    from harness.config.checks.data import megatron_blend
    from harness.config.schema import DataConfig

    d = OmegaConf.merge(OmegaConf.structured(DataConfig), {"kind": "megatron", "prefix": "/a", "blend": [1, "/b"]})
    with pytest.raises(ConfigError, match="exactly one of"):
        megatron_blend(d)
