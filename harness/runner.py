"""One benchmark run: validate, launch the ranks, train for a bounded number of steps, write the run directory.

`run` executes in the process the user started. It validates the config before any process group
exists, then either joins the ranks a cluster launcher started (torchrun, srun, mpiexec), runs a
single rank in-process, or starts `launcher.nproc` local ranks through PyTorch's elastic agent.
`rank_main` is what every rank runs. If no rank managed to write `summary.json` (a rank was killed,
say), `run` writes it from the steps already on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from harness.backends import make_backend
from harness.config import (ConfigError, Layout, compute_precision, default_threads_per_rank, to_container,
                            validate)
from harness.costmodel.estimate import estimate, predicted_metrics
from harness.costmodel.flops import step_flops
from harness.data import rank_micro_batches, token_source
from harness.metrics import MemoryMeter, Throughput, device_name, resolve_peak
from harness.report import Progress, print_summary
from harness.results import (
    StepLog,
    build_summary,
    environment,
    hostname,
    read_steps,
    write_config,
    write_summary,
)
from harness.stopping import Watchdog, job_end_time, out_of_time, raise_on_sigterm
from harness.telemetry import Sampler, StepReading, make_sampler
from harness.telemetry.summary import step_fields, telemetry_block, write_power_csv
from launchers.env import RankInfo, device_index, discover, export
from launchers.local import launch_local
from models.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> str:
    """Run one benchmark and return its status (`ok | failed | oom`). Raises ConfigError before launch."""
    joined = discover(os.environ)
    world_size = joined.world_size if joined else cfg.launcher.nproc
    layout = validate(cfg, world_size)
    _check_device(cfg.system.device)
    config = to_container(cfg)
    if joined is None or joined.rank == 0:
        write_config(run_dir, config)
    threads = cfg.launcher.omp_num_threads or default_threads_per_rank(
        joined.local_world_size if joined else cfg.launcher.nproc
    )
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        if joined is not None:
            rank_main(config, str(run_dir))
        elif cfg.launcher.nproc == 1:
            with _single_rank_env():
                rank_main(config, str(run_dir))
        else:
            launch_local(cfg.launcher.nproc, rank_main, config, str(run_dir),
                         monitor_interval_s=cfg.launcher.monitor_interval_s)
    except ChildFailedError as exc:
        return _ensure_failed_summary(run_dir, config, layout, _child_error(exc))
    except Exception as exc:  # the in-process rank already wrote its summary
        return _ensure_failed_summary(run_dir, config, layout, f"{type(exc).__name__}: {exc}")
    summary = run_dir / "summary.json"
    return _read_status(summary) if summary.exists() else "ok"


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("system.device=cuda but torch sees no GPU; use system=cpu or a CUDA/ROCm build of torch")
    if device == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError("system.device=xpu but torch sees no Intel GPU; use system=cpu or an XPU build of torch")


@contextlib.contextmanager
def _single_rank_env() -> Iterator[None]:
    """torchrun-style variables for a 1-rank job run in this process; removed afterwards."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    saved = dict(os.environ)
    export(RankInfo(0, 0, 1, 1, 0, "127.0.0.1", get_free_port(), "local", 1))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _child_error(exc: ChildFailedError) -> str:
    """Every failed rank in the order the agent saw them: the first is usually the cause, the rest its echo."""
    parts = []
    for rank, failure in sorted(exc.failures.items(), key=lambda item: item[1].timestamp):
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        detail = message.strip().splitlines()[-1] if message.strip() else f"exit code {failure.exitcode}"
        parts.append(f"rank {rank} failed: {detail}")
    return "; ".join(parts)


def _read_status(summary: Path) -> str:
    return json.loads(summary.read_text())["status"]


def _ensure_failed_summary(run_dir: Path, config: dict[str, Any], layout: Layout, error: str) -> str:
    """Make `summary.json` say why the job failed, from the launching process's view of all ranks.

    A rank may have written its own failed summary first (a peer's death shows up there as a
    collective error); its status and steps are kept, and the error names every failed rank.
    """
    path = run_dir / "summary.json"
    stalled = "StalledRun:" in error  # some rank's watchdog ended the job
    oom = "OutOfMemoryError" in error or "out of memory" in error.lower()
    if path.exists() and _read_status(path) != "ok":
        summary = json.loads(path.read_text())
        summary["error"] = error  # includes what rank 0 reported, through its @record error file
        summary["stop_reason"] = "watchdog" if stalled else summary.get("stop_reason", "failed")
        if oom:  # a peer's OOM reaches rank 0 only as the agent's SIGTERM or a broken collective
            summary["status"] = "oom"
        write_summary(run_dir, summary)
        return summary["status"]
    status = "oom" if oom else "failed"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_summary(run_dir, build_summary(
        status=status, error=error, config=config, layout=layout.as_dict(), model={},
        steps=read_steps(run_dir),
        env=environment(world_size=layout.world_size, hostnames=[hostname()], devices=[], launcher="unknown"),
        stop_reason="watchdog" if stalled else "failed",
    ))
    log.error("run failed: %s", error)
    return status


@record
def rank_main(config: dict[str, Any], run_dir: str) -> None:
    """What every rank runs: join the process group, train, leave."""
    cfg = OmegaConf.create(config)
    info = discover(os.environ)
    assert info is not None, "rank_main needs a launcher environment"
    export(info)
    raise_on_sigterm()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = _rank_device(cfg.system.device, info.local_rank, cfg.launcher.gpu_order)
    dist.init_process_group(
        backend=_process_group_backend(device),
        timeout=datetime.timedelta(seconds=cfg.launcher.pg_timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        Trainer(cfg, info, device, Path(run_dir)).run()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Move everything imported and built so far out of the collector's reach for the timed loop.

    Otherwise each full collection walks millions of framework objects mid-step (torchtitan and
    Megatron manage the GC in their loops for the same reason). Unfrozen afterwards, so the trainer
    and its process groups are freed while the process is whole, not left to interpreter shutdown.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _rank_device(choice: str, local_rank: int, order: str) -> torch.device:
    """One device per rank (ROCm builds of torch drive AMD GPUs as 'cuda'; Intel GPUs are 'xpu')."""
    kind = choice
    if choice == "auto":
        xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        kind = "cuda" if torch.cuda.is_available() else "xpu" if xpu else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    accelerator = getattr(torch, kind)
    index = device_index(local_rank, accelerator.device_count(), order)
    accelerator.set_device(index)
    return torch.device(kind, index)


def _process_group_backend(device: torch.device) -> str:
    """NCCL (RCCL on ROCm) for GPUs, oneCCL's xccl for Intel GPUs, gloo on CPU."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "xpu":
        if not dist.is_xccl_available():
            raise RuntimeError("this torch build has no xccl backend for Intel GPUs; install torch 2.8+ built for XPU")
        return "xccl"
    return "gloo"


def gpt_config(model: Any) -> GPTConfig:
    """The model section of the config as the model's own dataclass."""
    return GPTConfig(**{f.name: model[f.name] for f in dataclasses.fields(GPTConfig)})


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


class Trainer:
    """The bounded step loop of one rank; rank 0 also records and reports."""

    def __init__(self, cfg: DictConfig, info: RankInfo, device: torch.device, run_dir: Path) -> None:
        self.cfg, self.info, self.device, self.run_dir = cfg, info, device, run_dir
        self.layout = validate(cfg, info.world_size)
        self.is_writer = info.rank == 0
        self.steps: list[dict[str, Any]] = []
        self.end_time_s = job_end_time(os.environ)
        self.stop_reason = "completed"

    def build(self) -> None:
        train = self.cfg.train
        self.backend = make_backend(self.cfg, self.layout, self.device)
        if self.is_writer:
            for name, content in self.backend.run_files().items():
                (self.run_dir / name).write_text(json.dumps(content, indent=2) + "\n")
        torch.manual_seed(train.seed)
        if self.backend.materialize_before_setup:
            model = GPT(gpt_config(self.cfg.model))
        else:
            with torch.device("meta"):
                model = GPT(gpt_config(self.cfg.model))
        self.n_params = model.num_params()
        self.backend.setup(model)
        flops = step_flops(self.cfg.model, self.layout.global_batch_size, train.activation_checkpointing,
                           train.checkpoint_every_n)
        self.throughput = Throughput(
            flops=flops,
            tokens_per_step=self.layout.global_batch_size * self.cfg.model.seq_len,
            world_size=self.layout.world_size,
            peak=resolve_peak(self.cfg.system, compute_precision(self.cfg), self.device),
        )
        d = self.cfg.data
        self.data = token_source(kind=d.kind, vocab_size=self.cfg.model.vocab_size, seq_len=self.cfg.model.seq_len,
                                 seed=train.seed, path=d.path, dtype=d.dtype)
        self.memory = MemoryMeter(self.device)
        self.sampler: Sampler = make_sampler(
            self.cfg.telemetry, device_type=self.device.type, device_index=self.device.index,
            local_rank=self.info.local_rank, rank=self.info.rank, host=hostname(),
            warmup_steps=train.warmup_steps, rocm=torch.version.hip is not None)

    def run(self) -> None:
        status, error = "ok", None
        step_log = StepLog(self.run_dir) if self.is_writer else None
        try:
            self.build()
            with Watchdog(self.cfg.launcher.watchdog_s, self.stalled) as self.watchdog:
                self.loop(step_log)
        except torch.OutOfMemoryError as exc:
            status, error, self.stop_reason = "oom", f"OutOfMemoryError: {exc}", "failed"
            raise
        except BaseException as exc:
            status, error, self.stop_reason = "failed", f"{type(exc).__name__}: {exc}", "failed"
            raise
        finally:
            if step_log is not None:
                step_log.close()
            self.finish(status, error)

    def loop(self, step_log: Optional[StepLog]) -> None:
        train = self.cfg.train
        total = train.warmup_steps + train.steps
        progress = Progress(total, train.warmup_steps) if self.is_writer else None
        self.sampler.start()  # idle power first, with the model built and the device quiet
        with frozen_gc():
            _synchronize(self.device)
            last = time.perf_counter()
            self.sampler.mark_step(last)
            for step in range(total):
                self.memory.start_step()
                self.inject_fault(step)
                batches = rank_micro_batches(self.data, step=step, layout=self.layout,
                                             dp_rank=self.backend.dp_rank, device=self.device)
                loss = self.backend.train_step(batches)
                _synchronize(self.device)
                now = time.perf_counter()
                iter_time_s, last = now - last, now
                reading = self.sampler.mark_step(now)
                assert reading is not None  # every boundary after the first closes a window
                record = self.record(step, step < train.warmup_steps, loss, iter_time_s, reading)
                if step_log is not None and progress is not None:
                    step_log.write(record)
                    progress.update(record)
                self.watchdog.beat()
                if self.stop_agreed:
                    self.stop_reason = "walltime"
                    break
        if progress is not None:
            progress.close()

    def inject_fault(self, step: int) -> None:
        """`train.fault_inject_oom_step`: the last rank fails as a real out-of-memory step would, so the
        failure path (peers ended, `status: oom`, a sweep going on) can be tested without a GPU."""
        if step == self.cfg.train.fault_inject_oom_step and self.info.rank == self.info.world_size - 1:
            raise torch.OutOfMemoryError(
                f"injected by train.fault_inject_oom_step={step} on rank {self.info.rank}")

    def record(self, step: int, warmup: bool, loss: torch.Tensor, iter_time_s: float,
               reading: StepReading) -> dict[str, Any]:
        """One line of steps.jsonl. Its reduction falls into the next step's time, not hidden from it."""
        memory = self.memory.read()
        stop = out_of_time(self.end_time_s, time.time(), iter_time_s, self.cfg.launcher.walltime_margin_s)
        loss_value, peak_mb, retries, self.stop_agreed, telemetry = self.reduce(
            loss, memory["peak_memory_mb"], memory["alloc_retries"], stop, reading.vector())
        return {
            "step": step,
            "warmup": warmup,
            "loss": loss_value,
            **self.throughput.rates(iter_time_s),
            "peak_memory_mb": peak_mb,
            "alloc_retries": retries,
            **self.backend.step_notes(),
            **step_fields(telemetry, iter_time_s),
        }

    def reduce(self, loss: torch.Tensor, peak_mb: float, retries: Optional[int], stop: bool,
               telemetry: list[float]) -> tuple[float, float, Optional[int], bool, list[list[float]]]:
        """In one collective: the mean loss over ranks (tensor-parallel peers hold the same loss), the largest
        peak memory and allocator retries of any rank (the one nearest its memory limit), rank 0's decision
        to stop (so that every rank leaves the loop after the same step), and every rank's telemetry row."""
        mine = torch.tensor([float(loss.detach()), peak_mb, float(retries or 0), float(stop), *telemetry],
                            dtype=torch.float64, device=loss.device)
        if self.info.world_size == 1:
            table = mine.reshape(1, -1)
        else:
            gathered = [torch.empty_like(mine) for _ in range(self.info.world_size)]
            dist.all_gather(gathered, mine)
            table = torch.stack(gathered)
        return (float(table[:, 0].mean()), float(table[:, 1].max()),
                None if retries is None else int(table[:, 2].max()), bool(table[0, 3]), table[:, 4:].tolist())

    def stalled(self, error: Exception) -> None:
        """The watchdog's last act on this rank: the summary says the run stopped making progress."""
        self.stop_reason = "watchdog"
        self.finish("failed", f"{type(error).__name__}: {error}")

    def finish(self, status: str, error: Optional[str]) -> None:
        sampler: Optional[Sampler] = getattr(self, "sampler", None)  # None if the build failed first
        mine = (hostname(), device_name(self.device), sampler.stop() if sampler is not None else None)
        if status == "ok" and self.info.world_size > 1:  # peers of a failed rank may be gone
            ranks: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        hostnames, devices = [r[0] for r in ranks], [r[1] for r in ranks]
        if not self.is_writer:
            return
        reports = [r[2] for r in ranks if r[2] is not None]
        steps = read_steps(self.run_dir)
        notes = self.backend.summary_notes() if hasattr(self, "backend") else {}
        summary = build_summary(
            status=status,
            error=error,
            config=to_container(self.cfg),
            layout={**self.layout.as_dict(), **notes.get("layout", {})},
            model={**self.model_info(), **notes.get("model", {})},
            steps=steps,
            env=environment(world_size=self.info.world_size, hostnames=hostnames, devices=devices,
                            launcher=self.info.launcher),
            extra_metrics={**self.metric_notes(), **notes.get("metrics", {})},
            stop_reason=self.stop_reason,
            **self.prediction(),
            telemetry=telemetry_block(reports, write_power_csv(self.run_dir, reports)) if reports else None,
        )
        write_summary(self.run_dir, summary)
        if status == "ok":
            print_summary(summary, self.run_dir)

    def prediction(self) -> dict[str, Any]:
        """The cost model's values for this run's metric keys; its failure must never fail the run.

        A profile that names no accelerator (system=cuda) gets the device torch reports, for its peak.
        """
        cfg = self.cfg
        if cfg.system.accelerator is None and self.device.type == "cuda":
            cfg = OmegaConf.merge(cfg, {"system": {"accelerator": device_name(self.device)}})
        try:
            return {"prediction": predicted_metrics(estimate(cfg, self.layout))}
        except Exception as exc:  # noqa: BLE001 - reported in the summary instead
            return {"prediction": None, "prediction_reason": f"cost model failed: {type(exc).__name__}: {exc}"}

    def model_info(self) -> dict[str, Any]:
        dims = dataclasses.asdict(gpt_config(self.cfg.model))
        return {"name": self.cfg.model.name, "params": getattr(self, "n_params", None), **dims}

    def metric_notes(self) -> dict[str, Any]:
        throughput = getattr(self, "throughput", None)
        memory = getattr(self, "memory", None)
        notes: dict[str, Any] = {"peak_memory_kind": getattr(memory, "kind", None)}
        if hasattr(getattr(self, "backend", None), "model"):  # set up: how much of the model rank 0 holds
            notes["params_on_rank0"] = self.backend.local_params()
        if memory is not None and memory.kind == "cpu_peak_rss":
            notes["alloc_retries_reason"] = "no caching allocator on a CPU (retries are a CUDA statistic)"
        if throughput is not None:
            notes.update(
                model_flops_per_step=throughput.flops.model,
                hardware_flops_per_step=throughput.flops.hardware,
                peak_tflops=throughput.peak.tflops,
                peak_tflops_source=throughput.peak.source,
            )
            if throughput.peak.tflops is None:
                notes["mfu_reason"] = notes["hfu_reason"] = throughput.peak.reason
        return notes
