#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine (munged + slurmctld + slurmd), for CI and for trying the sbatch
# scripts on a laptop or a CPU box. Everything lives in one state folder.
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
#
# SLURM_LOCAL_NODES=N (N > 1) builds N nodes instead of one, each a slurmd in its own network namespace:
#   - a bridge <tag>br in this namespace, address <subnet>.1 (slurmctld listens there: SlurmctldAddr);
#   - node i: namespace <tag>n<i>, a veth pair (<tag>v<i> on the bridge, eth0 inside) with address
#     <subnet>.(10+i), its own hostname pzn<i> (`unshare --uts`), and /etc/netns/<tag>n<i>/hosts bind-mounted
#     over /etc/hosts in a private mount namespace (`unshare --mount`, the ip-netns convention): the node names
#     resolve on every node and /etc/hosts itself is never touched. slurm.conf gives each node
#     NodeAddr=<its address>.
# So srun, torchrun's c10d rendezvous, gloo and HTTP between "nodes" cross a real network path between distinct
# addresses and hostnames, as on a cluster, while the filesystem stays shared (OUTPUT_DIR is seen by every node).
# Needs root and `ip netns`. <tag> (SLURM_LOCAL_TAG, default random) and <subnet> (SLURM_LOCAL_SUBNET, three
# octets, default the first free 10.213.X) are recorded in DIR/netns.env; `stop` kills what is left in each
# namespace (`ip netns pids`), then removes the namespaces, links and /etc/netns folders it created.
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

stop_netns() {  # remove what DIR/netns.env records (each step tolerates a half-built cluster)
  [ -f "$DIR/netns.env" ] || return 0
  local TAG NODES i ns pid
  # shellcheck disable=SC1091
  source "$DIR/netns.env"
  for i in $(seq 1 "$NODES"); do
    ns=${TAG}n$i
    if ip netns list | grep -qw "^$ns"; then
      # Job processes a dead slurmd left behind (only this namespace's, by pid).
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
      for _ in $(seq 1 20); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.5; done
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "${TAG}v$i" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  ip link del "${TAG}br" 2>/dev/null || true
  rmdir /etc/netns 2>/dev/null || true   # only when empty
  rm -f "$DIR/netns.env"
}

if [ "$cmd" = stop ]; then
  # Order matters: slurmd first (it hands back running steps), then the controller, then munge.
  for f in "$DIR"/slurmd*.pid; do stop_pidfile "$f"; done
  stop_netns
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
# The CPUs this process may use; not plain `nproc`, which answers OMP_NUM_THREADS when that is set (=1 in the test
# runs here), and a node with fewer CPUs than a job's --cpus-per-task leaves it pending forever.
CPUS=${SLURM_LOCAL_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
# Advertise 90% of physical memory (MB): slurmd refuses to register a node that claims more than it has.
MEM_MB=${SLURM_LOCAL_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10240 ))}
NODES=${SLURM_LOCAL_NODES:-1}
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "slurm_local.sh: SLURM_LOCAL_NODES must be 1..99, got '$NODES'" >&2; exit 2; }
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chmod 700 "$DIR/munge"

# munge: a private key and socket, so this cluster never talks to (or needs) a system munged.
[ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
  || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed"

CTLD_ADDR=""
NODE_LINES="NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
PARTITION_NODES=localhost
if [ "$NODES" -gt 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: SLURM_LOCAL_NODES=$NODES needs root (network namespaces)" >&2; exit 3; }
  ip netns list >/dev/null 2>&1 || { echo "slurm_local.sh: 'ip netns' is unavailable" >&2; exit 3; }
  TAG=${SLURM_LOCAL_TAG:-pz$(od -An -N2 -tx2 /dev/urandom | tr -d ' ')}
  [[ "$TAG" =~ ^[a-z][a-z0-9]{1,9}$ ]] || { echo "slurm_local.sh: SLURM_LOCAL_TAG must be 2-10 of [a-z0-9], got '$TAG'" >&2; exit 2; }
  SUBNET=${SLURM_LOCAL_SUBNET:-}
  if [ -z "$SUBNET" ]; then   # the first 10.213.X.0/24 no interface or route of this machine uses
    for x in $(seq 1 250); do
      if ! ip -4 addr | grep -q "inet 10\.213\.$x\." && ! ip -4 route | grep -q "^10\.213\.$x\."; then
        SUBNET=10.213.$x; break
      fi
    done
  fi
  [ -n "$SUBNET" ] || { echo "slurm_local.sh: no free 10.213.X.0/24; set SLURM_LOCAL_SUBNET" >&2; exit 3; }
  # Never adopt what someone else made: `stop` deletes everything named after the tag.
  if ip netns list | grep -q "^$TAG" || ip -br link | grep -q "^$TAG"; then
    echo "slurm_local.sh: namespaces or links named $TAG* exist already; pick another SLURM_LOCAL_TAG" >&2; exit 3
  fi
  printf 'TAG=%s\nNODES=%s\nSUBNET=%s\n' "$TAG" "$NODES" "$SUBNET" > "$DIR/netns.env"
  BR=${TAG}br
  ip link add "$BR" type bridge
  ip addr add "$SUBNET.1/24" dev "$BR"
  ip link set "$BR" up
  HOSTS="127.0.0.1 localhost"$'\n'"$SUBNET.1 pzctl"
  for i in $(seq 1 "$NODES"); do HOSTS+=$'\n'"$SUBNET.$(( 10 + i )) pzn$i"; done
  NODE_LINES=""
  for i in $(seq 1 "$NODES"); do
    ns=${TAG}n$i
    ip netns add "$ns"
    ip link add "${TAG}v$i" type veth peer name "${TAG}p$i"
    ip link set "${TAG}v$i" master "$BR" up
    ip link set "${TAG}p$i" netns "$ns"
    ip -n "$ns" link set "${TAG}p$i" name eth0
    ip -n "$ns" addr add "$SUBNET.$(( 10 + i ))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns"
    echo "$HOSTS" > "/etc/netns/$ns/hosts"
    NODE_LINES+="NodeName=pzn$i NodeAddr=$SUBNET.$(( 10 + i )) CPUs=$CPUS RealMemory=$(( MEM_MB / NODES )) State=UNKNOWN"$'\n'
  done
  CTLD_ADDR="SlurmctldAddr=$SUBNET.1"
  PARTITION_NODES="pzn[1-$NODES]"
fi

cat > "$CONF" <<EOF
# Written by tools/slurm_local.sh: $NODES node(s) on this machine, one partition.
ClusterName=pzlocal
SlurmctldHost=localhost
$CTLD_ADDR
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool$( [ "$NODES" -gt 1 ] && echo "/%n")
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd$( [ "$NODES" -gt 1 ] && echo "-%n").pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd$( [ "$NODES" -gt 1 ] && echo "-%n").log
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
$NODE_LINES
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF

export SLURM_CONF=$CONF
# -c / -i: start from a clean state (no jobs from an earlier cluster in this folder).
slurmctld -c -i -f "$CONF"
if [ "$NODES" -gt 1 ]; then
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$DIR/spool/pzn$i"
    # Its own network namespace, hostname and /etc/hosts (a bind mount in a private mount namespace); slurmd
    # daemonizes and its jobs inherit all three. Not `ip netns exec`: it remounts /sys, hiding the cgroup
    # mounts slurmd reads at start-up.
    # shellcheck disable=SC2016  # expanded by the inner sh
    nsenter --net="/run/netns/${TAG}n$i" unshare --mount --uts sh -c \
      'mount --bind "$3" /etc/hosts && hostname "$1" && exec slurmd -N "$1" -f "$2"' \
      sh "pzn$i" "$CONF" "/etc/netns/${TAG}n$i/hosts"
  done
else
  slurmd -N localhost -f "$CONF"
fi

# Wait until every node accepts jobs.
for _ in $(seq 1 60); do
  states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
  up=$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)$' || true)
  if [ "$up" = "$NODES" ]; then echo "slurm_local.sh: cluster up ($DIR, $NODES node(s) $states)"; exit 0; fi
  sleep 1
done
echo "slurm_local.sh: nodes did not become idle; last states '${states:-?}'. Logs: $DIR/slurmctld.log $DIR/slurmd*.log" >&2
tail -n 20 "$DIR/slurmctld.log" "$DIR"/slurmd*.log >&2 || true
exit 1
