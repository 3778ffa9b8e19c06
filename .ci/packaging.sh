#!/usr/bin/env bash
# Packaging job (issue 16): what a user gets from `pip install mamballama`, not from the checkout.
#  1. The wheel, installed non-editable into a fresh venv, converts a tiny teacher and runs
#     `distill --template distill-e2e` in a folder outside the checkout (templates are package data).
#  2. torch==2.13.0 and the extras resolve together from the package index's metadata alone (--dry-run with
#     --use-feature=fast-deps: the index this CI reaches serves no PEP 658 metadata files, so a plain dry run
#     downloads every wheel, about 3 GB with torch's nvidia-* pins, and a CI run failed when the network cut
#     one of them off; with fast-deps pip reads each wheel's METADATA by HTTP range requests, and only the few
#     sdists and their build requirements (about 6 MB) come whole). The gpu extra is left out: mamba-ssm and causal-conv1d are sdists whose
#     metadata needs torch and nvcc at build time, so it cannot be resolved on a CPU machine.
# Variables: PY, TORCH (torch==2.13.0), TORCH_INDEX (empty: pip's configuration, as in the Makefile),
# RESOLVE_INDEX (the public index the resolver check uses alone; https://pypi.org/simple).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
RESOLVE_INDEX=${RESOLVE_INDEX:-https://pypi.org/simple}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mamballama-packaging.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
step() { echo "== packaging: $* ($((SECONDS - start)) s)"; }

step "a fresh venv; build the wheel"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip
"$V/python" -m pip wheel -q --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/mamballama-*.whl)
"$V/python" - "$WHEEL" <<'PY'
import sys, zipfile
from pathlib import Path
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
want = {f"mamballama_cli/{p.as_posix()}" for p in Path(".").glob("templates/**/*.yaml")}
missing = sorted(want - names)
if not want or missing:
    sys.exit(f"the wheel lacks templates: {missing or 'none found in templates/'}; list them in "
             "[tool.setuptools.package-data]")
print(f"{len(want)} templates in {Path(sys.argv[1]).name}")
PY

step "install it non-editable, with $TORCH"
"$V/python" -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH"
"$V/python" -m pip install -q "$WHEEL"

mkdir "$WORK/user" && cd "$WORK/user"     # outside the checkout: nothing can come from $ROOT
"$V/python" - "$ROOT" <<'PY'
import sys
from pathlib import Path
import mamballama_cli
where = Path(mamballama_cli.__file__).resolve()
if Path(sys.argv[1]).resolve() in where.parents or "site-packages" not in where.parts:
    sys.exit(f"mamballama_cli was imported from {where}, not from the installed wheel")
print(f"mamballama_cli from {where.parent}")
PY

step "a tiny teacher, convert, distill --template distill-e2e"
"$V/python" - <<'PY'
import json
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 123)])}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
tok.decoder = decoders.Fuse()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                               unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
LlamaForCausalLM(cfg).save_pretrained("teacher")
fast.save_pretrained("teacher")
with open("train.jsonl", "w") as f:
    for i in range(8):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Name animal {i}."},
                                         {"role": "assistant", "content": f"The cat number {i} sleeps."}]}) + "\n")
PY
"$V/mamballama" convert teacher --ratio 0.5 --output hybrid
"$V/mamballama" templates show distill-e2e > e2e.yaml
"$V/mamballama" distill hybrid --teacher teacher --template distill-e2e --data train.jsonl --output run \
  --steps 2 --seq-len 64 --micro-batch-size 2 --gradient-accumulation-steps 1 --json > summary.json
"$V/python" - <<'PY'
import json, sys
from pathlib import Path
import yaml
from mamballama_cli.training.launch import resolve_accelerate_config
s = json.loads(Path("summary.json").read_text())
cfg = yaml.safe_load(Path("run/run_config.yaml").read_text())
problems = []
if not Path("run/model.safetensors").is_file():
    problems.append("no run/model.safetensors")
given = {"seq_len", "micro_batch_size", "gradient_accumulation_steps", "steps", "epochs"}  # set by flags above
e2e = {k: v for k, v in yaml.safe_load(Path("e2e.yaml").read_text()).items() if k not in given}
differ = sorted(k for k in e2e if cfg.get(k) != e2e[k])
if differ:
    problems.append(f"run_config.yaml differs from distill-e2e in {differ}")
if not resolve_accelerate_config("ddp").is_file():
    problems.append("--accelerate-config ddp not found")
if problems:
    sys.exit("packaging: " + "; ".join(problems))
print("distill-e2e ran from the wheel:", {k: s[k] for k in list(s)[:4]})
PY
cd "$ROOT"

step "resolver: $TORCH with the extras dev,train,eval,gguf,serve from $RESOLVE_INDEX${TORCH_INDEX:+ and $TORCH_INDEX} (metadata only)"
resolve() {
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$V/python" -m pip install --isolated --dry-run "$@" --resume-retries 5 --ignore-installed -q \
    --report "$WORK/resolve.json" \
    --index-url "$RESOLVE_INDEX" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH" ".[dev,train,eval,gguf,serve]"
}
# fast-deps is experimental: a pip that no longer knows it says "invalid choice", and the check runs without it
if ! resolve --use-feature=fast-deps 2> "$WORK/resolve.err"; then
  cat "$WORK/resolve.err" >&2
  grep -q "use-feature: invalid choice" "$WORK/resolve.err" || exit 1
  echo "this pip has no fast-deps: resolving with whole wheels" >&2
  resolve
fi
"$V/python" - "$WORK/resolve.json" "$TORCH" <<'PY'
import json, sys
want = sys.argv[2].split("==")[-1]
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
if got.get("torch", "").split("+")[0] != want:
    sys.exit(f"the resolver picked torch {got.get('torch')}, not {want}")
print(f"resolved {len(got)} packages: torch {got['torch']}, triton {got.get('triton', '-')}, "
      f"deepspeed {got.get('deepspeed')}, lm-eval {got.get('lm-eval', got.get('lm_eval'))}")
PY
step "done"
