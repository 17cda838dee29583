"""`discover()` on environments written from each site's documentation, host files included.

Each builder names the page it follows. Host files are real files under tmp_path, read through the
same reader `discover` uses in production; a second test per file format passes an in-memory reader
to show that `discover` reads nothing but the mapping and the files the mapping names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.launchers.env import DEFAULT_MASTER_PORT, LaunchEnvError, RankInfo, discover, read_lines

SHELL = {"PATH": "/usr/bin:/bin", "HOME": "/home/alice", "USER": "alice", "SHELL": "/bin/bash"}


def frontier_srun_env(rank: int) -> dict[str, str]:
    """`srun -N2 -n16 --ntasks-per-node=8 --gpus-per-task=1 --gpu-bind=closest` on Frontier.

    OLCF Frontier User Guide, "Slurm" and "Process and Thread Mapping Examples": Slurm binds one GCD per
    task, so each task sees ROCR_VISIBLE_DEVICES with one entry; node names are `frontier%05d`.
    """
    return dict(SHELL, SLURM_JOB_ID="2093487", SLURM_CLUSTER_NAME="frontier", SLURM_JOB_PARTITION="batch",
                SLURM_JOB_ACCOUNT="abc123", SLURM_JOB_NODELIST="frontier[00001-00002]", SLURM_NNODES="2",
                SLURM_NTASKS="16", SLURM_TASKS_PER_NODE="8(x2)", SLURM_STEP_ID="0",
                SLURM_STEP_NODELIST="frontier[00001-00002]", SLURM_STEP_NUM_NODES="2",
                SLURM_STEP_NUM_TASKS="16", SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(rank % 8), SLURM_NODEID=str(rank // 8),
                SLURMD_NODENAME=f"frontier0000{1 + rank // 8}",
                SLURM_GPUS_PER_TASK="1", ROCR_VISIBLE_DEVICES=str(rank % 8), SLURM_JOB_END_TIME="1795000000")


def perlmutter_srun_env(rank: int) -> dict[str, str]:
    """`srun -N 2 --ntasks-per-node=4 -c 32 --gpus-per-node=4` on Perlmutter (NERSC "Running Jobs", GPU nodes).

    Without `--gpu-bind` every task sees all four GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3); nodes are `nid%06d`.
    """
    return dict(SHELL, SLURM_JOB_ID="33445566", SLURM_CLUSTER_NAME="perlmutter", SLURM_JOB_QOS="regular",
                SLURM_JOB_NODELIST="nid[001004,001008]", SLURM_NNODES="2", SLURM_NTASKS="8",
                SLURM_TASKS_PER_NODE="4(x2)", SLURM_STEP_NODELIST="nid[001004,001008]", SLURM_STEP_NUM_NODES="2",
                SLURM_STEP_NUM_TASKS="8", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(rank % 4), SLURM_NODEID=str(rank // 4), SLURM_CPUS_PER_TASK="32",
                CUDA_VISIBLE_DEVICES="0,1,2,3")


def pals_env(rank: int, per_node: int, nodes: int, nodefile: str, system: str) -> dict[str, str]:
    """PALS `mpiexec -n N --ppn P --depth D --cpu-bind depth` in a PBS job.

    ALCF "Running Jobs on Polaris" / "Running Jobs on Aurora": PBS sets PBS_NODEFILE (one line per node,
    the mother-superior node first); PALS sets PMI_RANK/PMI_SIZE/PMI_LOCAL_RANK/PMI_LOCAL_SIZE and
    PALS_RANKID/PALS_NODEID/PALS_LOCAL_RANKID. No MASTER_ADDR.
    """
    world = per_node * nodes
    return dict(SHELL, PBS_JOBID=f"4242.{system}-pbs-01.hsn.cm.{system}.alcf.anl.gov", PBS_NODEFILE=nodefile,
                PBS_O_WORKDIR="/home/alice/bench", PBS_QUEUE="debug", PMI_RANK=str(rank), PMI_SIZE=str(world),
                PMI_LOCAL_RANK=str(rank % per_node), PMI_LOCAL_SIZE=str(per_node), PALS_RANKID=str(rank),
                PALS_NODEID=str(rank // per_node), PALS_LOCAL_RANKID=str(rank % per_node),
                PALS_APID="0b4a2d8e-1c5f")


def summit_jsrun_env(rank: int, hostfile: str) -> dict[str, str]:
    """`jsrun -n 12 -r 6 -a 1 -c 7 -g 1` (2 nodes, 6 resource sets of one task and one GPU each) on Summit.

    OLCF Summit User Guide, "Job Launcher (jsrun)": JSM sets JSM_NAMESPACE_*, Spectrum MPI sets
    OMPI_COMM_WORLD_*; LSB_DJOB_HOSTFILE lists the launch (batch) node first, then each compute node
    once per slot. Summit was retired in November 2024.
    """
    return dict(SHELL, LSB_JOBID="1234567", LSB_DJOB_HOSTFILE=hostfile, LSB_HOSTS="batch3 a01n01 a01n02",
                JSM_NAMESPACE_RANK=str(rank), JSM_NAMESPACE_SIZE="12", JSM_NAMESPACE_LOCAL_RANK=str(rank % 6),
                JSM_NAMESPACE_LOCAL_SIZE="6", OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="12",
                OMPI_COMM_WORLD_LOCAL_RANK=str(rank % 6), OMPI_COMM_WORLD_LOCAL_SIZE="6",
                PMIX_RANK=str(rank), CUDA_VISIBLE_DEVICES="0")


def mpich_hydra_env(rank: int) -> dict[str, str]:
    """`mpiexec -n 4 -ppn 2 -hosts n1,n2` with MPICH's Hydra (MPICH "Using the Hydra Process Manager").

    Hydra sets PMI_RANK, PMI_SIZE, PMI_FD and the local place as MPI_LOCALRANKID/MPI_LOCALNRANKS.
    """
    return dict(SHELL, PMI_RANK=str(rank), PMI_SIZE="4", PMI_FD="6", MPI_LOCALRANKID=str(rank % 2),
                MPI_LOCALNRANKS="2", MASTER_ADDR="n1")


@pytest.fixture
def polaris_nodefile(tmp_path: Path) -> str:
    path = tmp_path / "4242.polaris-pbs-01"
    path.write_text("x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov\nx3006c0s19b1n0.hsn.cm.polaris.alcf.anl.gov\n")
    return str(path)


@pytest.fixture
def aurora_nodefile(tmp_path: Path) -> str:
    path = tmp_path / "4242.aurora-pbs-01"
    path.write_text("x4102c5s2b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov\n"
                    "x4102c5s3b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov\n")
    return str(path)


@pytest.fixture
def summit_hostfile(tmp_path: Path) -> str:
    path = tmp_path / "1234567.hostfile"
    path.write_text("batch3\n" + "a01n01\n" * 42 + "a01n02\n" * 42)
    return str(path)


@pytest.mark.parametrize("rank", [0, 7, 8, 15])
def test_frontier_srun(rank: int) -> None:
    assert discover(frontier_srun_env(rank)) == RankInfo(rank, rank % 8, 16, 8, rank // 8, "frontier00001",
                                                         DEFAULT_MASTER_PORT, "slurm", 2)


@pytest.mark.parametrize("rank", [0, 3, 4, 7])
def test_perlmutter_srun(rank: int) -> None:
    assert discover(perlmutter_srun_env(rank)) == RankInfo(rank, rank % 4, 8, 4, rank // 4, "nid001004",
                                                           DEFAULT_MASTER_PORT, "slurm", 2)


@pytest.mark.parametrize("rank", [0, 3, 4, 7])
def test_polaris_pals_master_from_pbs_nodefile(rank: int, polaris_nodefile: str) -> None:
    info = discover(pals_env(rank, 4, 2, polaris_nodefile, "polaris"))
    assert info == RankInfo(rank, rank % 4, 8, 4, rank // 4, "x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov",
                            DEFAULT_MASTER_PORT, "pmi", 2)


@pytest.mark.parametrize("rank", [0, 11, 12, 23])
def test_aurora_pals_twelve_tiles_per_node(rank: int, aurora_nodefile: str) -> None:
    info = discover(pals_env(rank, 12, 2, aurora_nodefile, "aurora"))
    assert info == RankInfo(rank, rank % 12, 24, 12, rank // 12,
                            "x4102c5s2b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", DEFAULT_MASTER_PORT, "pmi", 2)


@pytest.mark.parametrize("rank", [0, 5, 6, 11])
def test_summit_jsrun_skips_the_batch_node(rank: int, summit_hostfile: str) -> None:
    info = discover(summit_jsrun_env(rank, summit_hostfile))
    assert info == RankInfo(rank, rank % 6, 12, 6, rank // 6, "a01n01", DEFAULT_MASTER_PORT, "jsrun", 2)


def test_jsrun_hostfile_login_hosts_are_skipped_too(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("login2\nbatch1\nh41n07\nh41n08\n")
    info = discover(summit_jsrun_env(7, str(hostfile)))
    assert info is not None and info.master_addr == "h41n07"


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_mpich_hydra(rank: int) -> None:
    assert discover(mpich_hydra_env(rank)) == RankInfo(rank, rank % 2, 4, 2, rank // 2, "n1",
                                                       DEFAULT_MASTER_PORT, "pmi", 2)


def test_mpirun_inside_a_two_node_sbatch_takes_master_from_the_job_nodelist() -> None:
    env = dict(SHELL, SLURM_JOB_ID="9", SLURM_PROCID="0", SLURM_JOB_NODELIST="gpu[17-18]",
               OMPI_COMM_WORLD_RANK="5", OMPI_COMM_WORLD_LOCAL_RANK="1", OMPI_COMM_WORLD_SIZE="8",
               OMPI_COMM_WORLD_LOCAL_SIZE="4")
    assert discover(env) == RankInfo(5, 1, 8, 4, 1, "gpu17", DEFAULT_MASTER_PORT, "openmpi", 2)


def test_host_files_are_read_only_through_the_reader(polaris_nodefile: str) -> None:
    asked: list[str] = []

    def reader(path: str) -> list[str]:
        asked.append(path)
        return ["fake-host-a", "fake-host-b"]

    info = discover(pals_env(5, 4, 2, "/nowhere/nodefile", "polaris"), reader)
    assert info is not None and info.master_addr == "fake-host-a" and asked == ["/nowhere/nodefile"]
    assert read_lines(polaris_nodefile)[1].startswith("x3006c0s19b1n0")


def test_one_node_never_reads_a_host_file() -> None:
    def reader(path: str) -> list[str]:
        raise AssertionError(f"read {path}")

    info = discover(pals_env(2, 4, 1, "/nowhere/nodefile", "polaris"), reader)
    assert info is not None and info.master_addr == "127.0.0.1"


def test_missing_pbs_nodefile_is_an_error_naming_it() -> None:
    with pytest.raises(LaunchEnvError, match="cannot read host file /nowhere/4242.polaris-pbs-01"):
        discover(pals_env(5, 4, 2, "/nowhere/4242.polaris-pbs-01", "polaris"))


def test_hostfile_with_only_the_batch_node_cannot_place_the_master(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("batch3\n")
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR.*LSB_DJOB_HOSTFILE"):
        discover(summit_jsrun_env(7, str(hostfile)))


@pytest.mark.parametrize(("env", "message"), [
    pytest.param(dict(frontier_srun_env(3), SLURM_PROCID="16"), "slurm: rank 16 is outside world size 16",
                 id="frontier-rank"),
    pytest.param(dict(mpich_hydra_env(1), PMI_RANK="4"), "pmi: rank 4 is outside world size 4", id="hydra-rank"),
    pytest.param({k: v for k, v in mpich_hydra_env(1).items() if k != "MPI_LOCALNRANKS"},
                 "pmi launch without PMI_LOCAL_SIZE|PALS_LOCAL_SIZE|MPI_LOCALNRANKS", id="hydra-local-size"),
    pytest.param({k: v for k, v in summit_jsrun_env(1, "/x").items() if k != "JSM_NAMESPACE_SIZE"},
                 "jsrun launch without JSM_NAMESPACE_SIZE", id="jsrun-size"),
])
def test_inconsistent_site_environments_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchEnvError, match=message.replace("|", r"\|")):
        discover(env)
