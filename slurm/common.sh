# Sourced by slurm/*.sbatch: defaults, network settings, container flags, signal forwarding, pre-flight check.
# shellcheck shell=bash disable=SC2016,SC2034  # single-quoted snippets run in the steps; arrays are used by the sbatch files
#
# Every setting is `${VAR:-default}`: export VAR before `sbatch` (sbatch passes the environment) to change it.
# Slurm copies the batch script to a spool folder, so scripts find the repository through PZ_ROOT (default: the
# folder sbatch was called from). Submit from the repository root.

PZ_ROOT=${PZ_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$PZ_ROOT" || exit 2
PYTHON=${PYTHON:-python3}                     # the interpreter with megatron_pz installed (inside the container, if any)
OUTPUT_DIR=${OUTPUT_DIR:-$PZ_ROOT/runs/${SLURM_JOB_NAME:-pz}-${SLURM_JOB_ID:-local}}   # checkpoints, metrics, logs;
                                              # stable across requeues (same job id), so a requeued job resumes
LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}          # per-job logs of the steps (rollout launchers, servers, router)
PREFLIGHT=${PREFLIGHT:-1}                     # 1: `megatron-pz plan` must pass before launching; warn: print only; 0: skip
PREFLIGHT_ARGS=${PREFLIGHT_ARGS:-}            # e.g. "--model qwen3-4b --memory-gib 80" (see `megatron-pz plan -h`)
REQUEUE=${REQUEUE:-1}                         # 1: after a time-limit stop (SIGUSR1) the job requeues itself and resumes
MAX_RESTARTS=${MAX_RESTARTS:-20}              # ... at most this many times (SLURM_RESTART_COUNT)
mkdir -p "$OUTPUT_DIR" "$LOG_DIR"

# ------------------------------------------------------------------------------------------- container (pyxis/enroot)
# Set CONTAINER_IMAGE to run every srun step of these scripts inside it (NGC PyTorch images carry CUDA, NCCL,
# Transformer Engine and apex; install megatron_pz into the mounted checkout with `pip install -e .`).
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}          # e.g. nvcr.io#nvidia/pytorch:25.01-py3, or /shared/images/pz.sqsh
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$PZ_ROOT:$PZ_ROOT}   # SRC:DST[,SRC:DST...]: add data, checkpoints, HF cache
CONTAINER_WORKDIR=${CONTAINER_WORKDIR:-$PZ_ROOT}
SRUN_CONTAINER_ARGS=()
if [ -n "$CONTAINER_IMAGE" ]; then
  SRUN_CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS"
                       --container-workdir="$CONTAINER_WORKDIR")
fi

# ------------------------------------------------------------------------------------------- network / NCCL
# Interface selection is the usual cause of a silent hang at start-up: NCCL's bootstrap and gloo pick an
# interface on their own, and on nodes with several (ib0, eth0, docker0, a management NIC) the first one they
# find may not route between nodes. NET_IF names the one to use for both; empty = let them choose.
NET_IF=${NET_IF:-}
if [ -n "$NET_IF" ]; then
  export NCCL_SOCKET_IFNAME=$NET_IF           # NCCL bootstrap (and socket transport when there is no IB)
  export GLOO_SOCKET_IFNAME=$NET_IF           # gloo groups (torch.distributed CPU-side collectives, the CPU path)
fi
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}         # INFO prints the interface, transport (IB/NVLink/socket) and rings chosen
if [ -n "${NCCL_IB_HCA:-}" ]; then
  export NCCL_IB_HCA                          # which InfiniBand HCAs/ports NCCL may use (e.g. mlx5_0,mlx5_1); unset = all
fi
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22} # IB retransmission timeout exponent (4.096 us x 2^22 ~ 17 s): survives
                                              # transient fabric congestion on large jobs instead of failing the step
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}   # a failed/timed-out collective
                                              # aborts the process, so the job fails instead of hanging until its limit
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # one hardware queue: Megatron relies on
                                              # kernel launch order to overlap TP/SP communication with compute
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}   # CPU threads per process
export PYTHONUNBUFFERED=1                     # log lines reach the job's .out file as they happen

# ------------------------------------------------------------------------------------------- helpers
pz_log() { echo "[pz $(date +%H:%M:%S)] $*"; }

pz_banner() {
  pz_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}"
  pz_log "config ${CONFIG:-?}  output ${OUTPUT_DIR}  container ${CONTAINER_IMAGE:-none}"
  pz_log "NET_IF=${NET_IF:-auto} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-auto} NCCL_DEBUG=$NCCL_DEBUG"
}

# pz_srun ARGS... : srun with the container flags (empty without CONTAINER_IMAGE).
pz_srun() { srun "${SRUN_CONTAINER_ARGS[@]}" "$@"; }

# pz_preflight WORLD_SIZE [overrides...]: `megatron-pz plan` on one node (seconds, CPU, no process group):
# divisibility, lengths, Megatron's config and process-group layout, memory per GPU. Fails the job before any
# GPU time is spent, unless PREFLIGHT=warn or 0.
pz_preflight() {
  local world=$1; shift
  [ "$PREFLIGHT" = 0 ] && return 0
  local args
  read -r -a args <<< "$PREFLIGHT_ARGS"
  if pz_srun --nodes=1 --ntasks=1 --overlap --output="$LOG_DIR/preflight.log" \
      "$PYTHON" -m megatron_pz.cli plan --config "$CONFIG" --world-size "$world" "${args[@]}" "$@"; then
    pz_log "pre-flight OK ($LOG_DIR/preflight.log)"
  else
    cat "$LOG_DIR/preflight.log" >&2 || true
    if [ "$PREFLIGHT" = warn ]; then pz_log "pre-flight FAILED; continuing (PREFLIGHT=warn)"; return 0; fi
    pz_log "pre-flight FAILED: not launching (PREFLIGHT=warn to launch anyway, 0 to skip)"
    return 1
  fi
}

# Stopping before the time limit. `#SBATCH --signal=B:USR1@T` sends SIGUSR1 to this batch shell T seconds before
# the limit; pz_srun_forwarding passes it on to the trainer ranks *only*, and each rank checkpoints after its
# current step and exits. Only the ranks: `kill` on srun would deliver the signal to every process of the step
# (torchrun, the embedded rollout server, Megatron's checkpoint writer processes), and those die of SIGUSR1's
# default action. So each node's trainer records its pid on start (PZ_TRAINER_WRAP), and a one-task-per-node
# `srun --overlap` signals exactly those pids (or, under torchrun, exactly its child processes: the ranks).
PZ_PID_DIR=${PZ_PID_DIR:-$OUTPUT_DIR/.pids/${SLURM_JOB_ID:-local}-${SLURM_RESTART_COUNT:-0}}
export PZ_PID_DIR
# The trainer launch prefix. PZ_SIGNAL_TARGET: "self" (the command is the trainer) or "children" (torchrun: its
# children are the ranks). It also ignores SIGUSR1 in what the ranks do not replace with their own handler
# (torchrun, the embedded server), as a second line of defence.
PZ_TRAINER_WRAP=(bash -c 'mkdir -p "$PZ_PID_DIR" && echo "$$ ${PZ_SIGNAL_TARGET:-self}" > "$PZ_PID_DIR/${SLURMD_NODENAME:-$(hostname)}.pid"; trap "" USR1; exec "$@"' pz-trainer)

# pz_signal_trainers SIG: deliver SIG to the trainer ranks on every training node (PZ_TRAIN_NODELIST).
pz_signal_trainers() {
  local sig=$1 n=${PZ_TRAIN_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
  srun --overlap --nodes="$n" --ntasks="$n" --ntasks-per-node=1 \
       --nodelist="${PZ_TRAIN_NODELIST:-${SLURM_JOB_NODELIST:-$(hostname)}}" --output="$LOG_DIR/signal-%n.log" \
    bash -c 'f="$1/${SLURMD_NODENAME:-$(hostname)}.pid"; [ -f "$f" ] || { echo "no $f"; exit 0; }
             read -r pid mode < "$f"
             if [ "$mode" = children ]; then pids=$(ps -o pid= --ppid "$pid"); else pids=$pid; fi
             for p in $pids; do kill -"$2" "$p" 2>/dev/null && echo "SIG$2 -> $p"; done; true' \
    pz-signal "$PZ_PID_DIR" "$sig" || pz_log "could not signal the trainers (see $LOG_DIR/signal-*.log)"
}

# pz_srun_forwarding SRUN_ARGS...: start `srun [container flags] SRUN_ARGS` (the trainer step) in the background,
# forward SIGUSR1/SIGTERM to its ranks, and wait for it; returns its exit code.
PZ_STOP_SIGNAL=""
pz_srun_forwarding() {
  srun "${SRUN_CONTAINER_ARGS[@]}" "$@" &
  local pid=$! rc=0
  trap 'PZ_STOP_SIGNAL=USR1; pz_log "SIGUSR1: asking the trainer ranks to checkpoint and stop"; pz_signal_trainers USR1' USR1
  trap 'PZ_STOP_SIGNAL=TERM; pz_log "SIGTERM: asking the trainer ranks to checkpoint and stop"; pz_signal_trainers TERM' TERM
  while true; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break      # wait returned early because a trapped signal arrived
  done
  trap - USR1 TERM
  return "$rc"
}

# pz_requeue_if_stopped RC: after a time-limit stop that checkpointed cleanly, put the job back in the queue;
# it restarts with the same job id and OUTPUT_DIR and the trainer resumes from its last checkpoint.
pz_requeue_if_stopped() {
  local rc=$1
  if [ "$PZ_STOP_SIGNAL" = USR1 ] && [ "$rc" = 0 ] && [ "$REQUEUE" = 1 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
      pz_log "not requeueing: ${SLURM_RESTART_COUNT} restarts reached MAX_RESTARTS=$MAX_RESTARTS"
      return 0
    fi
    pz_log "checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
    sleep "${PZ_REQUEUE_WAIT:-60}"   # the requeue ends this run; do not report completion before it does
  fi
  return 0
}

# pz_wait_file FILE PID TIMEOUT_S WHAT: wait until FILE exists, failing if PID (a launcher step) exits first.
pz_wait_file() {
  local file=$1 pid=$2 timeout=$3 what=$4 deadline
  deadline=$(( $(date +%s) + timeout ))
  until [ -s "$file" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then pz_log "$what exited before writing $file; see $LOG_DIR"; return 1; fi
    if [ "$(date +%s)" -gt "$deadline" ]; then pz_log "$what: no $file after ${timeout}s; see $LOG_DIR"; return 1; fi
    sleep 2
  done
}
