#!/usr/bin/env bash
# Distillation throughput of several variants side by side (SmolLM2-135M shape, random weights, 2048-token
# sequences), after the gpu tests named in TESTS (-k KEXPR). Each variant is "name|ENV=V ENV2=V|extra args";
# VARIANTS holds them separated by ';'. Results: $OUT/ab-<name>.json and .txt, plus a summary table.
# From the project root on the CUDA machine:  source .gpu/activate.sh && bash benchmarks/distill_ab.sh
#   VARIANTS="base||;no-rope|MAMBALLAMA_REF_OPS=rotary|;mb32|| --micro-batch-size 32 --accumulation 1" \
#     bash benchmarks/distill_ab.sh
set -uo pipefail
source "$(dirname "$0")/device_common.sh"
run_gpu_tests 240
IFS=';' read -r -a specs <<< "${VARIANTS:-base||}"
for spec in "${specs[@]}"; do
  IFS='|' read -r name envs extra <<< "$spec"
  stamp "variant $name: env [$envs] args [$extra]"
  # shellcheck disable=SC2086
  env $envs timeout ${VARIANT_CAP:-150} python3 benchmarks/distill_throughput.py --random --ratio 0.5 --seq-len 2048 \
      --micro-batch-size 16 --accumulation 2 --steps ${DT_STEPS:-6} --json-out "$OUT/ab-$name.json" $extra \
      > "$OUT/ab-$name.txt" 2>&1
  echo "exit $?" >> "$OUT/ab-$name.txt"; tail -n 2 "$OUT/ab-$name.txt"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("ab-*.json")):
    r = json.loads(p.read_text())
    rows.append(f"{p.stem[3:]:<20} {r['tokens_per_s']:>10,.0f} tok/s  {r['seconds_per_step']:.4f} s/step  "
                f"peak {r['peak_memory_gib']} GiB  mb {r['micro_batch_size']}x{r['accumulation']}  "
                f"teacher {r.get('teacher_impl')}  kernels {r['kernels']}")
(pathlib.Path(sys.argv[1]) / "ab-summary.txt").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
stamp "done"
