#!/usr/bin/env bash
# Do the CUDA kernels change what distillation learns? The same end-to-end distillation of the default teacher's
# 50% hybrid (same data, seed and knobs as benchmarks/pipeline_smollm2.sh) twice at once on one GPU: with the fast
# kernels, and with MAMBALLAMA_KERNELS=ref (every op its PyTorch reference). Writes both metrics.jsonl files and a
# side-by-side table of train and held-out KL to $OUT/kernel-ab.txt.
#
# Inputs as for benchmarks/pipeline_device.sh: the teacher's GGUF halves (/tmp/teacher/part_aa from an earlier
# call, .teacher-b/part_ab) and .data/data.tgz. Knobs: STEPS (120), MB (8), ACCUM (2), SEQ (2048), LR (2e-4),
# EVAL_EVERY (40), CAP (seconds for the two runs, 420).
set -uo pipefail
source "$(dirname "$0")/device_common.sh"
WORK=${WORK:-/tmp/kab}
STEPS=${STEPS:-120}; MB=${MB:-8}; ACCUM=${ACCUM:-2}; SEQ=${SEQ:-2048}; LR=${LR:-2e-4}; EVAL_EVERY=${EVAL_EVERY:-40}
CAP=${CAP:-420}
export MAMBALLAMA_CACHE=${MAMBALLAMA_CACHE:-/tmp/mlcache}
mkdir -p "$WORK"
assemble_teacher
[ -d "$WORK/data" ] || tar xzf .data/data.tgz -C "$WORK"
cat "$WORK/labels-train.jsonl" "$WORK/data/text-train.jsonl" > "$WORK/train.jsonl"
stamp "convert the 50% hybrid"
python3 -m mamballama_cli convert default --ratio 0.5 --output "$WORK/h50" --force --json > "$OUT/convert.json" || exit 1
common=(--template distill-e2e --steps "$STEPS" --data "$WORK/train.jsonl" --eval-data "$WORK/labels-heldout.jsonl"
        --seq-len "$SEQ" --micro-batch-size "$MB" --gradient-accumulation-steps "$ACCUM" --lr "$LR" --warmup 0.05
        --log-every 10 --eval-every "$EVAL_EVERY" --save-every 100000 --seed 0 --force --json)
stamp "distill, fast kernels and references side by side ($STEPS steps)"
timeout "$CAP" python3 -m mamballama_cli distill "$WORK/h50" "${common[@]}" --output "$WORK/fast" \
    > "$OUT/fast.json" 2> "$OUT/fast.log" &
MAMBALLAMA_KERNELS=ref timeout "$CAP" python3 -m mamballama_cli distill "$WORK/h50" "${common[@]}" --output "$WORK/ref" \
    > "$OUT/ref.json" 2> "$OUT/ref.log" &
wait
stamp "compare"
cp "$WORK/fast/metrics.jsonl" "$OUT/metrics-fast.jsonl" 2>/dev/null
cp "$WORK/ref/metrics.jsonl" "$OUT/metrics-ref.jsonl" 2>/dev/null
python3 - "$OUT" <<'PY' | tee "$OUT/kernel-ab.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    p = out / f"metrics-{name}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
fast, ref = rows("fast"), rows("ref")
def key(r):
    return ("eval" if "eval_kl" in r else "train", r.get("step"))
rf = {key(r): r for r in ref}
print(f"{'split':<8}{'step':>6}  {'kl fast':>10}{'kl ref':>10}  {'tok/s fast':>11}{'tok/s ref':>10}")
for r in fast:
    o = rf.get(key(r))
    if o is None:
        continue
    kl = lambda x: x.get("kl", x.get("eval_kl", float("nan")))
    print(f"{key(r)[0]!s:<8}{r.get('step')!s:>6}  {kl(r):>10.4f}{kl(o):>10.4f}  "
          f"{r.get('tokens_per_s', float('nan')):>11.0f}{o.get('tokens_per_s', float('nan')):>10.0f}")
PY
tail -n 3 "$OUT/fast.log" "$OUT/ref.log" | cut -c1-300
stamp "done"
