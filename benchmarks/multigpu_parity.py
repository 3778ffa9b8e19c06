"""The same short distill on one GPU and on N GPUs under DDP, FSDP and DeepSpeed ZeRO-3 at equal global batch.

The one-GPU run accumulates N micro-batches per step; each N-GPU run takes one micro-batch per GPU, so all see
the same global batch in the same order (the batch plan depends on seed and step only). Their loss curves must
agree within --tol.

    python benchmarks/multigpu_parity.py --teacher /path/to/SmolLM2-135M-Instruct --out runs/parity
    python benchmarks/multigpu_parity.py --random small --out /tmp/parity     # random Llama, no files needed

Writes OUT/parity.json, prints one line per engine, exits 1 when a curve is off (or an engine failed).
Data: the standard library's pydoc topics (builtin:pydoc-topics), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def random_teacher(out: Path, shape: str) -> Path:
    """A random Llama (SmolLM2-135M shape, or a small one) with a character-level ChatML tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_common import char_tokenizer

    if shape == "smollm2":
        dims = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64)
    else:
        dims = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64)
    cfg = LlamaConfig(vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.05, **dims)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])[0].save_pretrained(out)
    return out


def run(cmd: list[str], env: dict, log: Path) -> int:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    with log.open("w") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def curve(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r and "eval_kl" not in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="teacher checkpoint dir, .gguf or 'default' (else --random)")
    ap.add_argument("--random", choices=["small", "smollm2"], default="small",
                    help="shape of the random teacher when --teacher is not given")
    ap.add_argument("--out", default="runs/parity")
    ap.add_argument("--engines", default="ddp,fsdp,zero3")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tol", type=float, default=1e-2)
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    teacher = args.teacher or str(random_teacher(out / "teacher", args.random))
    hybrid = out / "hybrid"
    if run([py, "-m", "mamballama_cli", "convert", teacher, "--ratio", str(args.ratio), "--output", str(hybrid),
            "--force", "--json"], env, out / "convert.log"):
        print(f"convert failed: see {out / 'convert.log'}", file=sys.stderr)
        return 1
    common = ["distill", str(hybrid), "--teacher", teacher, "--data", "builtin:pydoc-topics", "--steps",
              str(args.steps), "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
              "--lr", str(args.lr), "--warmup", "0", "--seed", "0", "--force", "--log-every", "5"]
    results: dict = {"steps": args.steps, "gpus": args.gpus, "tol": args.tol, "teacher": teacher, "runs": {}}
    single_env = {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    code = run([py, "-m", "mamballama_cli", *common, "--gradient-accumulation-steps", str(args.gpus), "--output",
                str(out / "single")], single_env, out / "single.log")
    ref = curve(out / "single")
    results["runs"]["single"] = {"exit": code, "loss": ref}
    if code or len(ref) != args.steps:
        print(f"the one-GPU run failed: see {out / 'single.log'}", file=sys.stderr)
        return 1
    ok = True
    for eng in [e for e in args.engines.split(",") if e]:
        cfg = ROOT / "mamballama_cli" / "templates" / "accelerate" / f"{eng}.yaml"  # the packaged copy
        code = run([py, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--num_processes",
                    str(args.gpus), "-m", "mamballama_cli", *common, "--gradient-accumulation-steps", "1",
                    "--output", str(out / eng)], env, out / f"{eng}.log")
        losses = curve(out / eng)
        diff = max((abs(a - b) for a, b in zip(ref, losses)), default=float("inf"))
        good = code == 0 and len(losses) == len(ref) and diff <= args.tol
        ok &= good
        results["runs"][eng] = {"exit": code, "loss": losses, "max_abs_diff": diff, "ok": good}
        status = "ok" if good else f"FAILED (exit {code}; see {out / (eng + '.log')})"
        print(f"{eng}: {len(losses)} steps, max |loss - one-GPU loss| = {diff:.2e} (tol {args.tol:g}) {status}")
    (out / "parity.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"one GPU: first loss {ref[0]:.4f}, last {ref[-1]:.4f}; details in {out / 'parity.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
