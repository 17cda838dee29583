"""`checkpoint.*` checked before any process starts: a checkpoint to resume from must be a harness checkpoint of the
same model and backend (and, for DeepSpeed and pipelines, the same layout), and no existing step is written over
unless the user asks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from harness.core.errors import ConfigError
from harness.core.registry import backend_spec

META = "harness-checkpoint.json"
"""What a checkpoint was saved from, written beside the state by rank 0."""
MODEL_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "seq_len", "activation",
              "norm", "position", "tie_embeddings", "bias")
LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata of the checkpoint at `path`, or a one-line error naming what is wrong."""
    where = f"checkpoint.resume_from={path}"
    if not path.is_dir():
        raise ConfigError(f"{where}: no such directory; give a step-<n> directory that a run with checkpoint.every "
                          "wrote")
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: not a harness checkpoint (no {META}); give a step-<n> directory that a run "
                          "with checkpoint.every wrote") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {META} is unreadable ({exc}); the save may have been cut short") from None
    if not meta.get("complete"):
        raise ConfigError(f"{where}: the save did not finish (a job killed while writing it); resume from an "
                          "earlier step-<n>")
    return meta


def check_resume(meta: dict[str, Any], cfg: Any, layout: Any, path: Path) -> None:
    where = f"checkpoint.resume_from={path}"
    saved, model = meta["model"], cfg.model
    differs = [k for k in MODEL_KEYS if str(saved.get(k)) != str(model.get(k))]
    if differs:
        shown = ", ".join(f"{k} {saved.get(k)} vs {model.get(k)}" for k in differs[:3])
        raise ConfigError(f"{where}: saved from model {saved.get('name')}, this run is {model.name} ({shown}); resume "
                          f"with model={saved.get('name')} and the same model.* overrides")
    if meta["backend"] != cfg.backend.name:
        raise ConfigError(f"{where}: saved by backend={meta['backend']}, whose format backend={cfg.backend.name} "
                          f"does not read; resume with backend={meta['backend']}")
    same_layout = all(meta["layout"].get(k) == getattr(layout, k) for k in LAYOUT_KEYS)
    if not same_layout and (backend_spec(cfg.backend.name).deepspeed_engine or layout.pp > 1
                            or meta["layout"].get("pp", 1) > 1):
        saved_layout = " ".join(f"{k}={meta['layout'].get(k)}" for k in LAYOUT_KEYS)
        raise ConfigError(f"{where}: saved with {saved_layout}; backend={cfg.backend.name}"
                          f"{' with a pipeline' if not backend_spec(cfg.backend.name).deepspeed_engine else ''} loads "
                          "only into the layout that saved it (DeepSpeed's ds_to_universal.py converts its "
                          "checkpoints; torch.distributed.checkpoint reshards DDP and FSDP2 without pipelines)")


def probe_writable(root: Path, where: str) -> None:
    """That `root` can be created and written: a directory made and removed in its nearest existing ancestor (a
    permission bit says too little on a parallel file system, or as root)."""
    ancestor = next(p for p in (root, *root.parents) if p.exists())
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".harness-probe-", dir=ancestor))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create it under {ancestor} ({exc.strerror}); give a directory you can "
                          "write (a scratch file system)") from None


def check_checkpoint(cfg: Any, layout: Any) -> Optional[dict[str, Any]]:
    """The metadata of the checkpoint to resume from (None: a fresh start), after every check."""
    c = cfg.checkpoint
    if c.every < 0:
        raise ConfigError(f"checkpoint.every={c.every}: give 0 (never) or the steps between saves")
    if c.get("async_save") and backend_spec(cfg.backend.name).deepspeed_engine:
        raise ConfigError(f"checkpoint.async_save=true: backend={cfg.backend.name} saves through DeepSpeed's "
                          "save_checkpoint, which blocks; use checkpoint.async_save=false (or backend=ddp/fsdp)")
    meta = None
    if c.resume_from:
        path = Path(c.resume_from).expanduser()
        meta = read_meta(path)
        check_resume(meta, cfg, layout, path)
    if c.every and c.dir:
        root = Path(c.dir).expanduser().absolute()
        probe_writable(root, f"checkpoint.dir={c.dir}")
        start = meta["next_step"] if meta else 0
        end = start + cfg.train.warmup_steps + cfg.train.steps
        taken = [step_dir(root, s).name for s in range(start + 1, end + 1) if s % c.every == 0
                 and step_dir(root, s).exists()]
        if taken and not c.overwrite:
            raise ConfigError(f"checkpoint.dir={c.dir}: holds {', '.join(taken[:3])} that this run would write over; "
                              "give another directory or checkpoint.overwrite=true")
    return meta
