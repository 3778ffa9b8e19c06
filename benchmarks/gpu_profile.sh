#!/usr/bin/env bash
# Where the time goes on the GPU: kernel tables of the speculative verify call vs the plain decode step
# (Llama-3-8B shape) and of one distillation step (SmolLM2-135M shape), then gpu tests (TESTS: files, KEXPR: -k).
# From the project root on the CUDA machine:  source .gpu/activate.sh && bash benchmarks/gpu_profile.sh
set -uo pipefail
source "$(dirname "$0")/device_common.sh"
stamp "speculative verify (8B shape) with kernel tables"
timeout 200 python3 benchmarks/speculative_verify.py --shape 8b --k 4 --context 512 --loop-tokens 64 \
    --json "$OUT/speculative_verify.json" --profile "$OUT/verify_profile.txt" > "$OUT/speculative_verify.txt" 2>&1
echo "exit $?" >> "$OUT/speculative_verify.txt"; tail -n 2 "$OUT/speculative_verify.txt"
stamp "distill throughput (SmolLM2 shape) with a kernel table"
timeout 150 python3 benchmarks/distill_throughput.py --random --ratio 0.5 --seq-len 2048 --micro-batch-size 16 \
    --steps ${DT_STEPS:-5} --json-out "$OUT/distill_throughput.json" --profile "$OUT/distill_profile.txt" \
    > "$OUT/distill_throughput.txt" 2>&1
echo "exit $?" >> "$OUT/distill_throughput.txt"; tail -n 2 "$OUT/distill_throughput.txt"
run_gpu_tests 200
python3 -m mamballama_cli env > "$OUT/env.txt" 2>&1
stamp "done"
