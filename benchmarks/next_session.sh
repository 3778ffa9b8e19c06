#!/usr/bin/env bash
# The next device session's calls, as docs/gpu.md ("Next on the H200") plans them, each branching on the card that
# came: an H200 measures the issues' lines; an H100 runs the gpu suite (which shows it passes, not the H200 lines)
# and brings back the Triton cache. From the project root on the device machine; give each call a limit of 590 s.
#
#   call 1, carrying .whl .gpu .teacher-a .datatgz:  LEFT=<device seconds left> bash benchmarks/next_session.sh 1
#   call 2, carrying .whl .gpu .teacher-b:           bash benchmarks/next_session.sh 2
#   call 3, carrying .whl .gpu .tcache:              bash benchmarks/next_session.sh 3   (again while the study runs)
#   call 4, carrying .whl .gpu:                      LEFT=<device seconds left> bash benchmarks/next_session.sh 4
# Call 1 prints the card; both cards take the same carries.
#
# H200: 1 = the study's prep and, with 1,100 s or more left (LEFT, default 1800), batch-1 decode of hybrid and
# teacher (issue 17; under that the study alone still fits); 2 = the 50% student's study with
# the n-gram table draft (issue 18), started detached; 3 = watch it; 4 = the largest batch at 32K (issue 17), then
# verify against a step at the 8B shape (issue 15), the same without the SwiGLU GEMV's paired tiles (verifynp), as the
# twenty-fourth session ran it (verifyold: no paired tiles, no
# window conv epilogue, no early replay trigger; 1.124x on the H200 then), then with every GEMV kernel's five-row
# tiles chosen in CUDA graphs (verifyg), as far as the time left reaches, then the cache.
# H100: what the gate is worth in quality at 25% attention, the ratio whose decode speed the gate's cost was measured
# at (docs/method.md, "The gate"; at 50% the twenty-ninth session's H100 found 0.4%): 1 = the same prep; 2 = the
# quality study of the default teacher's 25% hybrid with and without the gate (d25kr, d25krng: same placement,
# recipe, data and wall time), started detached; 3, 4 = watch it until it is done and packed. The H100 sessions
# so far measured the H200's lines as proxies (the suite passing, verify 1.06x, the 12.5% hybrid 6.79x its teacher
# at 32K); without the gate the hybrid reads the teacher's bytes at batch 1.
# DRY=1 prints the commands instead.
set -uo pipefail
step=${1:?give the call: 1, 2, 3 or 4}
[[ "$step" =~ ^[1-4]$ ]] || { echo "error: call '$step': give 1, 2, 3 or 4" >&2; exit 2; }
run() { echo "+ $*"; [ -n "${DRY:-}" ] || bash -c "$*"; }
[ -n "${DRY:-}" ] || source .gpu/activate.sh > /dev/null
card=$(nvidia-smi -L 2>/dev/null | head -1)
echo "card: ${card:-none}"
if [ "$step" = 4 ]; then  # the last call's deadline: the device time left, at most a call's 580 s, less 40 for the rest
  left=${LEFT:?give LEFT=device seconds left}
  (( left > 580 )) && left=580
  deadline=$(( left - 40 ))
fi
GATE_STUDY="RUNS='d25kr d25krng' SCRIPT=study_smollm2.sh bash benchmarks/study_device.sh"
if [[ "$card" == *H200* ]]; then
  case "$step" in
    1) run "mkdir -p .data && tar xzf .datatgz/build.tgz -C .data && bash benchmarks/study_device.sh prep"
       if (( ${LEFT:-1800} >= 1100 )); then run "GATE=0 DEADLINE=160 bash benchmarks/gpu_session.sh b1pair"
       else echo "b1pair left out: ${LEFT} s left, under the 1,100 the study and it need"; fi ;;
    2) run "DRAFTS=ngram K=6 KS='' SERVE_CLIENTS=0 HELDOUT_N=0 SCRIPT=spec_study.sh bash benchmarks/study_device.sh start" ;;
    3) run "SCRIPT=spec_study.sh bash benchmarks/study_device.sh watch" ;;
    4) run "RATIO=0.125 MAXBATCH_CONTEXTS=32k DEADLINE=$deadline bash benchmarks/gpu_session.sh maxbatch verify verifynp verifyold verifyg tcache" ;;
  esac
else
  case "$step" in
    1) run "mkdir -p .data && tar xzf .datatgz/build.tgz -C .data && bash benchmarks/study_device.sh prep" ;;
    2) run "$GATE_STUDY start" ;;
    3|4) run "$GATE_STUDY watch" ;;
  esac
fi
