#!/usr/bin/env bash
# Start the rollout servers of a Slurm job, wait until all are healthy, then write $RUN_DIR/endpoints.txt.
#
# Run inside an allocation, in the background of the training sbatch script:
#   MODEL=/ckpt/hf RUN_DIR=$PWD/runs/$SLURM_JOB_ID ROLLOUT_NODES=2 bash slurm/launch_sglang.sh &
#   while [ ! -f "$RUN_DIR/endpoints.txt" ]; do sleep 10; done     # then train with --rollout-endpoints ...
#
# The first ROLLOUT_NODES nodes of the allocation serve; on each, one launcher
# (python -m megatron_pz.rollout.launcher) starts GPUS_PER_NODE/TP servers with TP GPUs each, waits for
# /health_generate, and writes that node's list; this script joins the lists once every node has reported.
# Servers are stopped by their launcher (SIGTERM to the exact pids it started) when the job step ends:
# never `pkill` on shared nodes.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:?set MODEL to an HF model folder (config.json + safetensors)}
RUN_DIR=${RUN_DIR:-$PWD/runs/${SLURM_JOB_ID:-local}}
ROLLOUT_NODES=${ROLLOUT_NODES:-1}        # how many nodes (from the start of the allocation) serve rollouts
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-1}                              # GPUs per SGLang server (its --tp-size)
BASE_PORT=${BASE_PORT:-30000}            # server i on a node listens on BASE_PORT + i
KIND=${KIND:-sglang}                     # sglang | embedded (CPU nodes: set GPUS_PER_NODE=0 TP=1 NUM_SERVERS=1)
WEIGHTS_DIR=${WEIGHTS_DIR:-}             # embedded: the folder disk weight updates may read from (the trainer's
                                         # rollout.weights_dir, on a filesystem both nodes see); empty = updates off
EMBEDDED_EXTRA_ARGS=${EMBEDDED_EXTRA_ARGS:-}   # embedded: extra `megatron-pz serve-rollout` flags
NUM_SERVERS=${NUM_SERVERS:-$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE / TP : 1 ))}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1800}   # seconds; large models take minutes to load and warm up
# Extra flags for sglang.launch_server, e.g. "--mem-fraction-static 0.8 --context-length 8192".
SGLANG_EXTRA_ARGS=${SGLANG_EXTRA_ARGS:-"--mem-fraction-static 0.8"}
# Servers bind 0.0.0.0 so training nodes can reach them; protect them with a key (read by the launcher from
# the environment, so it never appears in `ps`/sacct command lines).
if [ -z "${MEGATRON_PZ_ROLLOUT_API_KEY:-}" ]; then
  echo "launch_sglang.sh: warning: MEGATRON_PZ_ROLLOUT_API_KEY is unset; servers on 0.0.0.0 accept anyone" >&2
fi
export MEGATRON_PZ_ROLLOUT_API_KEY=${MEGATRON_PZ_ROLLOUT_API_KEY:-}

# Read the whole host list, then slice: `scontrol ... | head` under pipefail can end this script when head
# exits early and scontrol dies of SIGPIPE (long node lists).
mapfile -t ALL_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NODES=$(IFS=,; echo "${ALL_NODES[*]:0:$ROLLOUT_NODES}")
PARTS="$RUN_DIR/endpoints.d"
mkdir -p "$PARTS" "$RUN_DIR/logs"
rm -f "$PARTS"/*.txt "$RUN_DIR/endpoints.txt"

GPU_FLAGS=()
if [ "$GPUS_PER_NODE" -gt 0 ]; then GPU_FLAGS=(--gpus-per-server "$TP"); fi
SERVER_FLAGS=()
if [ "$KIND" = sglang ]; then read -r -a SERVER_FLAGS <<< "$SGLANG_EXTRA_ARGS"; fi
if [ "$KIND" = embedded ]; then read -r -a SERVER_FLAGS <<< "$EMBEDDED_EXTRA_ARGS"; fi
WEIGHT_FLAGS=()
if [ -n "$WEIGHTS_DIR" ]; then WEIGHT_FLAGS=(--weights-dir "$WEIGHTS_DIR"); fi

# One task per rollout node. $SLURM_NODEID is expanded on the node (single quotes), so each writes its own file.
# SRUN_EXTRA_ARGS: extra srun flags for this step, e.g. the pyxis container flags of slurm/common.sh.
read -r -a SRUN_EXTRA <<< "${SRUN_EXTRA_ARGS:-}"
srun "${SRUN_EXTRA[@]}" --overlap --nodes="$ROLLOUT_NODES" --ntasks="$ROLLOUT_NODES" --ntasks-per-node=1 --nodelist="$NODES" \
  --output="$RUN_DIR/logs/launcher-%n.log" \
  bash -c 'exec python -m megatron_pz.rollout.launcher --endpoints-file "'"$PARTS"'/node-$SLURM_NODEID.txt" "$@"' _ \
    --kind "$KIND" --model "$MODEL" --num-servers "$NUM_SERVERS" "${GPU_FLAGS[@]}" "${WEIGHT_FLAGS[@]}" \
    --base-port "$BASE_PORT" --host 0.0.0.0 --log-dir "$RUN_DIR/logs" --health-timeout "$HEALTH_TIMEOUT" \
    -- "${SERVER_FLAGS[@]}" &
SRUN_PID=$!

# Join the per-node lists once all are there (or fail if the step dies first).
deadline=$(( $(date +%s) + HEALTH_TIMEOUT + 120 ))
until [ "$(find "$PARTS" -name 'node-*.txt' | wc -l)" -ge "$ROLLOUT_NODES" ]; do
  if ! kill -0 "$SRUN_PID" 2>/dev/null; then
    echo "launch_sglang.sh: a launcher exited before all servers were healthy; see $RUN_DIR/logs" >&2
    wait "$SRUN_PID" || exit $?
    exit 1
  fi
  if [ "$(date +%s)" -gt "$deadline" ]; then
    echo "launch_sglang.sh: servers not healthy after ${HEALTH_TIMEOUT}s; see $RUN_DIR/logs" >&2
    kill -TERM "$SRUN_PID"; wait "$SRUN_PID" || true
    exit 1
  fi
  sleep 5
done
cat "$PARTS"/node-*.txt > "$RUN_DIR/.endpoints.txt.tmp"
mv "$RUN_DIR/.endpoints.txt.tmp" "$RUN_DIR/endpoints.txt"   # atomic: readers never see a partial list
echo "launch_sglang.sh: $(wc -l < "$RUN_DIR/endpoints.txt") server(s) ready; endpoints in $RUN_DIR/endpoints.txt"

# Stay in the foreground with the servers: forward SIGTERM/SIGINT to the step, exit with its status.
trap 'kill -TERM "$SRUN_PID" 2>/dev/null || true' TERM INT
wait "$SRUN_PID"
