#!/usr/bin/env bash
# One call on the CUDA machine: environment report, the gpu-marked tests, the speed benchmark.
# From the project root, with the wheels in ./.whl and ../shared/gpu copied to ./.gpu:
#     source .gpu/activate.sh && bash benchmarks/gpu_session.sh [STEP ...]
# Steps (in the order given): env, b1 (hybrid batch-1 decode only), b1pair (the hybrid and the teacher at batch 1,
# same static engine, one process: issue 17's line), profile (kernel times of one step),
# profilespec (the same for a plain step and a K=4 verify call at the default teacher's 50% shape, issue 18),
# profilev (the same at the 8B shape: which kernels a verify call adds, issue 15),
# piecetest (the gpu tests of a short prompt's pieces in CUDA graphs and of continuous batching with them),
# servecuda (tests/test_serve.py and tests/test_chat.py on CUDA, where serve and chat capture their steps and read
# prompts through the piece graphs; carry .whl-serve),
# fasttests / optests / modeltests / tests (gpu tests of test_fast_decode, of the ops, the model-level
# fast-vs-reference test, all), full (the whole speed benchmark), verify (one verify call vs one decode step at
# the 8B shape), verifyx (verify with the gemv op's EXTRA tiles offered to its 2-8-row autotuner), verifyg (every
# GEMV kernel's several-row tiles chosen again in CUDA graphs), verifync / verifynt / verifynp / verifyold (verify
# without the window conv epilogue / the replay's early trigger and split-norm preference / the SwiGLU GEMV's paired
# tiles / all three), verifyr (verify, and a K+1-token call without the replay beside it), maxbatch (eval speed --max-batch at 4K and 32K, MAXBATCH_CONTEXTS), prefill32k (batch 24 x 32K
# prompts, the shape that crashed one-piece prefill; now chunked), b1cublas (b1 with the gemv op forced to cuBLAS: the
# A/B of ops/triton_gemv.py), b1nopdl (b1 without the gemv kernels' programmatic-dependent-launch form: its A/B),
# b1noglu (b1 with [gate; up] and SwiGLU apart, not the gemv_swiglu kernel: its A/B), b1noconv (b1 with in_proj
# and the conv apart, not the gemv_conv kernel: its A/B),
# replaytiles (every Mamba-2 replay tile timed at the 8B head: benchmarks/replay_tiles.py), replaystudent (the same at
# the 50% student's head, K = 4 and 6, where the chunked form is a candidate),
# gemvtest (the gemv op's gpu tests alone), gemvtiles (every gemv candidate and ops/triton_gemv.py's EXTRA tiles
# timed against cuBLAS on the 8B shapes; GEMV_EXTRA="16,256,2,4,dot ..." times those instead of EXTRA), park + serve (issue 17's serve line on the default teacher and its 50% hybrid: `park`
# carrying .teacher-a, then `serve` in the next call carrying .teacher-b). Default: env tests full.
# The whole gpu suite in parts of at most 8 minutes each (one or two per device call; docs/gpu.md):
#   part1 (ops), part2 (model, decode, Mamba-1), part3 (verify, speculative), part4 (KD loss, distributed, SwiGLU GEMV,
#   conv GEMV),
#   part5 (large shapes: tens of GiB, kernels compiled and autotuned at those shapes), part6 (the decode GEMV: its
#   fused tiles are chosen by timing, 213-239 s a dtype on a cold machine; in part1 until 2026-12-06, when part1 and
#   part2 run together on an H100 twice left its last three tests unfinished at 460 s).
# Every test file with a gpu mark belongs to exactly one part (tests/test_ops.py checks it). Each part also writes
# times-PART.jsonl, where each test's time went (compiling, autotuning, the timed choices, the rest:
# benchmarks/gpu_test_times.py prints it). tcache packs Triton's compiled kernels into tcache.tgz.partNN (15 MiB each):
# kept in .tcache/ here and carried, they spare a later session's machine the compiles (docs/gpu.md).
# STEP+STEP runs those steps at the same time (e.g. part1+part2: two pytest runs, JOBS workers each), reports after;
# test parts only (anything else is refused: a timed step would share the GPU, and its memory with part5's test).
# JOBS=N runs each part's tests in N pytest-xdist workers on the one GPU (not part5): on a fresh machine most of a part's
# time is Triton compiling and autotuning on the CPU (the first bf16 test of part1 compiled for over 160 s on
# 2026-12-05), which N workers spread over the 16 cores.
# VERIFY_CAP=seconds: the verify step's own cap (default 240; interrupted, it prints where it was).
# TUNING=0: the speed and verify steps time every shape afresh; by default they read and write a tuning table
# (device_common.sh: /tmp/mamballama-tuning.json, begun from benchmarks/tuning/<card>.json; back as $OUT/tuning.json),
# all but the kernel A/Bs (b1cublas, b1nopdl, b1noglu, b1noconv, verifyx/g/nc/nt/np/old), which time afresh.
# DEADLINE=seconds caps the whole session: each step's timeout shrinks to the time left. RATIO= sets the hybrid's
# attention ratio of the speed steps (default 0.25; e.g. RATIO=0.125 maxbatch, see benchmarks/kv_budget.py).
# GATE=0: the speed and verify steps time the hybrid without Mamba-2's z projection (convert --no-gate); their
# files get "-nogate" (e.g. GATE=0 ... b1pair writes speed-b1pair-nogate.json).
# Logs, tables and JSON land in $OUT (default ./out).
set -uo pipefail
STEPS=${*:-env tests full}
source "$(dirname "$0")/device_common.sh"
DEADLINE=${DEADLINE:-3600}
left() {  # timeout for a step: its own cap or the time left before the deadline, whichever is less
    local cap=$1 rest=$(( DEADLINE - ($(date +%s) - t0) - 5 ))
    (( rest < cap )) && cap=$rest
    (( cap < 1 )) && cap=1
    echo "$cap"
}
speed() {  # name, timeout cap, extra args
    local name=$1 cap=$2; shift 2
    [ "${GATE:-1}" = 0 ] && { name="$name-nogate"; set -- "$@" --no-gate; }
    stamp "speed $name: $*"
    # the tuning table, except in a kernel A/B (it would hand both sides the choices the switch is to time afresh)
    local tune=(${TUNING_FILE:+--tuning "$TUNING_FILE"})
    case " $* " in *" --no-pdl "*|*" --no-glu "*|*" --no-gemv-conv "*) tune=() ;; esac
    [ -n "${MAMBALLAMA_REF_OPS:-}" ] && tune=()
    timeout "$(left "$cap")" python3 benchmarks/speed.py --shape llama3-8b --ratio "${RATIO:-0.25}" "$@" \
        "${tune[@]}" --output "$OUT/speed-$name.json" > "$OUT/speed-$name.txt" 2> "$OUT/speed-$name.err"
    echo "exit $?"; keep_tuning; cat "$OUT/speed-$name.txt"; grep -v "^\[" "$OUT/speed-$name.err" | tail -8
    # where a batch-1 step went (benchmarks/step_budget.py), printed so that it survives a lost file; none without
    # a batch-1 row
    for m in hybrid teacher; do python3 benchmarks/step_budget.py "$OUT/speed-$name.json" --model "$m" 2>/dev/null; done
    # the Mamba-2 step kernel's tile the autotuner kept (BLOCK_N x warps / programs a head)
    python3 -c "import json, sys; rows = json.load(open(sys.argv[1]))['rows'];
print('step tiles:', sorted({k + ' -> ' + v for r in rows for k, v in r.get('step_tiles', {}).items()}))" \
        "$OUT/speed-$name.json" 2>/dev/null
    true
}
gputest() {  # name, timeout cap, pytest selection...
    local name=$1 cap=$2; shift 2
    stamp "gpu tests $name"
    local par=()  # JOBS=N: N pytest workers (pytest-xdist) share the one GPU; compiling is what they overlap
    # part5's shapes take tens of GiB: one at a time. worksteal: an idle worker takes tests queued behind a slow one
    # (2026-12-05: part1's two fused-gemv tests, 224 s and 178 s, ran back to back on one worker, 442 s in all)
    [ -n "${JOBS:-}" ] && [ "$name" != part5 ] && par=(-n "$JOBS" --dist worksteal)
    # MAMBALLAMA_GPU_TIMES: a JSON line per test, where its time went (tests/gpu_times.py), summed below.
    # TRITON_CACHE_AUTOTUNING: each autotuner's timings go into the Triton cache beside the kernels, keyed by the
    # kernel's source, the tuning key and the candidates, so the workers and a later machine carrying .tcache skip
    # the tuning (the largest share of most parts on 2026-12-06). Tests only: the tile a test runs is checked
    # against its reference whichever it is, while the benchmarks (speed, verify) still tune on their own card.
    TRITON_CACHE_AUTOTUNING=1 MAMBALLAMA_GPU_TIMES="$OUT/times-$name.jsonl" timeout "$(left "$cap")" python3 -m pytest -v -rfE --durations=8 \
        -m "${MARK:-gpu}" -p no:cacheprovider -o addopts="" "${par[@]}" "$@" > "$OUT/tests-$name.log" 2>&1
    echo "pytest exit $?"; grep -E "PASSED|FAILED|ERROR|passed|failed|error" "$OUT/tests-$name.log" | tail -40
    [ -s "$OUT/times-$name.jsonl" ] && python3 benchmarks/gpu_test_times.py "$OUT/times-$name.jsonl" --top 6
    true
}

serve_wheels() {  # fastapi, uvicorn and openai (the serve extra, and the client its tests use) from wheels carried in
    # .whl-serve, where the image lacks them (docs/gpu.md says how to download them)
    python3 -c "import fastapi, uvicorn, openai" 2>/dev/null || python3 -m pip install -q --no-index \
        --find-links .whl-serve fastapi uvicorn openai || echo "note: no fastapi/uvicorn/openai: carry .whl-serve"
}

serve_pair() {  # issue 17's serve line: the default teacher and its 50% hybrid, SERVE_CLIENTS clients at SERVE_PROMPT
    # tokens, same engine (needs `park` in an earlier call on this machine, carrying .teacher-a; this one carries
    # .teacher-b)
    stamp "serve: convert the default teacher's 50% hybrid"
    serve_wheels
    assemble_teacher
    timeout "$(left 240)" python3 -m mamballama_cli convert default --ratio 0.5 --output /tmp/h50 --force --json \
        > "$OUT/serve-convert.json" 2> "$OUT/serve-convert.log"; echo "convert exit $?"
    local m name
    for m in /tmp/h50 default; do
        name=$(basename "$m")
        stamp "serve_load: $name, ${SERVE_CLIENTS:-32} clients x ${SERVE_PROMPT:-4096} tokens"
        timeout "$(left 300)" python3 benchmarks/serve_load.py "$m" --clients "${SERVE_CLIENTS:-32}" \
            --prompt-tokens "${SERVE_PROMPT:-4096}" --max-tokens "${SERVE_NEW:-128}" --requests "${SERVE_REQUESTS:-64}" \
            --json "$OUT/serve-$name.json" > /dev/null 2> "$OUT/serve-$name.log"
        echo "exit $?"; tail -n 2 "$OUT/serve-$name.log"
    done
}

together() {  # "part1+part2": the named steps at once, each in its own run of this script (its own pytest and
    # workers; the parts compile on the CPU, which the 16 cores share), with the time left; their reports after
    local step=$1 s pids=() rest=$(( DEADLINE - ($(date +%s) - t0) - 5 ))
    stamp "together: ${step//+/, }"
    for s in ${step//+/ }; do
        GS_CHILD=1 DEADLINE=$rest bash "$0" "$s" > "/tmp/gpu-session-$s.out" 2>&1 & pids+=($!)
    done
    wait "${pids[@]}"
    for s in ${step//+/ }; do echo "== $s"; cat "/tmp/gpu-session-$s.out"; done
}

for step in $STEPS; do  # before anything runs: only test parts run together (a step that times or loads a model
    # would share the GPU; verify beside part4, part5 and part6 left part5's large-shape test 16 GB short on an H100
    # in the thirty-first session)
    [[ "$step" == *+* ]] || continue
    for s in ${step//+/ }; do
        [[ "$s" =~ ^part[0-9]$ ]] || { echo "error: '$s' in '$step' is not a test part; only test parts run" \
            "together: give '$s' as a step of its own" >&2; exit 2; }
    done
done
for step in $STEPS; do
    case $step in
        *+*) together "$step" ;;
        env) stamp env; python3 -m mamballama_cli env > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt" ;;
        b1) speed b1 200 --models hybrid --batch-sizes 1 --contexts "" ;;
        b1pair) speed b1pair 320 --models hybrid,teacher --teacher-engines static --batch-sizes 1 --contexts "" ;;
        b1cublas) MAMBALLAMA_REF_OPS=gemv speed b1cublas 200 --models hybrid --batch-sizes 1 --contexts "" ;;
        b1nopdl) speed b1nopdl 200 --no-pdl --models hybrid --batch-sizes 1 --contexts "" ;;
        b1noglu) speed b1noglu 200 --no-glu --models hybrid --batch-sizes 1 --contexts "" ;;
        b1noconv) speed b1noconv 200 --no-gemv-conv --models hybrid --batch-sizes 1 --contexts "" ;;
        park) mkdir -p /tmp/teacher && cp .teacher-a/part_aa /tmp/teacher/ && ls -la /tmp/teacher ;;
        serve) serve_pair ;;
        profile) stamp profile; timeout "$(left 120)" python3 benchmarks/profile_step.py > "$OUT/profile.txt" 2>&1
                 echo "exit $?"; head -40 "$OUT/profile.txt" ;;
        profilev) stamp "profile: plain step and K=4 verify call at the 8B shape (issue 15's verify line)"
                 timeout "$(left 200)" python3 benchmarks/profile_step.py --verify 4 > "$OUT/profile-verify.txt" 2>&1
                 echo "exit $?"; grep -E "ms|tok/s" "$OUT/profile-verify.txt" | head ;;
        profilespec) stamp "profile: plain step and verify call at the default teacher's 50% shape"
                 timeout "$(left 150)" python3 benchmarks/profile_step.py --shape smollm2-135m --ratio 0.5 --verify 4 \
                     > "$OUT/profile-spec.txt" 2>&1; echo "exit $?"; grep -E "ms|tok/s" "$OUT/profile-spec.txt" | head ;;
        prefixprof) stamp "prefix cache at the 8B shape: a chat's next turn from the kept state, timed and profiled"
                 timeout "$(left 240)" python3 benchmarks/prefix_cache.py --shape llama3-8b --ratio 0.25 --context 4096 \
                     --turn 128 --reps 2 --json "$OUT/prefix-cache-8b.json" --profile "$OUT/prefix-cache-profile.txt" \
                     > "$OUT/prefix-cache.txt" 2>&1; echo "exit $?"; grep -v "^USDT\|Activity" "$OUT/prefix-cache.txt" | tail -4
                 grep -E "phases|against the forward" "$OUT/prefix-cache.txt"
                 grep -E "prefix_cache\.|  prefill |runtime\.read_on|slot\.copy_in|Self CPU time total|Self CUDA time total" \
                     "$OUT/prefix-cache-profile.txt" 2>/dev/null | cut -c1-200 | head -14 ;;
        fasttests) gputest fast 150 tests/test_fast_decode.py ;;
        piecetest) gputest pieces 300 tests/test_fast_decode.py -k "piece_graphs or continuous_batching" ;;
        servecuda) serve_wheels  # the serve and chat tests (CPU tests) on CUDA: captured steps and piece graphs
                 MARK="not slow" gputest servecuda 300 tests/test_serve.py tests/test_chat.py ;;
        optests) gputest ops 300 tests/test_gpu_ops.py -k "not hybrid_forward_backward" ;;
        modeltests) gputest model 150 tests/test_gpu_ops.py -k hybrid_forward_backward ;;
        tests) gputest all 400 tests/test_gpu_ops.py tests/test_fast_decode.py ;;
        full) speed full 400 ${SPEED_ARGS:-} ;;
        verify|verifyx|verifyg|verifync|verifynt|verifynp|verifyold|verifyr) nv=1; v="speculative-$step${GATE:+$( [ "$GATE" = 0 ] && echo -nogate )}"  # a repeat: -2, -3, ...
                base=$v; while [ -e "$OUT/$v.json" ] || [ -e "$OUT/$v.txt" ]; do nv=$(( nv + 1 )); v="$base-$nv"; done
                # verifyx: the same with the gemv op's EXTRA tiles offered to its autotuner (the A/B for SKINNY);
                # verifyg: with every GEMV kernel's several-row tiles chosen again in CUDA graphs (ops/gemv_tuning.py);
                # verifync: the window's in_proj and conv apart; verifynt: the replay without its early trigger and
                # the fastest replay tile, split-norm or not; verifynp: the SwiGLU GEMV without its paired tiles
                # (twenty-seventh session); verifyold: all three, as before the twenty-fourth session's cuts, for the
                # A/B on one machine; verifyr: also a K+1-token call without the replay (--no-replay-call), what
                # the call would cost if every layer's replay left the layer walk
                case $step in
                    verifync) ab="--no-spec-conv" ;;
                    verifynt) ab="--no-replay-trigger --replay-norm-margin 0" ;;
                    verifynp) ab="--no-paired-glu" ;;
                    verifyold) ab="--no-spec-conv --no-replay-trigger --replay-norm-margin 0 --no-paired-glu" ;;
                    verifyr) ab="--no-replay-call" ;;
                    *) ab="" ;;
                esac
                stamp "$step vs plain step (8B shape, K=4), run $nv"
                timeout -s INT -k 10 "$(left "${VERIFY_CAP:-240}")" python3 benchmarks/speculative_verify.py --shape 8b --k 4 --context 512 \
                    --loop-tokens 64 $( [ "$step" = verifyx ] && echo --gemv-extra ) \
                    $( [ "$step" = verifyg ] && echo --gemv-graph-tiles ) $ab \
                    $( [ "${GATE:-1}" = 0 ] && echo --no-gate ) \
                    $( [[ "$step" == verify || "$step" == verifyr ]] && [ -n "$TUNING_FILE" ] && echo --tuning "$TUNING_FILE" ) \
                    --json "$OUT/$v.json" > "$OUT/$v.txt" 2>&1
                echo "exit $?"; keep_tuning; tail -20 "$OUT/$v.txt"
                # the replay kernel's tile per shape and the timings behind it, and the window conv GEMV's choice
                # (printed: a lost file keeps them)
                python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print('replay tiles:', d.get('replay_tiles'));
print('replay timings (us a call):', d.get('replay_timings'));
print('window conv in in_proj:', d.get('gemv_spec_conv_shapes'), d.get('gemv_spec_conv_timings'))" "$OUT/$v.json" 2>/dev/null ;;
        maxbatch) speed maxbatch 500 --max-batch --contexts "${MAXBATCH_CONTEXTS:-4k,32k}" --context-new-tokens 32 ;;
        prefill32k) speed prefill32k 300 --models hybrid --batch-sizes 24 --prompt-tokens 32768 --new-tokens 8 \
                        --contexts "" ;;
        replaytiles) stamp "every replay tile at the 8B head, K=4 window, plain and gated, slotted and not"
                timeout -s INT -k 10 "$(left 400)" python3 benchmarks/replay_tiles.py --json "$OUT/replay-tiles.json" \
                    > "$OUT/replay-tiles.txt" 2>&1; echo "exit $?"; cat "$OUT/replay-tiles.txt" ;;
        replaystudent) stamp "every replay tile at the 50% student's head (9 x 64 x 64), K=4 and K=6, no final state"
                timeout -s INT -k 10 "$(left 300)" python3 benchmarks/replay_tiles.py --shape student --k 4,6 \
                    --no-final --json "$OUT/replay-student.json" > "$OUT/replay-student.txt" 2>&1; echo "exit $?"
                cat "$OUT/replay-student.txt" ;;
        gemvtest) gputest gemv 300 tests/test_gemv_op.py tests/test_gemv_swiglu.py ;;
        gemvtiles) stamp "every gemv tile on the 8B decode and verify shapes, against cuBLAS"
                timeout "$(left 240)" python3 benchmarks/gemv_tiles.py --json "$OUT/gemv-tiles.json" \
                    ${GEMV_EXTRA:+--extra $GEMV_EXTRA} > "$OUT/gemv-tiles.txt" 2>&1; echo "exit $?"; grep -E "best|error" "$OUT/gemv-tiles.txt" | head -20 ;;
        part1) gputest part1 480 tests/test_gpu_ops.py tests/test_tuning.py -k "not hybrid_forward_backward" ;;
        part2) gputest part2 480 tests/test_gpu_ops.py tests/test_fast_decode.py tests/test_mamba1_gpu.py \
                   -k "hybrid_forward_backward or test_fast_decode or test_mamba1_gpu" ;;
        part3) gputest part3 480 tests/test_verify_ops.py tests/test_speculative_gpu.py tests/test_commit_op.py \
                   tests/test_feature_round.py tests/test_lookup_draft.py tests/test_ngram_table.py ;;
        part4) gputest part4 480 tests/test_kd_fused.py tests/test_train_distributed.py tests/test_gemv_swiglu.py \
                   tests/test_gemv_conv.py tests/test_gemv_spec_conv.py tests/test_graph_retile.py ;;
        part5) gputest part5 480 tests/test_large_shapes_gpu.py ;;
        part6) gputest part6 480 tests/test_gemv_op.py ;;
        tcache) stamp "triton cache: this machine's compiled kernels, in pieces for .tcache (benchmarks/triton_cache.py)"
                python3 benchmarks/triton_cache.py pack --out "$OUT" ;;
        *) echo "unknown step $step" ;;
    esac
done
[ -n "${GS_CHILD:-}" ] && { stamp done; exit 0; }  # a step run by together(): the parent lists and packs
ls -la "$OUT"
# The device returns at most 8 files a call: past that, pack every file into one archive so that none is left
# behind (the fifteenth session lost speed-b1pair.json and a test log to the limit).
# The Triton cache's pieces (tcache) stay apart: each is already as large as a file may be.
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if [ "$n" -gt 8 ]; then
    (cd "$OUT" && tar -czf session.tar.gz --remove-files $(find . -maxdepth 1 -type f ! -name session.tar.gz \
        ! -name 'tcache.tgz.part*' -printf '%P\n'))
    echo "$n files packed into session.tar.gz"; ls -la "$OUT"
fi
stamp done
