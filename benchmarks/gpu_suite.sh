#!/usr/bin/env bash
# Every GPU check of the project in one go, on a host with two GPUs (or one: G1=0, and no parity step):
#   stream A (GPU $G0): all gpu-marked tests
#   stream B (GPU $G1): speculative verify benchmark (Llama-3-8B shape), distill throughput (SmolLM2 shape),
#                       then the 2-GPU parity of DDP / FSDP / ZeRO-3 against one GPU (needs both GPUs)
# Logs and JSON land in $OUT (default ./out). From the project root:
#   source .gpu/activate.sh && bash benchmarks/gpu_suite.sh
# DEADLINE (seconds) caps the whole run; TEACHER (a checkpoint dir / .gguf) makes the throughput run use real
# weights instead of random ones of the same shape. PARITY_ENGINES (ddp,fsdp,zero3) and PARITY_CAP (240 s) choose
# and bound the parity step, e.g. PARITY_ENGINES=zero3 PARITY_CAP=420 for ZeRO-3 alone.
set -uo pipefail
G0=${G0:-0}
G1=${G1:-1}
DEADLINE=${DEADLINE:-540}
source "$(dirname "$0")/device_common.sh"
left() { local cap=$1 rest=$(( DEADLINE - ($(date +%s) - t0) - 10 )); (( rest < cap )) && cap=$rest; (( cap < 1 )) && cap=1; echo "$cap"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
python3 -m mamballama_cli env > "$OUT/env.txt" 2>&1

stream_a() {
  stamp "A: gpu tests on GPU $G0"
  CUDA_VISIBLE_DEVICES=$G0 timeout "$(left ${TESTS_CAP:-420})" python3 -m pytest -v -rfE --durations=15 -m gpu \
      -p no:cacheprovider -o addopts="" tests/ > "$OUT/gpu-tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/gpu-tests.log"
  stamp "A: done"
}

stream_b() {
  stamp "B: speculative verify benchmark on GPU $G1"
  CUDA_VISIBLE_DEVICES=$G1 timeout "$(left 150)" python3 benchmarks/speculative_verify.py --shape 8b --k 4 \
      --context 512 --json "$OUT/speculative_verify.json" > "$OUT/speculative_verify.txt" 2>&1
  echo "exit $?" >> "$OUT/speculative_verify.txt"
  stamp "B: distill throughput on GPU $G1"
  local src=(--random)
  [ -n "${TEACHER:-}" ] && src=(--teacher "$TEACHER")
  CUDA_VISIBLE_DEVICES=$G1 timeout "$(left 120)" python3 benchmarks/distill_throughput.py "${src[@]}" --ratio 0.5 \
      --seq-len 2048 --micro-batch-size 16 --json-out "$OUT/distill_throughput.json" > "$OUT/distill_throughput.txt" 2>&1
  echo "exit $?" >> "$OUT/distill_throughput.txt"
  if [ "$G0" != "$G1" ]; then
    stamp "B: 2-GPU parity (DDP, FSDP, ZeRO-3 vs one GPU)"
    CUDA_VISIBLE_DEVICES=$G0,$G1 timeout "$(left ${PARITY_CAP:-240})" python3 benchmarks/multigpu_parity.py --random smollm2 \
        --engines "${PARITY_ENGINES:-ddp,fsdp,zero3}" --out "$OUT/parity" > "$OUT/parity.txt" 2>&1
    echo "exit $?" >> "$OUT/parity.txt"
    cp "$OUT/parity/parity.json" "$OUT/parity.json" 2>/dev/null
  fi
  stamp "B: done"
}

stream_a &
stream_b &
wait
stamp "all done"
tail -n 25 "$OUT/gpu-tests.log"
tail -n 3 "$OUT/speculative_verify.txt" "$OUT/distill_throughput.txt" "$OUT/parity.txt" 2>/dev/null
# The device tool returns at most 8 files: pack everything into one archive.
if [ -n "${PACK:-1}" ]; then
  tar czf "$OUT/../gpu-suite.tgz" -C "$OUT" . && mv "$OUT/../gpu-suite.tgz" "$OUT/gpu-suite.tgz"
  find "$OUT" -mindepth 1 ! -name gpu-suite.tgz -delete
fi
