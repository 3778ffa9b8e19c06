#!/usr/bin/env bash
# Issue 18's measurement in one sitting on one GPU: does speculative decoding speed up the default teacher's 50%
# student with the best draft the budget allows?
#
#   teacher-generated data -> the 50% student (convert --attn-layers auto, the default recipe, BUDGET_S of training)
#   -> the student's own greedy samples -> a draft trained for acceptance on them (DRAFT_S of training): with
#   DRAFT_KIND=feature (the default since 2026-12-04's third session) the student's one-layer feature draft
#   (convert --feature-draft, templates/distill-feature-draft.yaml); with DRAFT_KIND=cut a draft cut from the
#   teacher (DRAFT_LAYERS, templates/distill-draft.yaml) -> benchmarks/spec_eval.py: plain vs
#   speculative decoding (host loop and captured round) over PROMPTS held-out prompts, batch 1, CUDA graphs, with
#   the trained draft at K and at each of KS (and the untrained cut with UNTRAINED=1), every run also timing a
#   round's parts on their own (benchmarks/round_parts.py) -> the student's held-out cross-entropy for context ->
#   issue 17's serving line: benchmarks/serve_load.py on the student and on the teacher, SERVE_CLIENTS clients at
#   SERVE_PROMPT tokens, same engine.
#   2026-12-04's run (docs/results/spec-study-2026-12-04): the untrained cut is kept 0.06% of the time, K=6 is
#   slower than K=4 and K=2; so the defaults since give the draft more training and sweep K=2,3 instead.
#
#   bash benchmarks/spec_study.sh               # one GPU; about 15 minutes on an H200 with the defaults
#   TINY=1 bash benchmarks/spec_study.sh        # a smoke run of every step on CPU
#
# Run on the lent H200 through benchmarks/study_device.sh with SCRIPT=spec_study.sh (prep, start, watch).
# Results in $RES (default $WORK/results): timeline.txt, every command's JSON and log, spec-eval*.json.
# Knobs (environment): WORK, RES, DATA, GEN_TOKENS, GEN_BS, GEN_NEW, BUDGET_S, ALIGN_TOK, KDM_TOK, KDA_TOK, SEQ,
# MB, ACCUM, PLACEMENT, DRAFT_KIND, DRAFT_LAYERS, DRAFT_GEN, DRAFT_S, DRAFT_EVAL_GEN, DRAFT_EVAL_EVERY, K, KS, UNTRAINED,
# PROMPTS, NEW, PARTS_ITERS,
# SERVE_CLIENTS, SERVE_PROMPT, SERVE_NEW, SERVE_REQUESTS.
set -uo pipefail
WORK=${WORK:-runs/spec}
RES=${RES:-$WORK/results}
DATA=${DATA:-$WORK/data}
if [ -n "${TINY:-}" ]; then
  GEN_TOKENS=${GEN_TOKENS:-3000}; GEN_BS=${GEN_BS:-8}; GEN_NEW=${GEN_NEW:-48}; BUDGET_S=${BUDGET_S:-120}
  ALIGN_TOK=${ALIGN_TOK:-2000}; KDM_TOK=${KDM_TOK:-2000}; KDA_TOK=${KDA_TOK:-2000}; SEQ=${SEQ:-128}; MB=${MB:-4}
  ACCUM=${ACCUM:-1}; PLACEMENT=${PLACEMENT-}; DRAFT_GEN=${DRAFT_GEN:-2000}; DRAFT_S=${DRAFT_S:-60}
  PROMPTS=${PROMPTS:-4}; NEW=${NEW:-8}; KS=${KS-2}; PARTS_ITERS=${PARTS_ITERS:-2}; SERVE_CLIENTS=${SERVE_CLIENTS:-2}; SERVE_PROMPT=${SERVE_PROMPT:-64}; SERVE_NEW=${SERVE_NEW:-4}; SERVE_REQUESTS=${SERVE_REQUESTS:-2}; DRAFT_SEQ=${DRAFT_SEQ:-128}; HELDOUT_N=${HELDOUT_N:-2}
  DRAFT_EVAL_GEN=${DRAFT_EVAL_GEN:-0}; DRAFT_EVAL_EVERY=${DRAFT_EVAL_EVERY:-5}
  CONVERT_ARGS=${CONVERT_ARGS:---calibration-seqs 2 --calibration-len 64}
fi
CONVERT_ARGS=${CONVERT_ARGS:-}
GEN_TOKENS=${GEN_TOKENS:-4000000}
GEN_BS=${GEN_BS:-1024}
GEN_NEW=${GEN_NEW:-512}
BUDGET_S=${BUDGET_S:-360}
ALIGN_TOK=${ALIGN_TOK:-2000000}
KDM_TOK=${KDM_TOK:-4000000}
KDA_TOK=${KDA_TOK:-16000000}
SEQ=${SEQ:-2048}
MB=${MB:-8}
ACCUM=${ACCUM:-2}
PLACEMENT=${PLACEMENT---attn-layers auto --placement-score kl+recall}
DRAFT_KIND=${DRAFT_KIND:-feature}  # feature: convert STUDENT --feature-draft; cut: convert default --draft-layers
DRAFT_LAYERS=${DRAFT_LAYERS:-0,10,20,29}
DRAFT_GEN=${DRAFT_GEN:-3000000}
DRAFT_S=${DRAFT_S:-320}
DRAFT_EVAL_GEN=${DRAFT_EVAL_GEN:-60000}  # held-out student samples for the draft's evaluation
DRAFT_EVAL_EVERY=${DRAFT_EVAL_EVERY:-100}
KS=${KS-2 3}  # KS="" (set, empty) skips the sweep
DRAFT_SEQ=${DRAFT_SEQ:-1024}
K=${K:-4}
PROMPTS=${PROMPTS:-128}
NEW=${NEW:-128}
SERVE_CLIENTS=${SERVE_CLIENTS:-32}
SERVE_PROMPT=${SERVE_PROMPT:-4096}
SERVE_NEW=${SERVE_NEW:-128}
SERVE_REQUESTS=${SERVE_REQUESTS:-64}
source "$(dirname "$0")/study_common.sh"
study_init

stage "start: GEN_TOKENS=$GEN_TOKENS BUDGET_S=$BUDGET_S PLACEMENT=\"$PLACEMENT\" DRAFT_LAYERS=$DRAFT_LAYERS DRAFT_GEN=$DRAFT_GEN DRAFT_S=$DRAFT_S K=$K PROMPTS=$PROMPTS NEW=$NEW"
ensure_data
cp "$DATA/text-train.jsonl" "$WORK/text-train.jsonl"
[ -n "${TINY:-}" ] && head -n 16 "$DATA/text-train.jsonl" > "$WORK/text-train.jsonl"

# 1. The student's start (caches the teacher), then data generation beside the draft's cut.
stage "convert the 50% student ($PLACEMENT)"
"${MM[@]}" convert default --ratio 0.5 $PLACEMENT --output "$WORK/h50" $CONVERT_ARGS --force --json \
    > "$RES/convert-h50.json" 2> "$RES/convert-h50.log"
stage "data generate ($GEN_TOKENS tokens) beside the draft's cut (layers $DRAFT_LAYERS)"
"${MM[@]}" data generate default --prompts "$DATA/prompts-train.jsonl,$WORK/text-train.jsonl" --tokens "$GEN_TOKENS" \
    --batch-size "$GEN_BS" --max-new-tokens "$GEN_NEW" --temperature 1.0 --seed 0 --output "$WORK/gen" --force \
    > "$RES/data-generate.json" 2> "$RES/data-generate.log" &
if [ "$DRAFT_KIND" = cut ]; then
  "${MM[@]}" convert default --draft-layers "$DRAFT_LAYERS" --output "$WORK/draft0" --force --json \
      > "$RES/convert-draft0.json" 2> "$RES/convert-draft0.log" &
fi
wait

# 2. The student: the default recipe with this study's stage lengths, BUDGET_S of training.
write_recipe "$WORK/recipe.yaml" templates/distill-default.yaml "$SEQ" "$MB" "$ACCUM" "$ALIGN_TOK" "$KDM_TOK" "$KDA_TOK"
data="$WORK/text-train.jsonl"
[ -f "$WORK/gen/manifest.json" ] && data="$WORK/gen,$data"
[ -f "$DATA/recall-train.jsonl" ] && data="$data,$DATA/recall-train.jsonl"
stage "distill the student (budget $BUDGET_S s)"
"${MM[@]}" distill "$WORK/h50" --template none --config "$WORK/recipe.yaml" --data "$data" --max-seconds "$BUDGET_S" \
    --output "$WORK/student" --force --json > "$RES/distill-student.json" 2> "$RES/distill-student.log"
stage "distill student exit $?"

# 3. The draft: the student's own greedy samples, then KL to the student on them (templates/distill-draft.yaml).
stage "data generate: the student's own samples ($DRAFT_GEN tokens, greedy)"
"${MM[@]}" data generate "$WORK/student" --prompts "$DATA/prompts-train.jsonl,$WORK/text-train.jsonl" \
    --tokens "$DRAFT_GEN" --batch-size "$GEN_BS" --max-new-tokens "$GEN_NEW" --temperature 0 --seed 1 \
    --output "$WORK/sgen" --force > "$RES/data-generate-student.json" 2> "$RES/data-generate-student.log"
# The same on held-out prompts, a little: the draft's held-out evaluation (KL; a feature draft's greedy agreement
# with the student at its first and second proposal, eval_agree and eval_agree_unrolled) every DRAFT_EVAL_EVERY steps.
# DRAFT_EVAL_GEN=0 leaves it out (TINY does: its 128-token rows hold no held-out chat prompt).
(( DRAFT_EVAL_GEN > 0 )) && "${MM[@]}" data generate "$WORK/student" \
    --prompts "$DATA/prompts-heldout.jsonl,$DATA/text-heldout.jsonl" --tokens "$DRAFT_EVAL_GEN" \
    --batch-size "$GEN_BS" --max-new-tokens "$GEN_NEW" --temperature 0 --seed 2 --output "$WORK/sgen-eval" --force \
    > "$RES/data-generate-student-eval.json" 2> "$RES/data-generate-student-eval.log"
draft_eval=()
(( DRAFT_EVAL_GEN > 0 )) && [ -f "$WORK/sgen-eval/manifest.json" ] && draft_eval=(--eval-data "$WORK/sgen-eval" --eval-every "$DRAFT_EVAL_EVERY")
template=distill-draft
if [ "$DRAFT_KIND" = feature ]; then  # a one-layer draft that reads the student's features (docs/speculative.md)
  stage "convert the student's feature draft"
  "${MM[@]}" convert "$WORK/student" --feature-draft --output "$WORK/draft0" --force --json \
      > "$RES/convert-draft0.json" 2> "$RES/convert-draft0.log"
  template=distill-feature-draft
fi
stage "distill the $DRAFT_KIND draft for acceptance ($template, budget $DRAFT_S s)"
"${MM[@]}" distill "$WORK/draft0" --teacher "$WORK/student" --template "$template" --data "$WORK/sgen" \
    --seq-len "$DRAFT_SEQ" --max-seconds "$DRAFT_S" --fit-to-time "${draft_eval[@]}" --output "$WORK/draft" --force --json \
    > "$RES/distill-draft.json" 2> "$RES/distill-draft.log"
stage "distill draft exit $?"

# 4. Speculative vs plain decoding of the student, held-out prompts, batch 1.
se=(--data "$DATA" --prompts "$PROMPTS" --max-new-tokens "$NEW" --parts-iters "${PARTS_ITERS:-100}")
stage "spec_eval: trained draft, K=$K (plain, host loop, captured round)"
"$PY" benchmarks/spec_eval.py "$WORK/student" --draft "$WORK/draft" -k "$K" "${se[@]}" --json "$RES/spec-eval.json" \
    > /dev/null 2> "$RES/spec-eval.log"
tail -n 5 "$RES/spec-eval.log" | tee -a "$RES/timeline.txt"
for k in $KS; do
  stage "spec_eval: trained draft, K=$k (plain, captured round)"
  "$PY" benchmarks/spec_eval.py "$WORK/student" --draft "$WORK/draft" -k "$k" "${se[@]}" --engines plain,round \
      --json "$RES/spec-eval-k$k.json" > /dev/null 2> "$RES/spec-eval-k$k.log"
done
if [ -n "${UNTRAINED:-}" ]; then
  stage "spec_eval: the untrained $DRAFT_KIND draft, K=$K (plain, captured round)"
  "$PY" benchmarks/spec_eval.py "$WORK/student" --draft "$WORK/draft0" -k "$K" "${se[@]}" --engines plain,round \
      --json "$RES/spec-eval-untrained.json" > /dev/null 2> "$RES/spec-eval-untrained.log"
fi
stage "held-out cross-entropy of the student and the teacher"
head -n "${HELDOUT_N:-1000}" "$DATA/text-heldout.jsonl" > "$WORK/text-heldout.jsonl"
for m in "$WORK/student" default; do
  "$PY" benchmarks/heldout_ce.py "$m" --data "$WORK/text-heldout.jsonl" --seq-len 1024 \
      >> "$RES/heldout.jsonl" 2>> "$RES/heldout.log"
done
# 5. Issue 17's serving line on the same pair of models: SERVE_CLIENTS concurrent clients at SERVE_PROMPT tokens,
# the student and the teacher on the same engine (a Llama teacher is served as an all-attention hybrid).
# SERVE_CLIENTS=0 leaves this step out (the line can be measured on its own: gpu_session.sh park + serve).
(( SERVE_CLIENTS > 0 )) && for m in "$WORK/student" default; do
  name=$(basename "$m")
  stage "serve_load: $name, $SERVE_CLIENTS clients x $SERVE_PROMPT tokens"
  "$PY" benchmarks/serve_load.py "$m" --clients "$SERVE_CLIENTS" --prompt-tokens "$SERVE_PROMPT" \
      --max-tokens "$SERVE_NEW" --requests "$SERVE_REQUESTS" --json "$RES/serve-$name.json" \
      > /dev/null 2> "$RES/serve-$name.log"
  tail -n 1 "$RES/serve-$name.log" >> "$RES/timeline.txt"
done
cp "$WORK/student/training_summary.json" "$RES/summary-student.json" 2>/dev/null
cp "$WORK/draft/training_summary.json" "$RES/summary-draft.json" 2>/dev/null
stage "done"
