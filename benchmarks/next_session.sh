#!/usr/bin/env bash
# The next device session's calls, as docs/gpu.md ("Next on the H200") plans them, each branching on the card that
# came: an H200 measures the issues' lines; an H100 measures what the gate is worth in quality at 25% attention.
# From the project root on the device machine; give each call a limit of 590 s.
#
#   call 1, carrying .whl .gpu .teacher-a .datatgz:  LEFT=<device seconds left> bash benchmarks/next_session.sh 1
#     (below 640 s, or on an H100 below 1,300 s, call 1 runs what fits instead: see "by LEFT" below)
#   call 2, carrying .whl .gpu .teacher-b:           bash benchmarks/next_session.sh 2
#   call 3, carrying .whl .gpu .tcache:              bash benchmarks/next_session.sh 3   (H100: again while the study runs)
#   call 4, carrying .whl .gpu:                      LEFT=<device seconds left> bash benchmarks/next_session.sh 4
# Call 1 prints the card; both cards take the same carries (the H200's calls leave the teacher and data unused).
#
# H200 (issue 18's line was measured there in the thirtieth session, 2.49x): 1 = issue 17's largest batch at 32K
# (the 12.5% hybrid against the teacher, same engine) and issue 15's verify call at the 8B shape with the replay's
# 8-warp tile among those timed, beside the same call without its replay (verifyr; the batch-1 pair without the
# gate, 236.5 against 234.5 tok/s there on 2026-12-05, waits on the user's call on the gate); 2, 3 = the whole gpu
# suite on the H200 (issues 15, 17), part1+part2, then
# part3+part6; 4 = part4+part5 (the large-shape test is in part5) and the Triton cache, within LEFT. Deadlines are
# for a machine without the Triton cache (the thirtieth session's b1pair ran out of its 160 s compiling).
# H100: what the gate is worth in quality at 25% attention, the ratio whose decode speed the gate's cost was measured
# at (docs/method.md, "The gate"; at 50% the twenty-ninth session's H100 found 0.4%): 1 = the same prep; 2 = the
# quality study of the default teacher's 25% hybrid with and without the gate (d25kr, d25krng: same placement,
# recipe, data and wall time), started detached, after verifyr in call 1 where LEFT leaves the study 1,200 s;
# 3, 4 = watch it until it is done and packed. The H100 sessions
# so far measured the H200's lines as proxies (the suite passing, verify 1.06x, the 12.5% hybrid 6.79x its teacher
# at 32K); without the gate the hybrid reads the teacher's bytes at batch 1.
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
GATE_STUDY="RUNS='d25kr d25krng' SCRIPT=study_smollm2.sh bash benchmarks/study_device.sh"
# A machine that comes late (the thirty-third session's eight starts that failed cost 180 s each, and at 343 s left
# none could be started) gets call 1 by LEFT: below 640 s there is room for one step, and below 1,300 s an H100's
# study cannot finish, so it times verifyr and runs part3 (every replay tile against the reference) instead.
short=$(( low > 310 ? 250 : low - 60 ))  # verifyr's deadline where it runs first
if [[ "$card" == *H200* ]]; then
  case "$step" in
    1) if (( low < 640 )); then run "DEADLINE=$short bash benchmarks/gpu_session.sh verifyr"
       else run "RATIO=0.125 MAXBATCH_CONTEXTS=32k DEADLINE=310 bash benchmarks/gpu_session.sh maxbatch"
            run "DEADLINE=250 bash benchmarks/gpu_session.sh verifyr"; fi ;;
    2) run "JOBS=6 DEADLINE=560 bash benchmarks/gpu_session.sh part1+part2" ;;
    3) run "JOBS=6 DEADLINE=560 bash benchmarks/gpu_session.sh part3+part6" ;;
    4) run "JOBS=6 DEADLINE=$deadline bash benchmarks/gpu_session.sh part4+part5 tcache" ;;
  esac
else
  case "$step" in
    1) if (( low < 1300 )); then run "DEADLINE=$short bash benchmarks/gpu_session.sh verifyr"
            if (( low >= 640 )); then run "JOBS=6 DEADLINE=280 bash benchmarks/gpu_session.sh part3"; fi
       else run "mkdir -p .data && tar xzf .datatgz/build.tgz -C .data && bash benchmarks/study_device.sh prep"
            if (( low - 250 >= 1200 )); then run "DEADLINE=250 bash benchmarks/gpu_session.sh verifyr"; fi; fi ;;
    2) run "$GATE_STUDY start" ;;
    3|4) run "$GATE_STUDY watch" ;;
  esac
fi
