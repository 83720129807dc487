#!/usr/bin/env bash
# GRPO in server mode on a split of the machine's GPUs: `flywheel vllm-serve` on SERVER_GPUS,
# `accelerate launch examples/train_grpo.py` on TRAINER_GPUS, a random-weight model of SHAPE.
# Collects the per-step time split (generation / reward / train / weight sync) and the reward.
#
#   bench/grpo_server_run.sh SHAPE SERVER_GPUS TRAINER_GPUS [extra GRPOConfig flags...]
#   bench/grpo_server_run.sh qwen2.5-0.5b 0 1                  # x2: serve on GPU 0, train on GPU 1
#   bench/grpo_server_run.sh qwen2.5-0.5b 0,1 2,3              # x4: serve dp=2, accelerate on 2 GPUs
#   bench/grpo_server_run.sh qwen2.5-1.5b 0,1,2,3 4,5,6,7      # x8: serve dp=4, accelerate on 4 GPUs
#   bench/grpo_server_run.sh tiny cpu cpu                      # CPU smoke test (Gloo, use_cpu)
#
# Environment (defaults in brackets): OUT [/tmp/grpo_server_run] where results go; TP [1] server
# tensor_parallel_size (dp = server GPUs / TP); STEPS [8]; BATCH [16] per-device batch; GA [4]
# gradient accumulation; GENERATIONS [8]; COMPLETION_LEN [256]; LR [1e-5]; MODEL_DIR [$OUT/model]
# a checkpoint folder, written when it has none.
# Writes $OUT/server.log, $OUT/train.log, $OUT/steps.jsonl (one logged step a line) and
# $OUT/summary.json, and prints the per-step table last.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
SHAPE=$1 SERVER_GPUS=$2 TRAINER_GPUS=$3
shift 3
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/grpo_server_run}
TP=${TP:-1} STEPS=${STEPS:-8} BATCH=${BATCH:-16} GA=${GA:-4} GENERATIONS=${GENERATIONS:-8}
COMPLETION_LEN=${COMPLETION_LEN:-256} LR=${LR:-1e-5} MODEL_DIR=${MODEL_DIR:-$OUT/model}
mkdir -p "$OUT"

if [[ $SERVER_GPUS == cpu ]]; then
  ON_CPU=1 DTYPE=float32 DP=1 PROCESSES=1
  SERVER_ENV=(CUDA_VISIBLE_DEVICES=) TRAINER_ENV=(CUDA_VISIBLE_DEVICES=)
  SERVER_FLAGS=(--kv_cache_memory_gb 0.1) LAUNCH_FLAGS=(--cpu) TRAIN_FLAGS=(--use_cpu true)
else
  ON_CPU=0 DTYPE=bfloat16
  IFS=, read -ra server_list <<< "$SERVER_GPUS"
  IFS=, read -ra trainer_list <<< "$TRAINER_GPUS"
  DP=$(( ${#server_list[@]} / TP )) PROCESSES=${#trainer_list[@]}
  if (( DP * TP != ${#server_list[@]} )); then
    echo "the ${#server_list[@]} server GPUs ($SERVER_GPUS) are not a multiple of TP=$TP" >&2
    exit 2
  fi
  SERVER_ENV=(CUDA_VISIBLE_DEVICES="$SERVER_GPUS") TRAINER_ENV=(CUDA_VISIBLE_DEVICES="$TRAINER_GPUS")
  SERVER_FLAGS=(--gpu_memory_utilization 0.9) LAUNCH_FLAGS=(--mixed_precision bf16) TRAIN_FLAGS=(--bf16 true)
fi

if [[ ! -f $MODEL_DIR/config.json ]]; then
  echo "writing a random $SHAPE checkpoint ($DTYPE) to $MODEL_DIR"
  python -c "import sys, torch; from pathlib import Path; from bench.weight_sync import write_checkpoint
write_checkpoint(Path(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3]))" "$MODEL_DIR" "$SHAPE" "$DTYPE"
fi

read -r PORT GROUP_PORT < <(python -c "from flywheel.server.launch import free_port; print(free_port(), free_port())")
echo "server: GPUs $SERVER_GPUS, tp=$TP dp=$DP, port $PORT; trainer: $PROCESSES process(es) on $TRAINER_GPUS"
env "${SERVER_ENV[@]}" python -m flywheel vllm-serve --model "$MODEL_DIR" --tensor_parallel_size "$TP" \
  --data_parallel_size "$DP" --port "$PORT" --dtype "$DTYPE" --max_model_len $(( COMPLETION_LEN + 256 )) \
  --log_level warning "${SERVER_FLAGS[@]}" > "$OUT/server.log" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2> /dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
  fi
}
trap stop_server EXIT

started=$(date +%s)
until curl -sf ${FLYWHEEL_API_KEY:+-H "Authorization: Bearer $FLYWHEEL_API_KEY"} "http://127.0.0.1:$PORT/health" > /dev/null; do
  if ! kill -0 "$SERVER_PID" 2> /dev/null; then
    echo "the server exited while loading:" >&2
    tail -30 "$OUT/server.log" >&2
    exit 1
  fi
  if (( $(date +%s) - started > 900 )); then
    echo "the server was not healthy within 900 s" >&2
    exit 1
  fi
  sleep 1
done
SERVER_READY_S=$(( $(date +%s) - started ))
echo "server healthy after ${SERVER_READY_S}s"

# --disable_tqdm makes the Trainer print each log as a dict on its own line (parsed below).
train_started=$(date +%s)
env "${TRAINER_ENV[@]}" accelerate launch --num_processes "$PROCESSES" "${LAUNCH_FLAGS[@]}" \
  examples/train_grpo.py --model "$MODEL_DIR" --output_dir "$OUT/train" --use_vllm true --vllm_mode server \
  --vllm_server_host 127.0.0.1 --vllm_server_port "$PORT" --vllm_group_port "$GROUP_PORT" \
  --max_steps "$STEPS" --logging_steps 1 --per_device_train_batch_size "$BATCH" \
  --gradient_accumulation_steps "$GA" --num_generations "$GENERATIONS" \
  --max_completion_length "$COMPLETION_LEN" --learning_rate "$LR" --report_to none --save_strategy no \
  --disable_tqdm true "${TRAIN_FLAGS[@]}" "$@" 2>&1 | tee "$OUT/train.log"
TRAIN_S=$(( $(date +%s) - train_started ))
stop_server
trap - EXIT

python - "$OUT" "$SHAPE" "$SERVER_GPUS" "$TRAINER_GPUS" "$TP" "$DP" "$PROCESSES" "$SERVER_READY_S" "$TRAIN_S" \
  "$BATCH" "$GA" "$GENERATIONS" "$COMPLETION_LEN" <<'EOF'
import ast, json, sys
from pathlib import Path

out, shape, server_gpus, trainer_gpus = Path(sys.argv[1]), *sys.argv[2:5]
tp, dp, processes, ready_s, train_s, batch, ga, generations, length = map(int, sys.argv[5:14])


def as_number(value):
    """The Trainer prints floats formatted as strings ('0.1234')."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


steps = []
for line in (out / "train.log").read_text(errors="replace").splitlines():
    line = line.strip()
    if not line.startswith("{") or "'reward'" not in line:
        continue
    steps.append({key: number for key, value in ast.literal_eval(line).items()
                  if (number := as_number(value)) is not None})
if not steps:
    sys.exit(f"no logged steps in {out / 'train.log'}")
(out / "steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
phases = ["generation", "reward", "train", "weight_sync"]
later = steps[1:] or steps  # the first step also pays the warm-up (first generation, CUDA graphs, allocator)
mean = {p: sum(s.get(f"time/{p}", 0.0) for s in later) / len(later) for p in phases}
summary = {
    "shape": shape, "server_gpus": server_gpus, "trainer_gpus": trainer_gpus, "server_tp": tp, "server_dp": dp,
    "trainer_processes": processes, "per_device_train_batch_size": batch, "gradient_accumulation_steps": ga,
    "num_generations": generations, "max_completion_length": length,
    "completions_per_step": batch * ga * processes, "server_ready_s": ready_s, "train_wall_s": train_s,
    "steps": len(steps), "mean_time_per_step_after_first": mean, "step_s_after_first": sum(mean.values()),
    "reward_first": steps[0]["reward"], "reward_last": steps[-1]["reward"],
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"\nGRPO server mode, {shape}: serve on {server_gpus} (tp={tp} dp={dp}), train on {trainer_gpus} "
      f"({processes} process(es)), {summary['completions_per_step']} completions x {length} tokens per step")
print(f"{'step':>5}{'reward':>9}" + "".join(f"{p:>13}" for p in phases) + f"{'sum s':>9}")
for number, step in enumerate(steps, 1):
    times = [step.get(f"time/{p}", 0.0) for p in phases]
    print(f"{number:>5}{step['reward']:>9.3f}" + "".join(f"{t:>13.3f}" for t in times) + f"{sum(times):>9.2f}")
print(f"{'mean':>5}{'':>9}" + "".join(f"{mean[p]:>13.3f}" for p in phases) + f"{sum(mean.values()):>9.2f}"
      "  (steps 2..)")
EOF
