#!/usr/bin/env bash
# The quality study of issue 14 on the embedded default teacher (SmolLM2-135M-Instruct), in one sitting on one GPU:
#
#   teacher-generated data -> convert (calibrated start; RUNS picks the students: 50% and 25%, even spacing or
#   --attn-layers auto, and the paper's start for the paper's recipe) -> distill (the default recipe; the paper's
#   recipe at equal wall time) -> eval (held-out perplexity, agreement, KL, passkey at 1x/4x/20x, greedy answers
#   beside the teacher's) -> report.
#
#   bash benchmarks/study_smollm2.sh                 # one GPU; 17.5 minutes on an H200 with the defaults
#   TINY=1 bash benchmarks/study_smollm2.sh          # a smoke run of every step on CPU (minutes)
#
# Inputs: DATA, a `mamballama data build` output (built here if absent). Results land in $RES (default
# $WORK/results): the timeline, every command's JSON and log, metrics.jsonl of every run, eval reports and
# heatmaps, answers.md, and study.json / curves.png from benchmarks/study_report.py. docs/results.md quotes them.
#
# Knobs (environment): WORK, RES, DATA, GEN_TOKENS (teacher-generated tokens), GEN_BS, GEN_NEW (max new tokens
# per generated sequence), BUDGET_S (wall-clock seconds of training, each of the runs sharing one GPU), RUNS,
# ALIGN_TOK / KDM_TOK / KDA_TOK (the default recipe's stage lengths), PAPER_TOK (each of the paper recipe's two
# stages), SEQ, MB, ACCUM, EVAL_EVERY, EVAL_LEN, PPL_TOKENS, LENGTHS, TRIALS, EVAL_CAP, RECALL.
# RESUME=1 goes on from a study cut short in the same WORK: it keeps the conversions that finished, resumes data
# generation, skips the distill runs that finished and resumes the others from their last checkpoint, each with
# BUDGET_S more seconds; the evaluation and the report run again.
set -uo pipefail
WORK=${WORK:-runs/study}
RES=${RES:-$WORK/results}
DATA=${DATA:-$WORK/data}
if [ -n "${TINY:-}" ]; then
  GEN_TOKENS=${GEN_TOKENS:-3000}; GEN_BS=${GEN_BS:-8}; GEN_NEW=${GEN_NEW:-48}; BUDGET_S=${BUDGET_S:-240}
  ALIGN_TOK=${ALIGN_TOK:-3000}; KDM_TOK=${KDM_TOK:-3000}; KDA_TOK=${KDA_TOK:-3000}; PAPER_TOK=${PAPER_TOK:-4500}
  SEQ=${SEQ:-128}; MB=${MB:-4}; ACCUM=${ACCUM:-1}; EVAL_EVERY=${EVAL_EVERY:-2}; PPL_TOKENS=${PPL_TOKENS:-1024}
  LENGTHS=${LENGTHS:-1x}; TRIALS=${TRIALS:-1}; TEXT_LIMIT=${TEXT_LIMIT:-16}; EVAL_LIMIT=${EVAL_LIMIT:-4}
  ANSWER_N=${ANSWER_N:-16}; EVAL_CAP=${EVAL_CAP:-3600}; EVAL_LEN=${EVAL_LEN:-128}; CONVERT_ARGS=${CONVERT_ARGS:---calibration-seqs 2 --calibration-len 64}
fi
CONVERT_ARGS=${CONVERT_ARGS:-}
GEN_TOKENS=${GEN_TOKENS:-9000000}
GEN_BS=${GEN_BS:-1024}
GEN_NEW=${GEN_NEW:-512}
BUDGET_S=${BUDGET_S:-720}
ALIGN_TOK=${ALIGN_TOK:-2000000}
KDM_TOK=${KDM_TOK:-4000000}
KDA_TOK=${KDA_TOK:-16000000}
PAPER_TOK=${PAPER_TOK:-7000000}
SEQ=${SEQ:-2048}
MB=${MB:-8}
ACCUM=${ACCUM:-2}
EVAL_LEN=${EVAL_LEN:-1024}   # `eval`'s perplexity windows and the all-records measure, whatever SEQ is
EVAL_EVERY=${EVAL_EVERY:-40}
PPL_TOKENS=${PPL_TOKENS:-32768}
LENGTHS=${LENGTHS:-1x,4x,20x}
TRIALS=${TRIALS:-2}
TEXT_LIMIT=${TEXT_LIMIT:-}
EVAL_LIMIT=${EVAL_LIMIT:-}
ANSWER_N=${ANSWER_N:-160}
EVAL_CAP=${EVAL_CAP:-240}   # seconds each evaluation may take at most (a cut one leaves no report, the others go on)
RESUME=${RESUME:-}
RUNS=${RUNS:-d50 d50kr d25kr}   # which students: d50 d50nr d25 d50auto d25auto d50kr d25kr p50 d50ng d50krng d25krng (h50 always converts first; nr: no recall documents; ng: convert --no-gate, Mamba-2 without its z projection)
wants() { [[ " $RUNS " == *" $1 "* ]]; }
source "$(dirname "$0")/study_common.sh"
study_init

stage "start: RUNS=\"$RUNS\" GEN_TOKENS=$GEN_TOKENS BUDGET_S=$BUDGET_S ALIGN_TOK=$ALIGN_TOK KDM_TOK=$KDM_TOK KDA_TOK=$KDA_TOK PAPER_TOK=$PAPER_TOK SEQ=$SEQ MB=$MB ACCUM=$ACCUM"
ensure_data
cp "$DATA/manifest.json" "$RES/data_manifest.json"
if [ -n "$TEXT_LIMIT" ]; then head -n "$TEXT_LIMIT" "$DATA/text-train.jsonl" > "$WORK/text-train.jsonl"
else cp "$DATA/text-train.jsonl" "$WORK/text-train.jsonl"; fi
if [ -n "$EVAL_LIMIT" ]; then head -n "$EVAL_LIMIT" "$DATA/text-heldout.jsonl" > "$WORK/text-heldout.jsonl"
else cp "$DATA/text-heldout.jsonl" "$WORK/text-heldout.jsonl"; fi

# 1. Convert. The first one caches the teacher (GGUF -> safetensors); then data generation and the other
#    conversions run side by side.
stage "convert h50 (calibrated start; caches the teacher)"
conv() {  # conv NAME ARGS...: one conversion of the default teacher into $WORK/NAME (with RESUME, kept if it finished)
  local name=$1; shift
  if [ -n "$RESUME" ] && [ -f "$WORK/$name/config.json" ] && [ -s "$RES/convert-$name.json" ]; then
    stage "convert $name: kept"; return 0
  fi
  "${MM[@]}" convert default "$@" --output "$WORK/$name" $CONVERT_ARGS --force --json > "$RES/convert-$name.json" 2> "$RES/convert-$name.log"
}
conv h50 --ratio 0.5
stage "data generate ($GEN_TOKENS tokens) beside the other conversions (two at a time)"
[ -n "$RESUME" ] || : > "$RES/data-generate.log"  # a resumed step appends to its log
"${MM[@]}" data generate default --prompts "$DATA/prompts-train.jsonl,$WORK/text-train.jsonl" --tokens "$GEN_TOKENS" --batch-size "$GEN_BS" \
    --max-new-tokens "$GEN_NEW" --temperature 1.0 --seed 0 --output "$WORK/gen" "$([ -n "$RESUME" ] && echo --resume || echo --force)" \
    > "$RES/data-generate.json" 2>> "$RES/data-generate.log" &
{ ! wants d25 || conv h25 --ratio 0.25; ! wants p50 || conv h50paper --ratio 0.5 --init paper; } &
{ ! wants d50auto || conv h50auto --ratio 0.5 --attn-layers auto --placement-score kl; ! wants d25auto || conv h25auto --ratio 0.25 --attn-layers auto --placement-score kl; } &
# d50krng / d25krng are d50kr / d25kr without the gate: each takes its gated twin's attention layers when both run,
# since the placement's scores come from each conversion and would otherwise differ with the gate (so would the
# comparison)
kr_layers() { "$PY" -c 'import json, sys; print(",".join(map(str, json.load(open(sys.argv[1]))["attn_layers"])))' \
    "$RES/convert-$1.json"; }
ngconv() {  # ngconv PCT RATIO: the kl+recall student of PCT% attention without the gate
  if wants "d${1}kr" && layers=$(kr_layers "h${1}kr"); then conv "h${1}krng" --attn-layers "$layers" --no-gate
  else conv "h${1}krng" --ratio "$2" --attn-layers auto --placement-score kl+recall --no-gate; fi
}
{ ! wants d50kr || conv h50kr --ratio 0.5 --attn-layers auto --placement-score kl+recall
  ! wants d50krng || ngconv 50 0.5; } &
{ ! wants d25kr || conv h25kr --ratio 0.25 --attn-layers auto --placement-score kl+recall
  ! wants d25krng || ngconv 25 0.25; } &
{ ! wants d50ng || conv h50ng --ratio 0.5 --no-gate; } &
wait
stage "data generate: $(tail -c 400 "$RES/data-generate.log" | tr '\r' '\n' | tail -n 1)"

# 2. Train. The default recipe is templates/distill-default.yaml with the stage lengths of this study; the
#    paper's recipe is benchmarks/study/paper50.yaml. All five runs share the GPU, each under --max-seconds.
write_recipe "$WORK/default-recipe.yaml" templates/distill-default.yaml "$SEQ" "$MB" "$ACCUM" "$ALIGN_TOK" "$KDM_TOK" "$KDA_TOK"
write_recipe "$WORK/paper-recipe.yaml" benchmarks/study/paper50.yaml "$SEQ" "$MB" "$ACCUM" "$PAPER_TOK"
train_data="$WORK/gen,$WORK/text-train.jsonl"
[ -f "$WORK/gen/manifest.json" ] || { train_data="$WORK/text-train.jsonl"; stage "no generated data: training on packaged text only"; }
plain_data=$train_data
# Long-range recall documents from `data build` (RECALL=0 leaves them out; a run named ...nr never reads them).
if [ "${RECALL:-1}" = 1 ] && [ -f "$DATA/recall-train.jsonl" ]; then
  train_data="$train_data,$DATA/recall-train.jsonl"
  stage "training data: generated + packaged text + recall documents ($(wc -l < "$DATA/recall-train.jsonl") records)"
fi
common=(--eval-data "$WORK/text-heldout.jsonl" --eval-every "$EVAL_EVERY" --log-every 10
        --max-seconds "$BUDGET_S" --json)
stage "distill $RUNS side by side (budget $BUDGET_S s each)"
run() {  # run NAME MODEL CONFIG
  local data=$train_data
  [[ $1 == *nr ]] && data=$plain_data
  local how=--force  # with RESUME: a finished run is kept, one with a checkpoint goes on from it
  if [ -n "$RESUME" ] && [ -f "$WORK/run-$1/training_summary.json" ]; then
    echo "distill $1 kept (finished)" >> "$RES/timeline.txt"; return 0
  fi
  [ -n "$RESUME" ] && compgen -G "$WORK/run-$1/checkpoints/step-*" > /dev/null && how=--resume
  [ "$how" = --resume ] || : > "$RES/distill-$1.log"
  "${MM[@]}" distill "$WORK/$2" --template none --config "$3" --output "$WORK/run-$1" --data "$data" "${common[@]}" \
      "$how" > "$RES/distill-$1.json" 2>> "$RES/distill-$1.log"
  local rc=$?
  echo "distill $1 exit $rc" >> "$RES/timeline.txt"
  if [ "$rc" != 0 ] && [ ! -f "$WORK/run-$1/training_summary.json" ] \
      && ckpt=$(compgen -G "$WORK/run-$1/checkpoints/step-*" | sort | tail -n 1); then
    echo "distill $1 cut short: RESUME=1 with the same WORK goes on from ${ckpt##*/}" >> "$RES/timeline.txt"
  fi
}
for r in $RUNS; do
  case $r in
    d50) run d50 h50 "$WORK/default-recipe.yaml" & ;;
    d50nr) run d50nr h50 "$WORK/default-recipe.yaml" & ;;
    d25) run d25 h25 "$WORK/default-recipe.yaml" & ;;
    d50auto) run d50auto h50auto "$WORK/default-recipe.yaml" & ;;
    d25auto) run d25auto h25auto "$WORK/default-recipe.yaml" & ;;
    d50kr) run d50kr h50kr "$WORK/default-recipe.yaml" & ;;
    d25kr) run d25kr h25kr "$WORK/default-recipe.yaml" & ;;
    p50) run p50 h50paper "$WORK/paper-recipe.yaml" & ;;
    d50ng) run d50ng h50ng "$WORK/default-recipe.yaml" & ;;
    d50krng) run d50krng h50krng "$WORK/default-recipe.yaml" & ;;
    d25krng) run d25krng h25krng "$WORK/default-recipe.yaml" & ;;
    *) echo "unknown run $r (known: d50 d50nr d25 d50auto d25auto d50kr d25kr p50 d50ng d50krng d25krng)" >&2 ;;
  esac
done
wait
for r in $RUNS; do
  cp "$WORK/run-$r/metrics.jsonl" "$RES/metrics-$r.jsonl" 2>/dev/null
  cp "$WORK/run-$r/training_summary.json" "$RES/summary-$r.json" 2>/dev/null
done

# 3. Evaluate every student against the teacher (and the teacher alone), side by side.
stage "eval"
ev=(--teacher default --tasks perplexity,passkey --ppl-data "$WORK/text-heldout.jsonl" --ppl-max-tokens "$PPL_TOKENS"
    --ppl-max-length "$EVAL_LEN" --lengths "$LENGTHS" --depths 0,0.5,1 --trials "$TRIALS" --force)
for r in $RUNS; do
  [ -f "$WORK/run-$r/config.json" ] || continue
  timeout "$EVAL_CAP" "${MM[@]}" eval "$WORK/run-$r" "${ev[@]}" --output "$WORK/eval-$r" > "$RES/eval-$r.txt" 2> "$RES/eval-$r.log" &
done
timeout "$EVAL_CAP" "${MM[@]}" eval "$WORK/h50" "${ev[@]}" --tasks perplexity --output "$WORK/eval-h50-start" > "$RES/eval-h50-start.txt" 2> "$RES/eval-h50-start.log" &
timeout "$EVAL_CAP" "$PY" benchmarks/study_answers.py --prompts "$DATA/prompts-heldout.jsonl" -n 5 --max-new-tokens "$ANSWER_N" \
    --models "teacher=default$(for r in $RUNS; do printf ",%s=%s" "$r" "$WORK/run-$r"; done)" \
    --output "$RES/answers.md" > "$RES/answers.log" 2>&1 &
# All held-out records, the first EVAL_LEN tokens of each, for every student and the teacher; and the teacher on
# the runs' own --eval-data (the first SEQ tokens of each record), for the curves' teacher line.
{ for r in teacher $RUNS; do
    m="$WORK/run-$r"; [ "$r" = teacher ] && m=default
    [ "$r" = teacher ] || [ -f "$m/config.json" ] || continue
    timeout "$EVAL_CAP" "$PY" benchmarks/heldout_ce.py "$m" --data "$WORK/text-heldout.jsonl" --seq-len "$EVAL_LEN" \
        > "$RES/heldout-$r.json" 2>> "$RES/heldout.log"
  done
  timeout "$EVAL_CAP" "$PY" benchmarks/heldout_ce.py default --data "$WORK/text-heldout.jsonl" --seq-len "$SEQ" \
      > "$RES/heldout-teacher-seq.json" 2>> "$RES/heldout.log"; } &
wait
for r in $RUNS h50-start; do
  cp "$WORK/eval-$r/results.json" "$RES/eval-$r-results.json" 2>/dev/null
  cp "$WORK/eval-$r/report.md" "$RES/eval-$r-report.md" 2>/dev/null
  for png in "$WORK/eval-$r"/*.png; do [ -f "$png" ] && cp "$png" "$RES/eval-$r-$(basename "$png")"; done
done
stage "report"
"$PY" benchmarks/study_report.py --results "$RES" --out "$RES" > "$RES/report.log" 2>&1
tail -n 30 "$RES/report.log"
stage "done"
