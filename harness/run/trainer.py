"""The bounded step loop of one rank: build the parallel model, run warm-up and timed steps, and hand
each step's measurements to the run directory (rank 0) as it ends."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from harness.backends import make_backend
from harness.backends.base import DTYPES, Backend
from harness.config.checks import compute_precision
from harness.core.console import say
from harness.core.layout import Layout
from harness.costmodel.flops import step_flops
from harness.launchers.env import RankInfo
from harness.models.gpt import GPT, GPTConfig
from harness.run.checkpoint import Checkpointer, record_attempt
from harness.run.data import TokenSource, micro_batches, step_batches, token_source
from harness.run.environment import kernels
from harness.run.live import Progress
from harness.run.metrics import MemoryMeter, TensorPeak, Throughput, device_name, resolve_peak
from harness.run.rank import frozen_gc, synchronize
from harness.run.rundir import RankReport, StepLog, hostname, write_run_files, write_run_summary
from harness.run.stopping import Terminated, Watchdog, job_end_time, out_of_time
from harness.telemetry import Sampler, StepReading, make_sampler
from harness.telemetry.summary import step_fields
from harness.trace.analyse import analyse_rank
from harness.trace.capture import TraceCapture, phase
from harness.trace.events import PHASES


@dataclass(frozen=True)
class Built:
    """Everything `Trainer.build` makes, as one record: either all of it exists or none does."""

    backend: Backend
    n_params: int
    throughput: Throughput
    data: TokenSource
    memory: MemoryMeter
    sampler: Sampler
    capture: TraceCapture


def builds_extension(cfg: DictConfig) -> bool:
    """DeepSpeed compiles an optimizer extension at its first use (FusedAdam, or CPUAdam when offloading)."""
    return cfg.backend.name.startswith("deepspeed") and (
        bool(cfg.backend.get("offload_optimizer")) or cfg.train.optimizer == "deepspeed_fused_adam")


class Trainer:
    """The bounded step loop of one rank; rank 0 also records and reports."""

    def __init__(self, cfg: DictConfig, info: RankInfo, device: torch.device, run_dir: Path, layout: Layout,
                 prediction: Optional[dict[str, Any]], host_before: Optional[dict[str, Any]] = None) -> None:
        self.cfg, self.info, self.device, self.run_dir = cfg, info, device, run_dir
        self.layout, self.prediction, self.host_before = layout, prediction, host_before
        self.tensor_peak_mb: Optional[float] = None
        self.is_writer = info.rank == 0
        self.end_time_s = job_end_time(os.environ)
        self.stop_reason = "completed"
        self.stop_agreed = False
        self.diverged: Optional[str] = None
        """Why the run stopped early on a non-finite loss or gradient norm (the same on every rank)."""
        self.built: Optional[Built] = None
        self.trace: Optional[dict[str, Any]] = None
        self.kernels: Optional[dict[str, Any]] = None
        self.step_log: Optional[StepLog] = None
        self.watchdog = Watchdog(cfg.launcher.watchdog_s, self.stalled)
        self.checkpointer = Checkpointer(cfg, info.rank, info.world_size, run_dir, layout)
        self.start_step = 0
        """The first step's number: 0, or where a resumed checkpoint left off."""
        self.end_step = cfg.train.warmup_steps + cfg.train.steps
        """One past the job's last step (the same for every attempt of a restarted job)."""
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        """Which attempt of the job this is: torch elastic restarts every rank after one dies."""
        self.started_unix_s = time.time()
        self.job_start = 0

    def build(self) -> Built:
        train, model_cfg = self.cfg.train, GPTConfig.from_section(self.cfg.model)
        started = time.perf_counter()
        if self.is_writer:
            say(f"{self.info.world_size} rank(s) started ({self.info.launcher} launcher; rank 0 on {hostname()}, "
                f"{self.device.type}); building {self.cfg.model.name} with {self.cfg.backend.name}")
            if builds_extension(self.cfg):
                say("DeepSpeed builds its Adam extension on first use (a minute or two; cached afterwards in "
                    "~/.cache/torch_extensions)")
        backend = make_backend(self.cfg, self.layout, self.device)
        if self.is_writer:
            write_run_files(self.run_dir, backend.run_files())
        torch.manual_seed(train.seed)
        if backend.materialize_before_setup:
            model = GPT(model_cfg)
        else:
            with torch.device("meta"):
                model = GPT(model_cfg)
        n_params = model.num_params()
        backend.setup(model)
        job_start = self.checkpointer.job_start()
        self.end_step = job_start + train.warmup_steps + train.steps
        resume = self.checkpointer.resume_from
        if self.attempt:  # a restart continues from the newest complete checkpoint this job wrote
            resume = self.checkpointer.latest() or resume
            if self.is_writer:
                say(f"restart {self.attempt}: resuming from {resume.name if resume else 'the start (no checkpoint)'}")
        self.start_step = self.checkpointer.load(backend, resume) if resume is not None else job_start
        self.job_start = job_start
        if self.is_writer and (self.attempt or self.cfg.launcher.max_restarts):
            record_attempt(self.run_dir, self.attempt, self.started_unix_s, self.start_step, resume)
        flops = step_flops(model_cfg, self.layout.global_batch_size, train.activation_checkpointing,
                           train.checkpoint_every_n)
        throughput = Throughput(
            flops=flops,
            tokens_per_step=self.layout.global_batch_size * model_cfg.seq_len,
            world_size=self.layout.world_size,
            peak=resolve_peak(self.cfg.system, compute_precision(self.cfg), self.device),
        )
        data = token_source(self.cfg.data, vocab_size=model_cfg.vocab_size, seq_len=model_cfg.seq_len,
                            seed=train.seed, num_samples=self.end_step * self.layout.global_batch_size)
        sampler = make_sampler(
            self.cfg.telemetry, device_type=self.device.type, device_index=self.device.index,
            local_rank=self.info.local_rank, rank=self.info.rank, host=hostname(),
            warmup_steps=train.warmup_steps, rocm=torch.version.hip is not None)
        if self.is_writer:
            self.kernels = kernels(self.cfg, self.device, DTYPES[compute_precision(self.cfg)])
        capture = TraceCapture(self.cfg, self.info.rank, self.run_dir, self.device)
        if self.is_writer:
            window = capture.window
            profiled = f"; recording steps {window.recorded.start}-{window.recorded.stop - 1} in a trace" \
                if window is not None else ""
            say(f"built in {time.perf_counter() - started:.1f} s ({n_params:,} parameters); {train.warmup_steps} "
                f"warm-up step(s), then {train.steps} measured{profiled}" if self.start_step == self.job_start else
                f"built in {time.perf_counter() - started:.1f} s; steps {self.start_step}-{self.end_step - 1} to go")
        return Built(backend, n_params, throughput, data, MemoryMeter(self.device), sampler, capture)

    def run(self) -> None:
        status, error = "ok", None
        try:
            if self.is_writer:
                self.step_log = StepLog(self.run_dir, self.attempt)
            self.built = self.build()
            with self.watchdog:
                self.loop(self.built)
            self.trace = analyse_rank(self.built.capture, self.info.rank, self.cfg.launcher.pg_timeout_s,
                                      skip="the run stopped for its wall-time" if self.stop_reason == "walltime"
                                      else None)
        except torch.OutOfMemoryError as exc:
            status, error, self.stop_reason = "oom", f"OutOfMemoryError: {exc}", "failed"
            raise
        except (Terminated, KeyboardInterrupt) as exc:
            status, self.stop_reason = "interrupted", "interrupted"
            error = f"Interrupted: {str(exc) or 'Ctrl-C (SIGINT)'}"
            raise
        except BaseException as exc:
            status, error, self.stop_reason = "failed", f"{type(exc).__name__}: {exc}", "failed"
            raise
        else:
            if self.diverged is not None:
                status, error = "diverged", self.diverged
        finally:
            self.finish(status, error)

    def loop(self, built: Built) -> None:
        train = self.cfg.train
        total = self.end_step - self.start_step
        warmup_end = self.job_start + train.warmup_steps
        progress = Progress(total, max(0, warmup_end - self.start_step)) if self.is_writer else None
        built.sampler.start()  # idle power first, with the model built and the device quiet
        with frozen_gc(), built.capture:
            synchronize(self.device)
            last = time.perf_counter()
            built.sampler.mark_step(last)
            loader = step_batches(built.data, layout=self.layout, dp_rank=built.backend.dp_rank, steps=total,
                                  workers=self.cfg.data.workers, device=self.device, start=self.start_step)
            for index in range(total):
                step = self.start_step + index  # its number in the whole training, resumed or not
                built.memory.start_step()
                self.inject_fault(index)
                waited = time.perf_counter()
                with phase(PHASES.data):
                    batches = micro_batches(next(loader), layout=self.layout, device=self.device)
                data_s = time.perf_counter() - waited
                if self.measures_tensor_peak(step, warmup_end):  # a warm-up step: not a timed step
                    with TensorPeak() as peak:
                        loss = built.backend.train_step(batches)
                    self.tensor_peak_mb = None if peak.peak_bytes is None else peak.peak_bytes / 2**20
                else:
                    loss = built.backend.train_step(batches)
                synchronize(self.device)
                now = time.perf_counter()
                iter_time_s, last = now - last, now
                reading = built.sampler.mark_step(now)
                assert reading is not None  # every boundary after the first closes a window
                record = self.record(built, step, step < warmup_end, loss, iter_time_s, data_s, reading)
                if self.attempt or self.cfg.launcher.max_restarts:
                    record["attempt"] = self.attempt
                if self.step_log is not None and progress is not None:
                    self.step_log.write(record)
                    progress.update(record)
                built.capture.step(index)
                self.watchdog.beat()
                if self.checkpointer.due(step) and self.diverged is None:
                    self.checkpointer.save(built.backend, step)
                    last = time.perf_counter()  # the save is its own phase, not part of the next step's time
                    built.sampler.mark_step(last)
                    self.watchdog.beat()
                if self.diverged is not None:
                    self.stop_reason = "diverged"
                    break
                if self.stop_agreed:
                    self.stop_reason = "walltime"
                    break
            self.checkpointer.wait()  # an asynchronous save still writing is part of the run
        if progress is not None:
            progress.close()

    def measures_tensor_peak(self, step: int, warmup_end: int) -> bool:
        """On a CPU, where no allocator keeps a peak, the last warm-up step is measured tensor by tensor."""
        return self.device.type == "cpu" and not self.cfg.profile.enabled and step == warmup_end - 1

    def inject_fault(self, step: int) -> None:
        """`train.fault_inject_oom_step`: the last rank fails as a real out-of-memory step would, so the
        failure path (peers ended, `status: oom`, a sweep going on) can be tested without a GPU."""
        if step == self.cfg.train.fault_inject_oom_step and self.info.rank == self.info.world_size - 1:
            raise torch.OutOfMemoryError(
                f"injected by train.fault_inject_oom_step={step} on rank {self.info.rank}")
        crash = self.cfg.train.get("fault_inject_crash_step")
        if crash is not None and self.attempt == 0 and self.start_step + step == crash \
                and self.info.rank == self.info.world_size - 1:
            os._exit(1)  # a node that vanishes: no summary, no goodbye
        if self.cfg.train.fault_inject_slow_ms and self.info.rank == self.cfg.train.fault_inject_slow_rank:
            time.sleep(self.cfg.train.fault_inject_slow_ms / 1e3)  # a slow device or node, as far as timing goes

    def record(self, built: Built, step: int, warmup: bool, loss: torch.Tensor, iter_time_s: float, data_s: float,
               reading: StepReading) -> dict[str, Any]:
        """One line of steps.jsonl. Its reduction falls into the next step's time, not hidden from it."""
        memory = built.memory.read()
        end_unix_s = time.time()  # places the step on power.csv's clock (the power view marks step windows)
        stop = out_of_time(self.end_time_s, end_unix_s, iter_time_s, self.cfg.launcher.walltime_margin_s)
        notes = built.backend.step_notes()
        grad_norm = notes.get("grad_norm")
        # fp16's loss scaler skips a step whose gradients overflowed: a non-finite norm there is not divergence.
        bad_grads = grad_norm is not None and not math.isfinite(grad_norm) and compute_precision(self.cfg) != "fp16"
        with phase(PHASES.metrics):
            loss_value, peak_mb, retries, self.stop_agreed, data_s, bad_grads, telemetry = self.reduce(
                loss, memory["peak_memory_mb"], memory["alloc_retries"], stop, data_s, bad_grads, reading.vector())
        nonfinite = {key: str(value) for key, value in (("loss", loss_value), ("grad_norm", grad_norm))
                     if isinstance(value, float) and not math.isfinite(value)}
        if not math.isfinite(loss_value) or bad_grads:
            what = " and ".join(f"{key} {value}" for key, value in nonfinite.items()) or "a rank's gradient norm"
            self.diverged = f"{what} at step {step}: not finite; lower train.lr (or look at the data)"
        return {
            "step": step,
            "warmup": warmup,
            "end_unix_s": end_unix_s,
            "loss": None if "loss" in nonfinite else loss_value,
            **built.throughput.rates(iter_time_s),
            "peak_memory_mb": peak_mb,
            "alloc_retries": retries,
            "data_time_ms": data_s * 1e3,
            **({"profiler": what} if (what := built.capture.label(step - self.start_step)) else {}),
            **notes,
            **({"grad_norm": None} if "grad_norm" in nonfinite else {}),
            **({"nonfinite": nonfinite} if nonfinite else {}),
            **step_fields(telemetry, iter_time_s),
        }

    def reduce(self, loss: torch.Tensor, peak_mb: float, retries: Optional[int], stop: bool, data_s: float,
               bad_grads: bool, telemetry: list[float]
               ) -> tuple[float, float, Optional[int], bool, float, bool, list[list[float]]]:
        """In one collective: the mean loss over ranks (tensor-parallel peers hold the same loss; nan if any rank's
        is), the largest peak memory and allocator retries of any rank (the one nearest its memory limit), rank
        0's decision to stop (so that every rank leaves the loop after the same step), the longest wait for data
        (the rank every other one waits for), whether any rank's gradients were not finite, and every rank's
        telemetry row. Every rank gets the same table, so all decide alike."""
        mine = torch.tensor([float(loss.detach()), peak_mb, float(retries or 0), float(stop), data_s, float(bad_grads),
                             *telemetry], dtype=torch.float64, device=loss.device)
        if self.info.world_size == 1:
            table = mine.reshape(1, -1)
        else:
            gathered = [torch.empty_like(mine) for _ in range(self.info.world_size)]
            dist.all_gather(gathered, mine)
            table = torch.stack(gathered)
        return (float(table[:, 0].mean()), float(table[:, 1].max()),
                None if retries is None else int(table[:, 2].max()), bool(table[0, 3]), float(table[:, 4].max()),
                bool(table[:, 5].max()), table[:, 6:].tolist())

    def stalled(self, error: Exception) -> None:
        """The watchdog's last act on this rank: the summary says the run stopped making progress."""
        self.stop_reason = "watchdog"
        self.finish("failed", f"{type(error).__name__}: {error}")

    def finish(self, status: str, error: Optional[str]) -> None:
        """Every rank reports its host, device and telemetry; rank 0 closes the step log and writes the summary."""
        built = self.built
        mine = RankReport(hostname(), device_name(self.device), built.sampler.stop() if built else None, self.trace,
                          self.tensor_peak_mb)
        if status in ("ok", "diverged") and self.info.world_size > 1:  # peers of a failed rank may be gone
            ranks: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if not self.is_writer:
            return
        if self.step_log is not None:
            error = self.step_log.close() or error
            status = "failed" if self.step_log.error and status == "ok" else status
        write_run_summary(self.run_dir, cfg=self.cfg, layout=self.layout, info=self.info, device=self.device,
                          status=status, error=error, stop_reason=self.stop_reason, ranks=ranks,
                          backend=built.backend if built else None, n_params=built.n_params if built else None,
                          throughput=built.throughput if built else None,
                          memory_kind=built.memory.kind if built else None, kernels=self.kernels,
                          prediction=self.prediction, host_before=self.host_before)
        logging.getLogger("harness.progress").info(  # the log's last word; the terminal gets the table
            f"{status}: {self.stop_reason or 'completed'}; summary.json written{f' ({error})' if error else ''}")
