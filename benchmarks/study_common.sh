# What the one-sitting GPU studies share (sourced by study_smollm2.sh and spec_study.sh): the clock and timeline,
# the CLI, the data set, and a recipe written from a template with the study's stage lengths.

# study_init: folders, the start time, the Python and the CLI (WORK, RES set by the study).
study_init() {
  mkdir -p "$WORK" "$RES"
  t0=$(date +%s)
  PY=${PY:-python3}
  MM=("$PY" -m mamballama_cli)
}

# stage TEXT: one timeline line ([seconds since the start] TEXT), also on stdout.
stage() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$RES/timeline.txt"; }

# ensure_data: the environment report, and `data build` into $DATA unless it is there. The report runs in the
# background: on a fresh machine its kernel probes compile for about 190 s (the 2026-12-06 H100 study), which
# the study's first steps need not wait for.
ensure_data() {
  ("${MM[@]}" env > "$RES/env.txt" 2>&1 &)
  [ -f "$DATA/manifest.json" ] || { stage "data build"; "${MM[@]}" data build --output "$DATA" > /dev/null; }
  [ -n "${TINY:-}" ] || "$PY" benchmarks/check_data.py "$DATA" || exit 1  # every source, or numbers that compare
}

# write_recipe OUT TEMPLATE SEQ MB ACCUM TOKENS...: TEMPLATE with the row length, micro-batch, accumulation and
# each stage's tokens (one value: every stage gets it).
write_recipe() {
  "$PY" - "$@" <<'PYEOF'
import sys, yaml
out, template, seq, mb, accum, *tok = sys.argv[1:]
cfg = yaml.safe_load(open(template))
for i, st in enumerate(cfg["stages"]):
    st["tokens"] = float(tok[i] if len(tok) > 1 else tok[0])
cfg.update(seq_len=int(seq), micro_batch_size=int(mb), gradient_accumulation_steps=int(accum))
yaml.safe_dump(cfg, open(out, "w"), sort_keys=False)
PYEOF
}
