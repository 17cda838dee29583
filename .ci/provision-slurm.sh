#!/usr/bin/env bash
# A one-node Slurm (plus Open MPI and shellcheck) on this host, for the launcher tests.
# Idempotent: packages already installed are kept, a running munged/slurmctld/slurmd is left alone.
# Needs root and apt-get (Debian); anywhere else it says so and exits 0, and the tests that need
# Slurm or MPI skip (or fail when CI=true). The set-up is the one DESIGN.md records as working here.
# `provision-slurm.sh stop` ends the daemons this script started.
set -euo pipefail

if [[ "${1:-}" == "stop" ]]; then
    for daemon in slurmd slurmctld munged; do
        pid=$(cat "/run/harness-ci-$daemon.pid" 2>/dev/null || true)
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
        fi
        rm -f "/run/harness-ci-$daemon.pid"
    done
    exit 0
fi

if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "provision-slurm: not root on a Debian host with apt-get; skipping Slurm/MPI provisioning" >&2
    exit 0
fi

packages=(slurmctld slurmd slurm-client munge openmpi-bin shellcheck)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

host=$(hostname)
cpus=$(nproc)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=harness-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/harness-ci-slurmctld.pid
SlurmdPidFile=/run/harness-ci-slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF

running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! running /run/harness-ci-munged.pid; then
    su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
    cp /run/munge/munged.pid /run/harness-ci-munged.pid
fi
running /run/harness-ci-slurmctld.pid || slurmctld
running /run/harness-ci-slurmd.pid || slurmd

for _ in $(seq 30); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
    if [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]; then
        echo "provision-slurm: node $host is $state (CPUs=$cpus); Open MPI $(mpiexec --version | head -n1)"
        exit 0
    fi
    if [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update nodename="$host" state=resume || true
    fi
    sleep 1
done
echo "provision-slurm: slurmd did not come up; see /var/log/slurm/" >&2
exit 1
