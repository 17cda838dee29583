"""`harness.launchers.env`: rank discovery from environments written the way each launcher documents them.

Pure functions only: no processes, no network. Every environment below carries the launcher's full
variable set plus ordinary shell noise, so a test also catches discovery that keys on the wrong variable.
"""

from __future__ import annotations

import pytest

from harness.launchers.env import DEFAULT_MASTER_PORT, LaunchEnvError, RankInfo, discover, expand_nodelist, export

SHELL = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/alice", "USER": "alice", "LANG": "C.UTF-8",
         "SHELL": "/bin/bash", "HOSTNAME": "nid001", "PWD": "/home/alice/bench"}

TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
              "MASTER_PORT")


# --- environments, one builder per launcher ------------------------------------------------------------


def torchrun_env(rank: int, world: int = 8, per_node: int = 4, *, addr: str | None = "nid001",
                 port: str | None = "29400") -> dict[str, str]:
    """What torch.distributed.run (elastic agent) sets for each worker it starts."""
    env = dict(SHELL, RANK=str(rank), LOCAL_RANK=str(rank % per_node), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK=str(rank // per_node),
               GROUP_WORLD_SIZE=str(world // per_node), ROLE_RANK=str(rank), ROLE_NAME="default",
               ROLE_WORLD_SIZE=str(world), TORCHELASTIC_RUN_ID="bench-42", TORCHELASTIC_RESTART_COUNT="0",
               TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_USE_AGENT_STORE="True",
               TORCH_NCCL_ASYNC_ERROR_HANDLING="1", OMP_NUM_THREADS="1")
    if addr is not None:
        env["MASTER_ADDR"] = addr
    if port is not None:
        env["MASTER_PORT"] = port
    return env


def slurm_job_env(ntasks: int = 8, nodes: int = 2, nodelist: str = "nid[001-002]",
                  tasks_per_node: str = "4(x2)") -> dict[str, str]:
    """What the batch script of `sbatch -N2 --ntasks-per-node=4` sees (job scope, no step variables)."""
    return dict(SHELL, SLURM_JOB_ID="123456", SLURM_JOBID="123456", SLURM_JOB_NAME="bench",
                SLURM_JOB_USER="alice", SLURM_JOB_ACCOUNT="proj", SLURM_JOB_PARTITION="gpu",
                SLURM_CLUSTER_NAME="perlmutter", SLURM_SUBMIT_DIR="/home/alice/bench",
                SLURM_SUBMIT_HOST="login1",
                SLURM_NTASKS=str(ntasks), SLURM_NPROCS=str(ntasks), SLURM_NNODES=str(nodes),
                SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist,
                SLURM_TASKS_PER_NODE=tasks_per_node, SLURM_JOB_CPUS_PER_NODE="64(x2)",
                SLURM_CPUS_ON_NODE="64",
                SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_TASK_PID="4242",
                SLURM_GTIDS="0", SLURMD_NODENAME="nid001", SLURM_TOPOLOGY_ADDR="nid001",
                SLURM_JOB_GPUS="0,1,2,3")


def srun_env(procid: int, localid: int, nodeid: int, *, ntasks: int = 8, tasks_per_node: str = "4(x2)",
             step_nodelist: str = "nid[001-002]", job_nodelist: str | None = None, nodes: int = 2,
             **extra: str) -> dict[str, str]:
    """What `srun` sets in each task of a job step (job variables plus the step's)."""
    env = slurm_job_env(ntasks, nodes, job_nodelist or step_nodelist, tasks_per_node)
    env.update(SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_STEP_NUM_TASKS=str(ntasks),
               SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
               SLURM_STEP_NODELIST=step_nodelist, SLURM_STEP_LAUNCHER_PORT="41001",
               SLURM_SRUN_COMM_PORT="41002",
               SLURM_PROCID=str(procid), SLURM_LOCALID=str(localid), SLURM_NODEID=str(nodeid),
               SLURM_GTIDS=str(procid), SLURM_TASK_PID=str(5000 + procid), SLURM_DISTRIBUTION="block",
               SLURM_UMASK="0022", SLURM_CPU_BIND="quiet,mask_cpu:0x1")
    env.update(extra)
    return env


def openmpi_env(rank: int, world: int = 8, per_node: int = 4, **extra: str) -> dict[str, str]:
    """What Open MPI's mpirun/mpiexec (PRRTE/PMIx) sets in each rank."""
    env = dict(SHELL, OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_RANK=str(rank % per_node),
               OMPI_COMM_WORLD_SIZE=str(world), OMPI_COMM_WORLD_LOCAL_SIZE=str(per_node),
               OMPI_COMM_WORLD_NODE_RANK=str(rank % per_node), OMPI_UNIVERSE_SIZE=str(world),
               OMPI_APP_CTX_NUM_PROCS=str(world), OMPI_FIRST_RANKS="0", PMIX_RANK=str(rank),
               PMIX_NAMESPACE="prterun-login1-4242@1", PMIX_SERVER_URI41="pmix-server.1;tcp4")
    env.update(extra)
    return env


def pals_env(rank: int, world: int = 8, per_node: int = 4, *, pmi_local: bool = True, **extra: str
             ) -> dict[str, str]:
    """What Cray PALS `mpiexec -n 8 --ppn 4` sets under PBS (Polaris, Aurora).

    `pmi_local=False` leaves out PMI_LOCAL_RANK/PMI_LOCAL_SIZE: some PALS versions only give the local
    place as PALS_LOCAL_RANKID/PALS_LOCAL_SIZE.
    """
    env = dict(SHELL, PBS_JOBID="987654.polaris-pbs-01", PBS_JOBNAME="bench",
               PBS_O_WORKDIR="/home/alice/bench",
               PBS_NODEFILE="/var/spool/pbs/aux/987654.polaris-pbs-01", PBS_QUEUE="debug",
               PMI_RANK=str(rank), PMI_SIZE=str(world), PMI_UNIVERSE_SIZE=str(world),
               PMI_JOBID="987654", PMI_CONTROL_PORT="12345",
               PALS_RANKID=str(rank), PALS_NODEID=str(rank // per_node),
               PALS_LOCAL_RANKID=str(rank % per_node),
               PALS_LOCAL_SIZE=str(per_node), PALS_APID="0b4a2d8e-1c5f", PALS_DEPTH="8", PALS_SPINDLE="0")
    if pmi_local:
        env.update(PMI_LOCAL_RANK=str(rank % per_node), PMI_LOCAL_SIZE=str(per_node))
    env.update(extra)
    return env


def rank_env(launcher: str, rank: int, world: int = 8, per_node: int = 4, **extra: str) -> dict[str, str]:
    """`rank` of a uniform layout (`per_node` ranks on each node, block placement) under `launcher`."""
    if launcher == "torchrun":
        env = torchrun_env(rank, world, per_node)
    elif launcher == "slurm":
        nodes = world // per_node
        env = srun_env(rank, rank % per_node, rank // per_node, ntasks=world, nodes=nodes,
                       tasks_per_node=f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
                       step_nodelist="nid[001-002]" if nodes == 2 else "nid001")
    elif launcher == "openmpi":
        env = openmpi_env(rank, world, per_node, MASTER_ADDR="nid001")
    elif launcher == "pmi":
        env = pals_env(rank, world, per_node, MASTER_ADDR="nid001")
    elif launcher == "pals-local":
        env = pals_env(rank, world, per_node, pmi_local=False, MASTER_ADDR="nid001")
    else:
        raise AssertionError(launcher)
    env.update(extra)
    return env


LAUNCHERS = ["torchrun", "slurm", "openmpi", "pmi", "pals-local"]
REPORTED = {"torchrun": "torchrun", "slurm": "slurm", "openmpi": "openmpi", "pmi": "pmi", "pals-local": "pmi"}
PORT = {"torchrun": 29400}


# --- every launcher, every rank of 2 nodes x 4 ------------------------------------------------------------


@pytest.mark.parametrize("rank", range(8))
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_each_launcher_places_every_rank_of_two_nodes(launcher: str, rank: int) -> None:
    assert discover(rank_env(launcher, rank)) == RankInfo(
        rank=rank, local_rank=rank % 4, world_size=8, local_world_size=4, node_rank=rank // 4,
        master_addr="nid001", master_port=PORT.get(launcher, DEFAULT_MASTER_PORT),
        launcher=REPORTED[launcher], num_nodes=2)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_rank_5_of_8_is_node_1_local_rank_1(launcher: str) -> None:
    info = discover(rank_env(launcher, 5))
    assert info is not None
    layout = (info.rank, info.local_rank, info.node_rank, info.world_size, info.local_world_size)
    assert layout == (5, 1, 1, 8, 4)
    assert info.num_nodes == 2


def test_discover_reads_only_the_mapping_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in torchrun_env(3).items():
        monkeypatch.setenv(name, value)
    assert discover({}) is None
    assert discover(slurm_job_env()) is None


# --- precedence ---------------------------------------------------------------------------------------------


def test_torchrun_inside_an_srun_step_wins_over_slurm() -> None:
    # `srun -N2 --ntasks-per-node=1 torchrun --nproc-per-node=4 ...`: Slurm sees 2 tasks (one agent per node),
    # torchrun's workers are the 8 ranks.
    env = srun_env(1, 0, 1, ntasks=2, tasks_per_node="1(x2)", step_nodelist="nid[001-002]")
    env.update(torchrun_env(6, addr="nid001", port="29400"))
    assert discover(env) == RankInfo(6, 2, 8, 4, 1, "nid001", 29400, "torchrun", 2)


def test_torchrun_wins_over_mpi() -> None:
    env = openmpi_env(1, world=2, per_node=1)
    env.update(torchrun_env(6))
    assert discover(env) == RankInfo(6, 2, 8, 4, 1, "nid001", 29400, "torchrun", 2)


@pytest.mark.parametrize("mpi", ["openmpi", "pmi"])
def test_slurm_step_wins_over_mpi(mpi: str) -> None:
    # `srun --mpi=pmix|pmi2`: the task sees Slurm's step variables and the MPI library's; here they disagree
    # (stale MPI variables inherited from an outer mpiexec) so the winner is visible in the numbers.
    env = (openmpi_env if mpi == "openmpi" else pals_env)(0, world=2, per_node=2)
    env.update(srun_env(5, 1, 1))
    assert discover(env) == RankInfo(5, 1, 8, 4, 1, "nid001", DEFAULT_MASTER_PORT, "slurm", 2)


def test_mpirun_inside_an_sbatch_script_is_mpi_not_slurm() -> None:
    # The batch script's SLURM_PROCID=0 reaches every rank mpirun starts on the batch node; without step
    # variables it must not shadow the MPI ranks.
    env = slurm_job_env(ntasks=4, nodes=1, nodelist="nid001", tasks_per_node="4")
    env.update(openmpi_env(3, world=4, per_node=4))
    assert discover(env) == RankInfo(3, 3, 4, 4, 0, "127.0.0.1", DEFAULT_MASTER_PORT, "openmpi", 1)


# --- not a rank ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [
    pytest.param({}, id="empty"),
    pytest.param(dict(SHELL), id="workstation-shell"),
    pytest.param(slurm_job_env(ntasks=2, nodes=1, nodelist="nid001", tasks_per_node="2"), id="sbatch-script"),
    pytest.param(slurm_job_env(), id="sbatch-script-2-nodes"),
    pytest.param({k: v for k, v in slurm_job_env().items() if k not in ("SLURM_PROCID", "SLURM_LOCALID",
                                                                        "SLURM_NODEID", "SLURM_GTIDS")},
                 id="salloc-shell"),
    pytest.param(dict(SHELL, PBS_JOBID="1.pbs", PBS_NODEFILE="/var/spool/pbs/aux/1.pbs"), id="pbs-script"),
    pytest.param(dict(SHELL, MASTER_ADDR="nid001", MASTER_PORT="29500", TORCHELASTIC_RUN_ID="x"),
                 id="rendezvous-vars-only"),
])
def test_no_launcher_means_no_rank(env: dict[str, str]) -> None:
    assert "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env
    assert discover(env) is None


def test_sbatch_script_is_not_rank_0_of_its_ntasks() -> None:
    env = dict(SHELL, SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_NODEID="0",
               SLURM_LOCALID="0", SLURM_JOB_NODELIST="nid[001-002]", SLURM_TASKS_PER_NODE="1(x2)")
    assert discover(env) is None
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)",
               SLURM_STEP_NODELIST="nid[001-002]")
    assert discover(env) == RankInfo(0, 0, 2, 1, 0, "nid001", DEFAULT_MASTER_PORT, "slurm", 2)


# --- MASTER_ADDR / MASTER_PORT ------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_master_addr_from_env_wins(launcher: str) -> None:
    info = discover(rank_env(launcher, 6, MASTER_ADDR="10.1.2.3"))
    assert info is not None and info.master_addr == "10.1.2.3"


@pytest.mark.parametrize(("step_nodelist", "first"), [
    ("nid[001-004,007],login1", "nid001"),
    ("gpu[08-10]", "gpu08"),
    ("nid[003-004]", "nid003"),
    ("login1,nid[001-002]", "login1"),
    ("x3000c0s13b0n0,x3000c0s19b0n0", "x3000c0s13b0n0"),
    ("node[7,9]", "node7"),
])
def test_master_addr_is_first_host_of_the_step(step_nodelist: str, first: str) -> None:
    env = srun_env(5, 1, 1, step_nodelist=step_nodelist, job_nodelist="big[100-199]")
    assert "MASTER_ADDR" not in env
    info = discover(env)
    assert info is not None and info.master_addr == first


def test_master_addr_falls_back_to_job_nodelist_without_step_nodelist() -> None:
    env = srun_env(5, 1, 1, job_nodelist="gpu[08-09]")
    del env["SLURM_STEP_NODELIST"]
    info = discover(env)
    assert info is not None and info.master_addr == "gpu08"


def test_empty_master_addr_counts_as_unset() -> None:
    info = discover(srun_env(5, 1, 1, step_nodelist="gpu[08-09]", MASTER_ADDR=""))
    assert info is not None and info.master_addr == "gpu08"


@pytest.mark.parametrize("env", [
    pytest.param(openmpi_env(1, world=4, per_node=4), id="openmpi"),
    pytest.param(pals_env(1, world=4, per_node=4), id="pmi"),
    pytest.param(pals_env(1, world=4, per_node=4, pmi_local=False), id="pals-local"),
    pytest.param(torchrun_env(1, world=4, per_node=4, addr=None), id="torchrun"),
])
def test_one_node_without_master_addr_uses_loopback(env: dict[str, str]) -> None:
    info = discover(env)
    assert info is not None and info.master_addr == "127.0.0.1"


def _without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


@pytest.mark.parametrize("env", [
    pytest.param(openmpi_env(5), id="openmpi"),
    pytest.param(_without(pals_env(5), "PBS_NODEFILE"), id="pmi"),
    pytest.param(_without(pals_env(5, pmi_local=False), "PBS_NODEFILE"), id="pals-local"),
    pytest.param(torchrun_env(5, addr=None), id="torchrun"),
])
def test_several_nodes_without_master_addr_is_an_error_naming_it(env: dict[str, str]) -> None:
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR"):
        discover(env)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize(("port", "expected"), [(None, DEFAULT_MASTER_PORT), ("", DEFAULT_MASTER_PORT),
                                                ("12345", 12345)])
def test_master_port_default_and_override(launcher: str, port: str | None, expected: int) -> None:
    env = rank_env(launcher, 2)
    env.pop("MASTER_PORT", None)
    if port is not None:
        env["MASTER_PORT"] = port
    info = discover(env)
    assert info is not None and info.master_port == expected
    assert DEFAULT_MASTER_PORT == 29500


# --- expand_nodelist ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("a,b", ["a", "b"]),
    ("nid001", ["nid001"]),
    ("x3000c0s13b0n0", ["x3000c0s13b0n0"]),
    ("nid[001-003]", ["nid001", "nid002", "nid003"]),
    ("nid[001-004,007],login1", ["nid001", "nid002", "nid003", "nid004", "nid007", "login1"]),
    ("login1,nid[001-002]", ["login1", "nid001", "nid002"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("node[7]", ["node7"]),
    ("node[1,3,5]", ["node1", "node3", "node5"]),
    ("a[1-2],b[01-02],c", ["a1", "a2", "b01", "b02", "c"]),
    ("gpu-a100-[1-2],cpu-1", ["gpu-a100-1", "gpu-a100-2", "cpu-1"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


# --- heterogeneous Slurm steps ------------------------------------------------------------------------------


@pytest.mark.parametrize(("procid", "localid", "nodeid", "local_world"), [
    (0, 0, 0, 2), (1, 1, 0, 2), (2, 0, 1, 2), (3, 1, 1, 2), (4, 0, 2, 1),
])
def test_heterogeneous_tasks_per_node(procid: int, localid: int, nodeid: int, local_world: int) -> None:
    env = srun_env(procid, localid, nodeid, ntasks=5, nodes=3, tasks_per_node="2(x2),1",
                   step_nodelist="nid[001-003]")
    assert discover(env) == RankInfo(procid, localid, 5, local_world, nodeid, "nid001", DEFAULT_MASTER_PORT,
                                     "slurm", 3)


@pytest.mark.parametrize(("spec", "nodeid", "local_world"), [
    ("3,1(x2)", 0, 3), ("3,1(x2)", 1, 1), ("3,1(x2)", 2, 1), ("1,4(x2),2", 2, 4), ("1,4(x2),2", 3, 2),
])
def test_tasks_per_node_spec_forms(spec: str, nodeid: int, local_world: int) -> None:
    info = discover(srun_env(0, 0, nodeid, ntasks=9, nodes=4, tasks_per_node=spec, step_nodelist="n[1-4]"))
    assert info is not None and info.local_world_size == local_world and info.node_rank == nodeid


def test_node_outside_tasks_per_node_is_an_error() -> None:
    env = srun_env(4, 0, 3, ntasks=5, nodes=3, tasks_per_node="2(x2),1", step_nodelist="nid[001-003]")
    with pytest.raises(LaunchEnvError, match=r"SLURM_STEP_TASKS_PER_NODE=2\(x2\),1.*node 3"):
        discover(env)


@pytest.mark.parametrize("procid,localid,nodeid", [(0, 0, 0), (4, 0, 2)])
def test_num_nodes_of_a_heterogeneous_step(procid: int, localid: int, nodeid: int) -> None:
    env = srun_env(procid, localid, nodeid, ntasks=5, nodes=3, tasks_per_node="2(x2),1",
                   step_nodelist="nid[001-003]")
    info = discover(env)
    assert info is not None and info.num_nodes == 3


def test_pals_node_rank_of_a_heterogeneous_layout() -> None:
    # mpiexec -n 5 on 3 nodes with 2, 2 and 1 ranks: rank 4 is alone on node 2.
    env = pals_env(4, world=5, per_node=1, PALS_NODEID="2", PMI_LOCAL_RANK="0", PALS_LOCAL_RANKID="0",
                   MASTER_ADDR="x3000c0s13b0n0")
    info = discover(env)
    assert info is not None and info.node_rank == 2


# --- inconsistent environments ------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("rank", [8, 9, -1])
def test_rank_outside_world_is_an_error(launcher: str, rank: int) -> None:
    env = rank_env(launcher, 5)
    name = {"torchrun": "RANK", "slurm": "SLURM_PROCID",
            "openmpi": "OMPI_COMM_WORLD_RANK"}.get(launcher, "PMI_RANK")
    env[name] = str(rank)
    with pytest.raises(LaunchEnvError, match=rf"rank {rank} is outside world size 8"):
        discover(env)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("local_rank", [4, 7])
def test_local_rank_outside_node_is_an_error(launcher: str, local_rank: int) -> None:
    env = rank_env(launcher, 5)
    name = {"torchrun": "LOCAL_RANK", "slurm": "SLURM_LOCALID", "openmpi": "OMPI_COMM_WORLD_LOCAL_RANK",
            "pmi": "PMI_LOCAL_RANK", "pals-local": "PALS_LOCAL_RANKID"}[launcher]
    env[name] = str(local_rank)
    with pytest.raises(LaunchEnvError, match=rf"local rank {local_rank} is outside the 4 ranks of its node"):
        discover(env)


def test_local_rank_beyond_a_small_heterogeneous_node_is_an_error() -> None:
    env = srun_env(4, 1, 2, ntasks=5, nodes=3, tasks_per_node="2(x2),1", step_nodelist="nid[001-003]")
    with pytest.raises(LaunchEnvError, match="local rank 1 is outside the 1 ranks"):
        discover(env)


@pytest.mark.parametrize(("env", "missing"), [
    pytest.param({k: v for k, v in openmpi_env(5, MASTER_ADDR="nid001").items()
                  if k != "OMPI_COMM_WORLD_LOCAL_SIZE"}, "OMPI_COMM_WORLD_LOCAL_SIZE",
                 id="openmpi-local-size"),
    pytest.param({k: v for k, v in openmpi_env(5, MASTER_ADDR="nid001").items()
                  if k != "OMPI_COMM_WORLD_LOCAL_RANK"}, "OMPI_COMM_WORLD_LOCAL_RANK",
                 id="openmpi-local-rank"),
    pytest.param({k: v for k, v in openmpi_env(5, MASTER_ADDR="nid001").items()
                  if k != "OMPI_COMM_WORLD_SIZE"}, "OMPI_COMM_WORLD_SIZE", id="openmpi-size"),
    pytest.param({k: v for k, v in pals_env(5, MASTER_ADDR="nid001").items()
                  if k not in ("PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE")}, "PMI_LOCAL_SIZE",
                 id="pmi-local-size"),
    pytest.param({k: v for k, v in pals_env(5, MASTER_ADDR="nid001").items()
                  if k not in ("PMI_LOCAL_RANK", "PALS_LOCAL_RANKID")}, "PMI_LOCAL_RANK",
                 id="pmi-local-rank"),
    pytest.param({k: v for k, v in pals_env(5, MASTER_ADDR="nid001").items()
                  if k != "PMI_SIZE"}, "PMI_SIZE", id="pmi-size"),
])
def test_mpi_env_missing_a_variable_is_an_error_naming_it(env: dict[str, str], missing: str) -> None:
    with pytest.raises(LaunchEnvError, match=rf"without .*{missing}.*cannot place this rank"):
        discover(env)


def test_pals_local_variables_stand_in_for_pmi_ones() -> None:
    env = pals_env(6, pmi_local=False, MASTER_ADDR="x3000c0s13b0n0")
    assert "PMI_LOCAL_RANK" not in env and "PMI_LOCAL_SIZE" not in env
    assert discover(env) == RankInfo(6, 2, 8, 4, 1, "x3000c0s13b0n0", DEFAULT_MASTER_PORT, "pmi", 2)


# --- export ------------------------------------------------------------------------------------------------


ROUND_TRIP = {
    **{launcher: rank_env(launcher, 6) for launcher in LAUNCHERS},
    "slurm-heterogeneous": srun_env(4, 0, 2, ntasks=5, nodes=3, tasks_per_node="2(x2),1",
                                    step_nodelist="gpu[08-10]", MASTER_PORT="29611"),
    "openmpi-one-node": openmpi_env(2, world=4, per_node=4),
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_export_writes_torchrun_variables(name: str) -> None:
    info = discover(ROUND_TRIP[name])
    assert info is not None
    out = {"UNRELATED": "kept"}
    export(info, out)
    assert out == {"UNRELATED": "kept", "RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank),
                   "WORLD_SIZE": str(info.world_size), "LOCAL_WORLD_SIZE": str(info.local_world_size),
                   "GROUP_RANK": str(info.node_rank), "MASTER_ADDR": info.master_addr,
                   "MASTER_PORT": str(info.master_port), "NNODES": str(info.num_nodes)}
    assert all(isinstance(v, str) for v in out.values())


@pytest.mark.parametrize("name", ROUND_TRIP)
@pytest.mark.parametrize("into", ["fresh", "launcher-env"])
def test_export_round_trips_through_discover(name: str, into: str) -> None:
    original = ROUND_TRIP[name]
    info = discover(original)
    assert info is not None
    # The runner exports into os.environ, i.e. on top of the launcher's own variables.
    out = {} if into == "fresh" else dict(original)
    export(info, out)
    again = discover(out)
    assert again is not None
    assert again.launcher == "torchrun"
    assert (again.rank, again.local_rank, again.world_size, again.local_world_size, again.node_rank,
            again.master_addr, again.master_port, again.num_nodes) == (
        info.rank, info.local_rank, info.world_size, info.local_world_size, info.node_rank, info.master_addr,
        info.master_port, info.num_nodes)


def test_export_overwrites_stale_torchrun_variables() -> None:
    info = discover(srun_env(5, 1, 1))
    assert info is not None
    out = torchrun_env(0, world=2, per_node=2, addr="stale-host", port="1")
    export(info, out)
    assert {k: out[k] for k in TORCH_VARS} == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                                               "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                                               "MASTER_ADDR": "nid001", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("nodelist,hosts", [
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_expand_nodelist_keeps_text_after_brackets(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_zero_local_size_is_a_launch_error() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "0"}
    with pytest.raises(LaunchEnvError, match="local size 0"):
        discover(env)


def test_submitit_local_tasks_are_ranks_with_a_port_of_their_job() -> None:
    """submitit's local executor (hydra/launcher=local) sets its own variables and no Slurm ones
    (submitit/local/local.py start_tasks); jobs of one sweep running side by side get different ports."""
    env = {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
           "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_JOB_ID": "4242",
           "SUBMITIT_EXECUTOR": "local", "CUDA_VISIBLE_DEVICES": ""}
    info = discover(env)
    assert info == RankInfo(1, 1, 2, 2, 0, "127.0.0.1", 20000 + 4242, "submitit-local", 1)
    other = discover({**env, "SUBMITIT_LOCAL_JOB_ID": "4243"})
    assert other is not None and other.master_port != info.master_port
    assert discover({**env, "MASTER_PORT": "29555"}).master_port == 29555  # type: ignore[union-attr]
    assert discover({k: v for k, v in env.items() if k != "SUBMITIT_LOCAL_GLOBALID"}) is None
