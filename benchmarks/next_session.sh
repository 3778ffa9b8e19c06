#!/usr/bin/env bash
# The next device session's calls, as docs/gpu.md ("Next on the H200") plans them, each branching on the card that
# came: an H200 measures the issues' lines; an H100 runs the same gpu suite and verify call as their proxy.
# From the project root on the device machine; give each call a limit of 590 s. Every call carries .whl .gpu .whl-serve
# (and .tcache where this checkout has one: Triton's compiled kernels from an earlier session).
#
#   call 1:  LEFT=<device seconds left> bash benchmarks/next_session.sh 1   (below 640 s: verifyr alone; an H100:
#            piecetest alone)
#   call 2:  bash benchmarks/next_session.sh 2
#   call 3:  bash benchmarks/next_session.sh 3
#   call 4:  LEFT=<device seconds left> bash benchmarks/next_session.sh 4
# Call 1 prints the card.
#
# H200: 1 = issue 17's largest batch at 32K (the 12.5% hybrid against the teacher, same engine) and issue 15's verify
# call at the 8B shape beside the same call without its replay (verifyr; the batch-1 pair without the gate, 236.5
# against 234.5 tok/s there on 2026-12-05, waits on the user's call on the gate); 2, 3 = the whole gpu suite on the
# H200 (issues 15, 17), part1+part2, then part3+part6; 4 = part4+part5 (the large-shape test is in part5) and the
# Triton cache, within LEFT.
# H100 (the gate's quality at 25% attention was measured in the thirty-sixth session): 1 = the gpu tests of the
# prompt-piece graphs and of continuous batching through them (piecetest: the forty-fourth session's H100 passed the
# first, and the second found a piece graph recorded past a short buffer, fixed but not rerun), then the serve and
# chat tests on CUDA (servecuda, carrying .whl-serve: serve's default there is the captured step with piece graphs;
# the prefix cache's 8B next turn, prefixprof, was timed in the forty-fourth session: 14.8 ms; verifyr, an H100
# proxy measured four times, left out);
# 2-4 as on the H200 (part1 and part3-6 passed on an H100 in the forty-first session, part2 in the fortieth). The
# H100 sessions so far measured the H200's lines as proxies (the suite passing, verify 1.037x and 1.049-1.050x, the
# 12.5% hybrid 6.79x its teacher at 32K).
# The verify and speed steps read and write the card's tuning table (gpu_session.sh; $OUT/tuning.json comes back:
# keep it as benchmarks/tuning/<card>.json, and the next cold machine compiles only the tiles it names).
# Deadlines are for a machine without the Triton cache (the thirty-sixth session's verifyr ran out of 240 s
# compiling on a cold H100, and took 134 s on the same machine once call 1 had compiled most of it).
# DRY=1 prints the commands instead.
set -uo pipefail
step=${1:?give the call: 1, 2, 3 or 4}
[[ "$step" =~ ^[1-4]$ ]] || { echo "error: call '$step': give 1, 2, 3 or 4" >&2; exit 2; }
low=1800  # call 1's device seconds left (LEFT); see "by LEFT" below
if [ "$step" = 1 ]; then
  low=${LEFT:-}
  [[ "$low" =~ ^[0-9]+$ ]] || { echo "error: LEFT='$low': call 1 takes LEFT=<device seconds left>, a whole number" >&2; exit 2; }
  # below 240 s no step fits a machine without the Triton cache: the thirty-fifth session's verifyr ran out of its
  # 140 s compiling (the thirtieth's verify needed 139 s); give the machine back instead (docs/gpu.md: do not ask for
  # one with under about 420 s left)
  (( low >= 240 )) || { echo "error: LEFT=$low: under 240 s no step fits a machine without the Triton cache; give it back" >&2; exit 2; }
fi
run() { echo "+ $*"; [ -n "${DRY:-}" ] || bash -c "$*"; }
[ -n "${DRY:-}" ] || source .gpu/activate.sh > /dev/null
card=$(nvidia-smi -L 2>/dev/null | head -1)
echo "card: ${card:-none}"
if [ "$step" = 4 ]; then  # the last call's deadline: the device time left, at most a call's 580 s, less 40 for the rest
  left=${LEFT:?give LEFT=device seconds left}
  (( left > 580 )) && left=580
  deadline=$(( left - 40 ))
fi
# By LEFT: below 640 s there is room for one step (the thirty-third session's eight failed starts cost 180 s each).
short=$(( low > 310 ? 250 : low - 60 ))  # verifyr's deadline where it runs alone
# Per card: call 1's steps (from 640 s left), then the test parts of calls 2, 3 and 4
if [[ "$card" == *H200* ]]; then
  first=("RATIO=0.125 MAXBATCH_CONTEXTS=32k DEADLINE=310 bash benchmarks/gpu_session.sh maxbatch"
         "DEADLINE=250 bash benchmarks/gpu_session.sh verifyr")
else
  first=("JOBS=4 DEADLINE=280 bash benchmarks/gpu_session.sh piecetest"
         "JOBS=4 DEADLINE=280 bash benchmarks/gpu_session.sh servecuda")
fi
alone=verifyr  # below 640 s: one step (an H100: the piece graphs' and continuous batching's gpu tests)
[[ "$card" == *H200* ]] || alone="piecetest"
parts=(part1+part2 part3+part6 part4+part5)
jobs=""; [[ "$card" == *H200* ]] || jobs="JOBS=4 "  # the four piece and batching tests on four workers
case "$step" in
  1) if (( low < 640 )); then run "${jobs}DEADLINE=$short bash benchmarks/gpu_session.sh $alone"
     else for command in "${first[@]}"; do run "$command"; done; fi ;;
  2|3) run "JOBS=6 DEADLINE=560 bash benchmarks/gpu_session.sh ${parts[step - 2]}" ;;
  4) run "JOBS=6 DEADLINE=$deadline bash benchmarks/gpu_session.sh ${parts[2]} tcache" ;;
esac
