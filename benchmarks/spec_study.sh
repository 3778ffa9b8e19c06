#!/usr/bin/env bash
# Issue 18's measurement in one sitting on one GPU: does speculative decoding speed up the default teacher's 50%
# student with the best draft the budget allows?
#
#   teacher-generated data -> the 50% student (convert --attn-layers auto, the default recipe, BUDGET_S of training)
#   -> the student's own greedy samples -> the drafts of DRAFTS trained for acceptance on them, side by side on the
#   one GPU (DRAFT_S of training each): "cut" is cut from the teacher (DRAFT_LAYERS, templates/distill-draft.yaml),
#   "feature" is the student's one-layer feature draft (convert --feature-draft, templates/distill-feature-draft.yaml)
#   -> benchmarks/spec_eval.py per draft: plain vs the captured round over PROMPTS held-out prompts, batch 1, CUDA
#   graphs, at every window of K and KS in one process (and the first draft untrained with UNTRAINED=1), every
#   window also timing a round's parts on their own (benchmarks/round_parts.py) -> the student's held-out
#   cross-entropy for context -> issue 17's serving line: benchmarks/serve_load.py on the student and on the
#   teacher, SERVE_CLIENTS clients at SERVE_PROMPT tokens, same engine.
#   Earlier runs: 2026-12-04 (docs/results/spec-study-2026-12-04) the 4-layer cut gave 1.31x at K=4, K=6 was slower
#   than K=4 and K=2, the untrained cut was kept 0.06% of the time; 2026-12-04 fourth session
#   (benchmarks/results/h200-2026-12-04d) the feature draft alone, trained 136 s teacher-forced, 1.11x. Hence both
#   kinds, measured against each other in one sitting.
#
#   bash benchmarks/spec_study.sh               # one GPU; about 15 minutes on an H200 with the defaults
#   TINY=1 bash benchmarks/spec_study.sh        # a smoke run of every step on CPU
#
# Run on the lent H200 through benchmarks/study_device.sh with SCRIPT=spec_study.sh (prep, start, watch).
# Results in $RES (default $WORK/results): timeline.txt, every command's JSON and log, spec-eval*.json.
# Knobs (environment): WORK, RES, DATA, GEN_TOKENS, GEN_BS, GEN_NEW, BUDGET_S, ALIGN_TOK, KDM_TOK, KDA_TOK, SEQ,
# MB, ACCUM, PLACEMENT, DRAFTS (DRAFT_KIND), DRAFT_LAYERS, DRAFT_GEN, DRAFT_S, DRAFT_EVAL_GEN, DRAFT_EVAL_EVERY, K, KS, UNTRAINED,
# ENGINES, PROMPTS, NEW, PARTS_ITERS, HELDOUT_N,
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
DRAFT_LAYERS=${DRAFT_LAYERS:-0,10,20,29}
# DRAFTS: the drafts trained side by side and measured, each "feature" (convert STUDENT --feature-draft),
# "feature:DECAY" (the same draft, its later training passes weighted DECAY ** k: --unroll-decay), "cut" (the
# teacher's DRAFT_LAYERS), "cut:LAYERS" (e.g. cut:0,6,12,18,24,29), "lookup" / "lookup:N" (no model, nothing to
# train: proposals copied from the context, generation/lookup.py), "lookup:N:gate=M" (the same, speculating only
# from context matches of at least M tokens, one-token rounds elsewhere) or "ngram" / "ngram:N" (the lookup draft with an
# n-gram table of the teacher-generated data, `data ngrams`, where the context has nothing to copy). DRAFT_KIND
# (one kind) is the older knob.
DRAFTS=${DRAFTS:-${DRAFT_KIND:-cut feature}}
ENGINES=${ENGINES:-plain,round}  # add loop for the host loop (a cut draft only)
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

# A draft's name in file names (cut-0-10-20-29: the teacher's layers it keeps; feature) and a cut's layers.
draft_layers() { local spec=$1; [ "$spec" = cut ] && echo "$DRAFT_LAYERS" || echo "${spec#cut:}"; }
draft_name() {
  local spec=$1
  case "$spec" in
    feature) echo feature ;;
    feature:[0-9]*) echo "feature-d${spec#feature:}" ;;
    cut|cut:*) echo "cut-$(draft_layers "$spec" | tr ',' '-')" ;;
    lookup) echo lookup ;;
    lookup:gate=[0-9]*) echo "lookup-gate${spec#lookup:gate=}" ;;
    lookup:[0-9]*:gate=[0-9]*) local n=${spec#lookup:}; echo "lookup-${n%%:*}-gate${spec##*gate=}" ;;
    lookup:[0-9]*) echo "lookup-${spec#lookup:}" ;;
    ngram) echo lookup-table ;;
    ngram:[0-9]*) echo "lookup-table-${spec#ngram:}" ;;
    *) echo "DRAFTS entry '$spec': give feature, feature:DECAY (e.g. feature:0.5), cut, cut:LAYERS (e.g. cut:0,10,20,29), lookup, lookup:N, lookup:N:gate=M, ngram or ngram:N" >&2; exit 2 ;;
  esac
}
for spec in $DRAFTS; do draft_name "$spec" > /dev/null || exit 2; done
# The drafts that are models (trained in step 3); a lookup draft has no weights.
MODEL_DRAFTS=$(for spec in $DRAFTS; do [[ "$spec" == lookup* || "$spec" == ngram* ]] || echo "$spec"; done | xargs)
# What spec_eval reads as --draft: a trained draft's directory, or the lookup provider's name (with the table).
draft_arg() {
  case "$1" in
    lookup*) echo "$1" ;;
    ngram) echo "lookup:3:$WORK/ngrams.safetensors" ;;
    ngram:*) echo "lookup:${1#ngram:}:$WORK/ngrams.safetensors" ;;
    *) echo "$WORK/draft-$(draft_name "$1")" ;;
  esac
}

stage "start: GEN_TOKENS=$GEN_TOKENS BUDGET_S=$BUDGET_S PLACEMENT=\"$PLACEMENT\" DRAFTS=\"$DRAFTS\" DRAFT_LAYERS=$DRAFT_LAYERS DRAFT_GEN=$DRAFT_GEN DRAFT_S=$DRAFT_S K=$K KS=\"$KS\" PROMPTS=$PROMPTS NEW=$NEW"
ensure_data
cp "$DATA/text-train.jsonl" "$WORK/text-train.jsonl"
[ -n "${TINY:-}" ] && head -n 16 "$DATA/text-train.jsonl" > "$WORK/text-train.jsonl"

# 1. The student's start (caches the teacher), then data generation beside the drafts' cuts.
stage "convert the 50% student ($PLACEMENT)"
"${MM[@]}" convert default --ratio 0.5 $PLACEMENT --output "$WORK/h50" $CONVERT_ARGS --force --json \
    > "$RES/convert-h50.json" 2> "$RES/convert-h50.log"
stage "data generate ($GEN_TOKENS tokens) beside the drafts' cuts ($DRAFTS)"
"${MM[@]}" data generate default --prompts "$DATA/prompts-train.jsonl,$WORK/text-train.jsonl" --tokens "$GEN_TOKENS" \
    --batch-size "$GEN_BS" --max-new-tokens "$GEN_NEW" --temperature 1.0 --seed 0 --output "$WORK/gen" --force \
    > "$RES/data-generate.json" 2> "$RES/data-generate.log" &
for spec in $MODEL_DRAFTS; do
  [[ "$spec" == feature* ]] && continue
  name=$(draft_name "$spec")
  "${MM[@]}" convert default --draft-layers "$(draft_layers "$spec")" --output "$WORK/draft0-$name" --force --json \
      > "$RES/convert-draft0-$name.json" 2> "$RES/convert-draft0-$name.log" &
done
wait
ngram_pid=""
if [[ " $DRAFTS" == *" ngram"* ]]; then  # on the CPU, beside the student's distillation
  stage "n-gram table of the generated data (data ngrams), beside the student"
  "${MM[@]}" data ngrams "$WORK/gen" --output "$WORK/ngrams.safetensors" --force > "$RES/ngrams.json" \
      2> "$RES/ngrams.log" &
  ngram_pid=$!
fi

# 2. The student: the default recipe with this study's stage lengths, BUDGET_S of training.
write_recipe "$WORK/recipe.yaml" templates/distill-default.yaml "$SEQ" "$MB" "$ACCUM" "$ALIGN_TOK" "$KDM_TOK" "$KDA_TOK"
data="$WORK/text-train.jsonl"
[ -f "$WORK/gen/manifest.json" ] && data="$WORK/gen,$data"
[ -f "$DATA/recall-train.jsonl" ] && data="$data,$DATA/recall-train.jsonl"
stage "distill the student (budget $BUDGET_S s)"
"${MM[@]}" distill "$WORK/h50" --template none --config "$WORK/recipe.yaml" --data "$data" --max-seconds "$BUDGET_S" \
    --output "$WORK/student" --force --json > "$RES/distill-student.json" 2> "$RES/distill-student.log"
stage "distill student exit $?"

# 3. The drafts: the student's own greedy samples, then KL to the student on them (left out when every draft is a
# lookup draft).
if [ -n "$MODEL_DRAFTS" ]; then
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
# Every draft of DRAFTS trains at once on the one GPU, DRAFT_S each: a draft's training (a small model, micro-batches
# of 8 rows) leaves most of an H200 idle, so side by side they cost about the time of one.
if [[ " $MODEL_DRAFTS " == *" feature"* ]]; then  # a one-layer draft that reads the student's features (docs/speculative.md)
  stage "convert the student's feature draft"
  "${MM[@]}" convert "$WORK/student" --feature-draft --output "$WORK/draft0-feature" --force --json \
      > "$RES/convert-draft0-feature.json" 2> "$RES/convert-draft0-feature.log"
fi
pids=(); names=()
for spec in $MODEL_DRAFTS; do
  name=$(draft_name "$spec"); template=distill-draft; start=$name; extra=()
  if [[ "$spec" == feature* ]]; then
    template=distill-feature-draft; start=feature  # every feature draft starts from the one conversion
    [[ "$spec" == feature:* ]] && extra=(--unroll-decay "${spec#feature:}")
  fi
  stage "distill the $name draft for acceptance ($template ${extra[*]}, budget $DRAFT_S s), beside the others"
  "${MM[@]}" distill "$WORK/draft0-$start" "${extra[@]}" --teacher "$WORK/student" --template "$template" --data "$WORK/sgen" \
      --seq-len "$DRAFT_SEQ" --max-seconds "$DRAFT_S" --fit-to-time "${draft_eval[@]}" --output "$WORK/draft-$name" \
      --force --json > "$RES/distill-draft-$name.json" 2> "$RES/distill-draft-$name.log" &
  pids+=($!); names+=("$name")
done
for i in "${!pids[@]}"; do wait "${pids[$i]}"; stage "distill ${names[$i]} draft exit $?"; done
fi

[ -n "$ngram_pid" ] && { wait "$ngram_pid"; stage "data ngrams exit $?"; }
# 4. Speculative vs plain decoding of the student, held-out prompts, batch 1: per draft one process that measures
# the plain engine once and the captured round at each window of K and KS (benchmarks/spec_eval.py -k 2,3,4).
se=(--data "$DATA" --prompts "$PROMPTS" --max-new-tokens "$NEW" --parts-iters "${PARTS_ITERS:-100}")
ks=$K  # K first: a study cut short by its lease keeps that window's result (spec_eval writes each as it ends)
for k in $KS; do [ "$k" = "$K" ] || ks="$ks,$k"; done
for spec in $DRAFTS; do
  name=$(draft_name "$spec")
  what="the trained $name draft"; [[ "$spec" == lookup* || "$spec" == ngram* ]] && what="the $spec draft (no model)"
  stage "spec_eval: $what, K=$ks ($ENGINES)"
  "$PY" benchmarks/spec_eval.py "$WORK/student" --draft "$(draft_arg "$spec")" -k "$ks" "${se[@]}" --engines "$ENGINES" \
      --json "$RES/spec-eval-$name.json" > /dev/null 2> "$RES/spec-eval-$name.log"
  grep -E "^(plain|speculative|K=)" "$RES/spec-eval-$name.log" | tee -a "$RES/timeline.txt"
done
if [ -n "${UNTRAINED:-}" ] && [ -n "$MODEL_DRAFTS" ]; then
  name=$(draft_name "${MODEL_DRAFTS%% *}"); [[ "$name" == feature* ]] && name=feature  # one untrained feature draft
  stage "spec_eval: the untrained $name draft, K=$K (plain, captured round)"
  "$PY" benchmarks/spec_eval.py "$WORK/student" --draft "$WORK/draft0-$name" -k "$K" "${se[@]}" --engines plain,round \
      --json "$RES/spec-eval-untrained.json" > /dev/null 2> "$RES/spec-eval-untrained.log"
fi
# The student's quality for context (HELDOUT_N=0 leaves it out: about 50 s on the H200, and the same recipe gave
# 34.75 and 34.84 against the teacher's 33.37 in the two studies of 2026-12-04).
if (( ${HELDOUT_N:-1000} > 0 )); then
  stage "held-out cross-entropy of the student and the teacher"
  head -n "${HELDOUT_N:-1000}" "$DATA/text-heldout.jsonl" > "$WORK/text-heldout.jsonl"
  for m in "$WORK/student" default; do
    "$PY" benchmarks/heldout_ce.py "$m" --data "$WORK/text-heldout.jsonl" --seq-len 1024 \
        >> "$RES/heldout.jsonl" 2>> "$RES/heldout.log"
  done
fi
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
for spec in $MODEL_DRAFTS; do
  name=$(draft_name "$spec")
  cp "$WORK/draft-$name/training_summary.json" "$RES/summary-draft-$name.json" 2>/dev/null
done
stage "done"
