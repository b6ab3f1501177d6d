#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on localhost (munged + slurmctld + slurmd), for CI and for trying the
# sbatch scripts on a laptop or a CPU box. Everything lives in one state folder; nothing under /etc changes.
#
#   bash tools/slurm_local.sh install            # apt-get install slurm-wlm munge (root; no-op when present)
#   bash tools/slurm_local.sh start DIR          # write DIR/slurm.conf, start the daemons, wait for the node
#   source DIR/env.sh                            # SLURM_CONF for sbatch/squeue/scontrol/scancel
#   sbatch slurm/smoke.sbatch
#   bash tools/slurm_local.sh stop DIR           # stop exactly the daemons started above, by their pid files
#
# The daemons run as root (SlurmUser=root) with process tracking by parent pid (proctrack/linuxproc) and no
# cgroups, so they work inside containers. Jobs see this machine's CPUs and memory, with job completion
# recorded in DIR/jobcomp.log. Stopping never looks processes up by name: only the pids in DIR/*.pid.
set -euo pipefail

usage() { echo "usage: $0 install | start DIR | stop DIR | status DIR" >&2; exit 2; }

cmd=${1:-}
case "$cmd" in
  install)
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
      exit 0
    fi
    if ! command -v apt-get >/dev/null; then
      echo "slurm_local.sh: slurm/munge missing and apt-get unavailable" >&2; exit 3
    fi
    if [ "$(id -u)" != 0 ]; then
      echo "slurm_local.sh: slurm/munge missing; installing them needs root" >&2; exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
    exit 0 ;;
  start|stop|status) [ $# -ge 2 ] || usage ;;
  *) usage ;;
esac

DIR=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$DIR/slurm.conf

stop_pidfile() {  # stop_pidfile FILE: SIGTERM the pid in FILE, wait up to 20 s, then SIGKILL
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

if [ "$cmd" = stop ]; then
  # Order matters: slurmd first (it hands back running steps), then the controller, then munge.
  stop_pidfile "$DIR/slurmd.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  stop_pidfile "$DIR/munged.pid"
  exit 0
fi

if [ "$cmd" = status ]; then
  SLURM_CONF=$CONF sinfo -h -o '%n %T %c %m' 2>&1
  exit 0
fi

# ------------------------------------------------------------------------------------------------ start
for b in munged mungekey slurmctld slurmd sbatch; do
  command -v "$b" >/dev/null || { echo "slurm_local.sh: $b not found; run: $0 install" >&2; exit 3; }
done
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
# Advertise 90% of physical memory (MB): slurmd refuses to register a node that claims more than it has.
MEM_MB=${SLURM_LOCAL_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10240 ))}
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chmod 700 "$DIR/munge"

# munge: a private key and socket, so this cluster never talks to (or needs) a system munged.
[ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
  || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed"

cat > "$CONF" <<EOF
# Written by tools/slurm_local.sh: one node (this machine), one partition.
ClusterName=pzlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol for 10 minutes (tests read their final state).
MinJobAge=600
# Seconds between the time limit's SIGTERM and SIGKILL.
KillWait=30
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF

export SLURM_CONF=$CONF
# -c / -i: start from a clean state (no jobs from an earlier cluster in this folder).
slurmctld -c -i -f "$CONF"
slurmd -N localhost -f "$CONF"

# Wait until the node accepts jobs.
for _ in $(seq 1 60); do
  state=$(sinfo -h -n localhost -o '%T' 2>/dev/null || true)
  case "$state" in idle|mixed|allocated) echo "slurm_local.sh: cluster up ($DIR, node $state)"; exit 0 ;; esac
  sleep 1
done
echo "slurm_local.sh: node did not become idle; last state '${state:-?}'. Logs: $DIR/slurmctld.log $DIR/slurmd.log" >&2
tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
exit 1
