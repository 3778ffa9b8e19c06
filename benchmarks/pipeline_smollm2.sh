#!/usr/bin/env bash
# The whole method on the embedded default teacher (SmolLM2-135M-Instruct), with the shipped commands:
#   data -> teacher labels -> convert (50%, 25%, 4-layer draft) -> distill / KD-fine-tune -> eval -> speculative.
# Every number in docs/results.md comes from this script's outputs (results land in $RES).
#
#   bash benchmarks/pipeline_smollm2.sh                      # two GPUs (G0=0 G1=1); one GPU: G1=0
#   TINY=1 bash benchmarks/pipeline_smollm2.sh               # a minutes-long smoke run on CPU
#
# Knobs (environment): WORK (runs/smollm2), RES ($WORK/results), DATA (a `mamballama data build` output;
# built if absent), STEPS (optimizer steps per student), DRAFT_STEPS, SEQ (2048), MB (micro-batch), ACCUM
# (micro-batches per step; a step's sequences are sorted by length across them, so less padding), LR,
# LABEL_N (max new tokens per teacher answer), LABEL_BS, LENGTHS (passkey lengths), TRIALS, DEADLINE (s).
set -uo pipefail
WORK=${WORK:-runs/smollm2}
RES=${RES:-$WORK/results}
DATA=${DATA:-$WORK/data}
G0=${G0:-0}
G1=${G1:-1}
if [ -n "${TINY:-}" ]; then
  STEPS=${STEPS:-3}; DRAFT_STEPS=${DRAFT_STEPS:-2}; SEQ=${SEQ:-256}; MB=${MB:-2}; LABEL_N=${LABEL_N:-8}
  LABEL_BS=${LABEL_BS:-4}; LIMIT=${LIMIT:-4}; LENGTHS=${LENGTHS:-1x,2x}; TRIALS=${TRIALS:-1}; PPL_TOKENS=2048
  TEXT_LIMIT=${TEXT_LIMIT:-8}; SPEC_N=${SPEC_N:-8}
fi
STEPS=${STEPS:-400}
DRAFT_STEPS=${DRAFT_STEPS:-300}
SEQ=${SEQ:-2048}
MB=${MB:-16}
ACCUM=${ACCUM:-1}
SAVE_EVERY=${SAVE_EVERY:-100}
ALIGN_STEPS=${ALIGN_STEPS:-0}   # > 0: layer-wise alignment (distill --w-hidden) of each student before its KD
ALIGN_LR=${ALIGN_LR:-1e-3}
LR=${LR:-2e-4}
LABEL_N=${LABEL_N:-256}
LABEL_BS=${LABEL_BS:-96}
LIMIT=${LIMIT:-}
LENGTHS=${LENGTHS:-1x,2x,5x,10x,20x}
TRIALS=${TRIALS:-4}
PPL_TOKENS=${PPL_TOKENS:-65536}
TEXT_LIMIT=${TEXT_LIMIT:-}
SPEC_N=${SPEC_N:-256}
DEADLINE=${DEADLINE:-100000}
mkdir -p "$WORK" "$RES"
t0=$(date +%s)
PY=${PY:-python3}
MM=("$PY" -m mamballama_cli)
stage() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$RES/timeline.txt"; }
left() { local r=$(( DEADLINE - ($(date +%s) - t0) )); (( r < 5 )) && r=5; echo "$r"; }
on() { local gpu=$1; shift; CUDA_VISIBLE_DEVICES=$gpu "$@"; }  # on GPU CMD...

stage "start: ALIGN_STEPS=$ALIGN_STEPS STEPS=$STEPS DRAFT_STEPS=$DRAFT_STEPS SEQ=$SEQ MB=$MB ACCUM=$ACCUM LR=$LR LABEL_N=$LABEL_N LENGTHS=$LENGTHS"
"${MM[@]}" env > "$RES/env.txt" 2>&1

# 1. Data: prompts and plain text from packaged sources, with a held-out split.
if [ ! -f "$DATA/manifest.json" ]; then stage "data build"; "${MM[@]}" data build --output "$DATA" > /dev/null; fi
cp "$DATA/manifest.json" "$RES/data_manifest.json"

# 2. The teacher answers the prompts (sequence-level KD). Labelling resumes: answers already in
#    $WORK/labels-train.jsonl / labels-heldout.jsonl (e.g. written on a CPU machine beforehand) are kept.
P="$WORK/prompts"; mkdir -p "$P"
if [ -n "$LIMIT" ]; then head -n "$LIMIT" "$DATA/prompts-train.jsonl" > "$P/all.jsonl"
else cp "$DATA/prompts-train.jsonl" "$P/all.jsonl"; fi
n=$(wc -l < "$P/all.jsonl")
stage "label $n train prompts + held-out prompts (max $LABEL_N new tokens)"
on "$G0" "${MM[@]}" label default --prompts "$DATA/prompts-heldout.jsonl" --output "$WORK/labels-heldout.jsonl" -n "$LABEL_N" --batch-size "$LABEL_BS" --resume > "$RES/label-h.log" 2>&1
# 3. Students and draft, initialised from the teacher (beside the labelling: the teacher is cached by now).
stage "convert (50%, 25%, 4-layer draft), the last two beside the labelling"
"${MM[@]}" convert default --ratio 0.5 --output "$WORK/h50" --force --json > "$RES/convert-h50.json"  # caches the teacher
convert_all() {
  "${MM[@]}" convert default --ratio 0.25 --output "$WORK/h25" --force --json > "$RES/convert-h25.json"
  "${MM[@]}" convert default --draft-layers 0,10,20,29 --output "$WORK/d4" --force --json > "$RES/convert-d4.json"
}
convert_all > "$RES/convert.log" 2>&1 &
on "$G0" "${MM[@]}" label default --prompts "$P/all.jsonl" --output "$WORK/labels-train.jsonl" -n "$LABEL_N" --batch-size "$LABEL_BS" --resume > "$RES/label-train.log" 2>&1
wait
tail -n 2 "$RES"/label-*.log

# Training mix: teacher answers + plain text. Held-out: unseen text, and the teacher's answers to unseen prompts.
if [ -n "$TEXT_LIMIT" ]; then head -n "$TEXT_LIMIT" "$DATA/text-train.jsonl" > "$WORK/text-train.jsonl"
else cp "$DATA/text-train.jsonl" "$WORK/text-train.jsonl"; fi
cat "$WORK/labels-train.jsonl" "$WORK/text-train.jsonl" > "$WORK/train.jsonl"
"$PY" - "$WORK" "$DATA" <<'EOF'
import json, sys
work, data = sys.argv[1], sys.argv[2]
with open(f"{work}/heldout-answers.jsonl", "w") as out:
    for line in open(f"{work}/labels-heldout.jsonl"):
        msgs = json.loads(line)["messages"]
        out.write(json.dumps({"text": msgs[-1]["content"]}) + "\n")
EOF
wc -l "$WORK"/*.jsonl | tee "$RES/data_counts.txt"


# 4. End-to-end distillation (forward KL on the teacher's logits) of both students at once; the draft is
#    KD-fine-tuned (sft with a KL term to the teacher) beside the 50% student.
stage "distill ($STEPS steps each) and draft KD ($DRAFT_STEPS steps)"
common=(--data "$WORK/train.jsonl" --eval-data "$WORK/labels-heldout.jsonl" --seq-len "$SEQ"
        --micro-batch-size "$MB" --gradient-accumulation-steps "$ACCUM" --lr "$LR" --warmup 0.05 --save-every "$SAVE_EVERY"
        --log-every 10 --force --json)
student() {  # student() RATIO: optional layer-wise alignment (ALIGN_STEPS > 0), then end-to-end KD
  local r=$1 src="$WORK/h$1"
  if [ "$ALIGN_STEPS" -gt 0 ]; then
    "${MM[@]}" distill "$src" --w-hidden 1 --w-kl 0 --trainable mixers --steps "$ALIGN_STEPS" --output "$WORK/align$r" \
        "${common[@]}" --lr "$ALIGN_LR" > "$RES/align-$r.json" 2> "$RES/align-$r.log"
    src="$WORK/align$r"
  fi
  "${MM[@]}" distill "$src" --template distill-e2e --steps "$STEPS" --output "$WORK/run$r" \
      "${common[@]}" > "$RES/distill-$r.json" 2> "$RES/distill-$r.log"
}
on "$G0" timeout "$(left)" bash -c "$(declare -f student); $(declare -p MM common RES WORK ALIGN_STEPS ALIGN_LR STEPS); student 50" &
on "$G1" timeout "$(left)" bash -c "$(declare -f student); $(declare -p MM common RES WORK ALIGN_STEPS ALIGN_LR STEPS); student 25" &
on "$G0" timeout "$(left)" "${MM[@]}" sft "$WORK/d4" --teacher default --w-kl 1 --w-ce 0 --steps "$DRAFT_STEPS" \
    --output "$WORK/rund4" "${common[@]}" > "$RES/sft-d4.json" 2> "$RES/sft-d4.log" &
wait
for r in run50 run25 rund4; do
  cp "$WORK/$r/metrics.jsonl" "$RES/metrics-$r.jsonl" 2>/dev/null
  cp "$WORK/$r/training_summary.json" "$RES/summary-$r.json" 2>/dev/null
  # A run cut by the deadline still has its last checkpoint, which loads like a model.
  [ -f "$WORK/$r/model.safetensors" ] || { last=$(ls -d "$WORK/$r"/checkpoints/step-* 2>/dev/null | tail -1); [ -n "$last" ] && ln -sfn "$last" "$WORK/$r-model" && echo "$r: using $last" | tee -a "$RES/timeline.txt"; }
  [ -f "$WORK/$r/model.safetensors" ] && ln -sfn "$r" "$WORK/$r-model"
done
for r in align50 align25; do [ -f "$WORK/$r/metrics.jsonl" ] && cp "$WORK/$r/metrics.jsonl" "$RES/metrics-$r.jsonl"; done
tail -n 3 "$RES"/distill-*.log "$RES"/sft-d4.log

# 5. Evaluation: held-out perplexity/agreement/KL, passkey at multiples of the distillation length.
stage "eval"
ev=(--teacher default --tasks perplexity,passkey --ppl-data "$DATA/text-heldout.jsonl,$WORK/heldout-answers.jsonl"
    --ppl-max-tokens "$PPL_TOKENS" --lengths "$LENGTHS" --depths 0,0.5,1 --trials "$TRIALS" --force)
on "$G0" timeout "$(left)" "${MM[@]}" eval "$WORK/run50-model" "${ev[@]}" --output "$WORK/eval50" > "$RES/eval50.txt" 2> "$RES/eval50.log" &
on "$G1" timeout "$(left)" "${MM[@]}" eval "$WORK/run25-model" "${ev[@]}" --output "$WORK/eval25" > "$RES/eval25.txt" 2> "$RES/eval25.log" &
wait
for e in eval50 eval25; do
  cp "$WORK/$e/report.md" "$RES/$e-report.md" 2>/dev/null; cp "$WORK/$e/results.json" "$RES/$e-results.json" 2>/dev/null
  for png in "$WORK/$e"/*.png; do [ -f "$png" ] && cp "$png" "$RES/$e-$(basename "$png")"; done
done

# 6. Speculative decoding with the real pair: distilled 50% hybrid target, KD-fine-tuned 4-layer draft.
stage "speculative"
prompt="Write a short guide to keeping a vegetable garden healthy through the summer."
on "$G0" timeout "$(left)" "${MM[@]}" generate "$WORK/run50-model" --speculative --draft "$WORK/rund4-model" -k 4 --chat \
    --prompt "$prompt" -n "$SPEC_N" --stats-json "$RES/spec-50-d4.json" > "$RES/spec-50-d4.txt" 2>&1
on "$G0" timeout "$(left)" "${MM[@]}" generate "$WORK/run50-model" --speculative --draft "$WORK/d4" -k 4 --chat \
    --prompt "$prompt" -n "$SPEC_N" --stats-json "$RES/spec-50-d4-untrained.json" > "$RES/spec-50-d4-untrained.txt" 2>&1
on "$G0" timeout "$(left)" "${MM[@]}" generate default --chat --prompt "$prompt" -n "$SPEC_N" --stats-json "$RES/gen-teacher.json" > "$RES/gen-teacher.txt" 2>&1
on "$G0" timeout "$(left)" "${MM[@]}" generate "$WORK/run50-model" --chat --prompt "$prompt" -n "$SPEC_N" --stats-json "$RES/gen-50.json" > "$RES/gen-50.txt" 2>&1
on "$G1" timeout "$(left)" "${MM[@]}" generate "$WORK/run25-model" --chat --prompt "$prompt" -n "$SPEC_N" --stats-json "$RES/gen-25.json" > "$RES/gen-25.txt" 2>&1
stage "done"
ls -la "$RES"
