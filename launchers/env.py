"""Rank discovery from the environment a launcher leaves behind.

`discover` is a pure function of an environment mapping (and of the host files it names, read through
an injectable reader), so every launcher can be unit-tested from environments written from its
documentation. Precedence, first match wins:

1. torchrun / torch elastic: `RANK`, `LOCAL_RANK`, `WORLD_SIZE` (and `LOCAL_WORLD_SIZE`, `GROUP_RANK`).
2. Slurm `srun`: `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_STEP_NUM_TASKS`, `SLURM_NODEID`. Only a job
   *step* counts: an `sbatch` script itself also sees `SLURM_PROCID=0` but is not one of the ranks.
3. LSF `jsrun` (Summit): `JSM_NAMESPACE_RANK`, `JSM_NAMESPACE_LOCAL_RANK`, `JSM_NAMESPACE_SIZE`,
   `JSM_NAMESPACE_LOCAL_SIZE`. jsrun's Spectrum MPI also sets Open MPI's variables; JSM's name the launcher.
4. Open MPI `mpiexec`/`mpirun`: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK`,
   `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_SIZE`.
5. PMI (MPICH Hydra, Intel MPI, Cray PALS under PBS on Polaris and Aurora): `PMI_RANK`, `PMI_SIZE`, and
   the local place from `PMI_LOCAL_RANK`/`PALS_LOCAL_RANKID`/`MPI_LOCALRANKID` and
   `PMI_LOCAL_SIZE`/`PALS_LOCAL_SIZE`/`MPI_LOCALNRANKS`.

`MASTER_ADDR` comes from the environment when set; else, for srun, from the first host of the step's
(or job's) node list; else 127.0.0.1 when all ranks are on this node; else from the first host of the
allocation: the Slurm node list (mpirun inside sbatch), `$PBS_NODEFILE`, or `$LSB_DJOB_HOSTFILE` without
its batch/login hosts (the launch node LSF lists first). Otherwise discovery fails and says what is missing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, MutableMapping, Optional

DEFAULT_MASTER_PORT = 29500


class LaunchEnvError(RuntimeError):
    """The environment describes ranks inconsistently or incompletely."""


ReadLines = Callable[[str], list[str]]
"""Reads a host file (`$PBS_NODEFILE`, `$LSB_DJOB_HOSTFILE`) into lines; tests pass their own files."""


def read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError as exc:
        raise LaunchEnvError(f"cannot read host file {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str
    num_nodes: int


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as `nid[001-003,007],login1` or `rack[1-2]-n[01-02]` into host names."""
    hosts: list[str] = []
    for host in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        hosts.extend(_expand_host(host))
    return hosts


def _expand_host(pattern: str) -> list[str]:
    """All names of one host pattern; each bracket group multiplies the names."""
    match = re.search(r"\[([^\]]+)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            names.extend(f"{head}{i:0{len(lo)}d}{rest}" for rest in _expand_host(tail))
    return names


def _slurm_tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node `node_id` from `SLURM_STEP_TASKS_PER_NODE`, e.g. `4(x2),2`."""
    node = 0
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        node += int(repeat or 1)
        if node_id < node:
            return int(count)
    raise LaunchEnvError(f"SLURM_STEP_TASKS_PER_NODE={spec} does not cover node {node_id}")


_Found = tuple[int, int, int, int, int, int, str]
"""rank, local rank, world size, local world size, node rank, nodes, launcher."""


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    """The first of `names` that is set, as a whole number; LaunchEnvError (naming it) when it is not one."""
    for name in names:
        value = env.get(name, "")
        if value != "":
            if not re.fullmatch(r"\s*-?[0-9]+\s*", value):
                raise LaunchEnvError(f"{name}={value!r} is not a whole number: the launcher's environment is "
                                     f"broken; unset {name}")
            return int(value)
    return None


def _req(env: Mapping[str, str], name: str) -> int:
    value = _int(env, name)
    assert value is not None  # the caller checked that `name` is set
    return value


def _from_torchrun(env: Mapping[str, str]) -> Optional[_Found]:
    if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= env.keys():
        return None
    world = _req(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE") or world
    # torchrun starts the same number of ranks on every node; `export` passes on a node count it knows.
    return (_req(env, "RANK"), _req(env, "LOCAL_RANK"), world, local_world, _int(env, "GROUP_RANK") or 0,
            _int(env, "NNODES") or max(1, world // local_world), "torchrun")


def _from_slurm(env: Mapping[str, str]) -> Optional[_Found]:
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None
    node = _int(env, "SLURM_NODEID") or 0
    spec = env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"])
    nodes = _int(env, "SLURM_STEP_NUM_NODES") or sum(int(r or 1) for _, r in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec))
    return (_req(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID") or 0, _req(env, "SLURM_STEP_NUM_TASKS"),
            _slurm_tasks_on_node(spec, node), node, nodes, "slurm")


def _from_submitit_local(env: Mapping[str, str]) -> Optional[_Found]:
    """submitit's local executor (hydra/launcher=local) starts each task with its own variables and no Slurm
    ones (submitit/local/local.py)."""
    if "SUBMITIT_LOCAL_GLOBALID" not in env or "SUBMITIT_LOCAL_NTASKS" not in env:
        return None
    world = _req(env, "SUBMITIT_LOCAL_NTASKS")
    return _req(env, "SUBMITIT_LOCAL_GLOBALID"), _int(env, "SUBMITIT_LOCAL_LOCALID") or 0, world, world, 0, 1, \
        "submitit-local"


# Per MPI launcher: the variable that marks it, then rank, local rank, size, local size ("A|B": A, else B).
_MPI_VARIABLES = {
    "jsrun": ("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_SIZE", "JSM_NAMESPACE_LOCAL_SIZE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "pmi": ("PMI_RANK", "PMI_LOCAL_RANK|PALS_LOCAL_RANKID|MPI_LOCALRANKID", "PMI_SIZE",
            "PMI_LOCAL_SIZE|PALS_LOCAL_SIZE|MPI_LOCALNRANKS"),
}


def _from_mpi(env: Mapping[str, str]) -> Optional[_Found]:
    launcher = next((name for name, names in _MPI_VARIABLES.items() if names[0] in env), None)
    if launcher is None:
        return None
    names = _MPI_VARIABLES[launcher]
    values = [_int(env, *name.split("|")) for name in names]
    missing = [name for name, value in zip(names, values) if value is None]
    if missing:
        raise LaunchEnvError(f"{launcher} launch without {', '.join(missing)}: cannot place this rank")
    rank, local_rank, world, local_world = (int(v) for v in values)  # type: ignore[arg-type]
    if local_world < 1:
        raise LaunchEnvError(f"{launcher}: local size {local_world} must be at least 1")
    # PALS names the node; the others do not, so assume block placement with equal counts per node.
    node = _int(env, "PALS_NODEID")
    nodes = max(1, -(-world // local_world))
    return rank, local_rank, world, local_world, rank // local_world if node is None else node, nodes, launcher


_PLACING = {"torchrun": ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"), "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
            "submitit-local": ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS"),
            **{name: (names[0], names[2]) for name, names in _MPI_VARIABLES.items()}}


def launcher_variables(launcher: str, env: Mapping[str, str] = os.environ) -> str:
    """The variables that placed this rank, as `NAME=value` (for a message that says where a world came from)."""
    return ", ".join(f"{name}={env.get(name, '')}" for name in _PLACING.get(launcher, ()) if name in env)


def _allocation_first_host(env: Mapping[str, str], read: ReadLines) -> Optional[str]:
    """The first compute host of the batch allocation, where block placement puts rank 0."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist:
        return expand_nodelist(nodelist)[0]
    if env.get("PBS_NODEFILE"):
        hosts = [line.strip() for line in read(env["PBS_NODEFILE"]) if line.strip()]
        if hosts:
            return hosts[0]
    if env.get("LSB_DJOB_HOSTFILE"):
        # LSF lists the launch (batch) node first; jsrun places no rank there.
        hosts = [line.strip() for line in read(env["LSB_DJOB_HOSTFILE"])
                 if line.strip() and not line.strip().startswith(("batch", "login"))]
        if hosts:
            return hosts[0]
    return None


def _master_addr(env: Mapping[str, str], world: int, local_world: int, launcher: str, read: ReadLines) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if launcher == "slurm" or world != local_world:
        first = _allocation_first_host(env, read)
        if first is not None:
            return first
    if world == local_world:
        return "127.0.0.1"
    raise LaunchEnvError(
        f"{launcher} launch across nodes without MASTER_ADDR, and no SLURM_JOB_NODELIST, PBS_NODEFILE or "
        "LSB_DJOB_HOSTFILE to find the first host: export MASTER_ADDR=<first host of the allocation>"
    )


def discover(env: Mapping[str, str], read: ReadLines = read_lines) -> Optional[RankInfo]:
    """This process's place in the job, or None when no launcher started it."""
    found = _from_torchrun(env) or _from_slurm(env) or _from_submitit_local(env) or _from_mpi(env)
    if found is None:
        return None
    rank, local_rank, world, local_world, node_rank, nodes, launcher = found
    if not 0 <= rank < world:
        raise LaunchEnvError(f"{launcher}: rank {rank} is outside world size {world}")
    if not 0 <= local_rank < local_world:
        raise LaunchEnvError(f"{launcher}: local rank {local_rank} is outside the {local_world} ranks of its node")
    port = _int(env, "MASTER_PORT") or DEFAULT_MASTER_PORT
    if launcher == "submitit-local" and "MASTER_PORT" not in env:  # local jobs of one sweep run side by side
        port = 20000 + (_int(env, "SUBMITIT_LOCAL_JOB_ID") or 0) % 20000
    return RankInfo(rank, local_rank, world, local_world, node_rank,
                    _master_addr(env, world, local_world, launcher, read), port, launcher, nodes)


GPU_ORDERS = ("local_rank", "reversed")


def device_index(local_rank: int, visible: int, order: str = "local_rank") -> int:
    """Which of the `visible` devices this rank drives: one device per rank, by local rank.

    A scheduler that binds one device per task (`srun --gpus-per-task=1 --gpu-bind=closest` on Frontier,
    `jsrun -g 1` on Summit, an affinity script setting CUDA_VISIBLE_DEVICES) leaves one visible: index 0.
    `reversed` counts from the last device: on Polaris GPU 3 is closest to cores 0-7, so ALCF's
    set_affinity_gpu_polaris.sh gives local rank 0 GPU 3.
    """
    if visible < 1:
        raise LaunchEnvError(f"local rank {local_rank} sees no device; check the job's GPU request and binding")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise LaunchEnvError(f"local rank {local_rank} but only {visible} devices are visible on this node; "
                             "start at most one rank per device")
    return visible - 1 - local_rank if order == "reversed" else local_rank


def export(info: RankInfo, env: MutableMapping[str, str] = os.environ) -> None:
    """Write the torchrun-style variables that `init_process_group("env://")` and Fabric read."""
    env.update(
        RANK=str(info.rank),
        LOCAL_RANK=str(info.local_rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        GROUP_RANK=str(info.node_rank),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
        NNODES=str(info.num_nodes),
    )
