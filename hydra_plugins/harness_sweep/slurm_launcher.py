"""`harness run -m hydra/launcher=slurm system=<site> ...`: each sweep point as its own Slurm job
(`hydra/launcher=local`: as a job of submitit's local executor on this host).

(Hydra instantiates launchers only from the `hydra_plugins` namespace, hence this package's place.)

This is hydra-submitit-launcher's SlurmLauncher with what a benchmark sweep needs on top:
- each point's job is sized from that point's own config (points that sweep the number of ranks get
  different jobs; the plugin alone gives every job of a sweep the same resources): ranks =
  parallel.world_size or launcher.nproc, spread over nodes of the system profile's ranks per node
  (`job.ranks_per_node`, else `devices_per_node`), one GPU per rank on GPU systems, the profile's
  partition (`job.queue`) and wall-time (`job.walltime`): the settings `harness submit` uses;
- points that finished earlier with the same config (sweep.resume=true) are not submitted again;
- each job's status comes back to the command, which exits non-zero naming the points that failed.
Every job's tasks are the run's ranks (submitit starts one task per rank, under srun), and join as srun
ranks do; `hydra.launcher.account=...` and the plugin's other keys still apply.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


def job_resources(cfg: Any) -> dict[str, Any]:
    """The Slurm resources of one point: its ranks over nodes, GPUs on GPU systems, the site's partition and time."""
    system = cfg.system
    ranks = cfg.parallel.world_size or cfg.launcher.nproc
    per_node = min(ranks, system.job.ranks_per_node or system.devices_per_node or 1)
    hours, minutes, seconds = (int(part) for part in str(system.job.walltime).split(":"))
    out: dict[str, Any] = {"nodes": -(-ranks // per_node), "tasks_per_node": per_node,
                           "timeout_min": max(1, hours * 60 + minutes + (seconds > 0))}
    if system.device in ("cuda", "xpu"):
        out["gpus_per_node"] = per_node
    if system.job.queue:
        out["partition"] = system.job.queue
    return out


class _SizedSweep:
    """Submits one job array per distinct point size, all before waiting on any (both executors)."""

    _EXECUTOR: str
    params: dict[str, Any]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from harness.config.compose import to_container
        from harness.run import command
        from harness.run.sweep import check_launcher_strings, finished_earlier

        assert self.config is not None and self.hydra_context is not None
        check_launcher_strings(self.params)  # `harness run` checked them first; a job script is never written unchecked
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        results: dict[int, JobReturn] = {}
        groups: dict[str, list[tuple[int, list[str], Path]]] = {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            point = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(point):
                point.hydra.job.num = idx
            run_dir = sweep_dir / str(point.hydra.sweep.subdir)
            job_cfg = OmegaConf.masked_copy(point, [key for key in point if key != "hydra"])  # what the task sees
            if point.sweep.resume and finished_earlier(run_dir, to_container(job_cfg)):
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} (finished earlier, not submitted)")
                results[idx] = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value="skipped")
                command._sweep_points.append((str(run_dir), "skipped"))
                continue
            key = json.dumps(job_resources(point), sort_keys=True)
            groups.setdefault(key, []).append((idx, list(overrides), run_dir))
        jobs = []
        for key, points in groups.items():
            slurm = self._EXECUTOR == "slurm"
            extra = {"slurm_max_num_timeout": self.params["max_num_timeout"]} if slurm else {}
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"], **extra)
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            params = {**{k: v for k, v in self.params.items() if k not in ("submitit_folder", "max_num_timeout")},
                      **json.loads(key)}
            if not slurm:  # the local executor knows the base keys only
                params = {k: v for k, v in params.items() if k in base}
            executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
            for idx, overrides, _ in points:
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} ({json.loads(key)})")
            submitted = executor.map_array(self, *zip(*[(o, "hydra.sweep.dir", i, f"job_id_for_{i}",
                                                         Singleton.get_state()) for i, o, _ in points]))
            jobs += [(idx, run_dir, job) for (idx, _, run_dir), job in zip(points, submitted)]
        for idx, run_dir, job in jobs:
            try:
                done = job.results()[0]
                status = done.return_value if done.status == JobStatus.COMPLETED else f"failed ({done._return_value})"
            except Exception as exc:  # the job ended outside the task (killed, cancelled, a node failure)
                status = f"failed (Slurm job {job.job_id}: {type(exc).__name__})"
            # Reported as completed, so that Hydra's sweeper goes on; the command names the failed points.
            results[idx] = JobReturn(overrides=[], status=JobStatus.COMPLETED, _return_value=status)
            command._sweep_points.append((str(run_dir), str(status)))
        return [results[i] for i in sorted(results)]


class SlurmSweepLauncher(_SizedSweep, SlurmLauncher):
    """`hydra/launcher=slurm`: each point a Slurm job."""


class LocalSweepLauncher(_SizedSweep, LocalLauncher):
    """`hydra/launcher=local`: each point a job of submitit's local executor (its tasks are the ranks, on this
    host): the cluster path, tried on a workstation."""
