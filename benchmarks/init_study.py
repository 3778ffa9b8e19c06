"""Which start of the converted mixers trains fastest? (issue 14, "a sane start"; CPU is enough)

For each start (mamballama_cli.convert.calibrate.InitSpec), on the embedded default teacher's hybrid:
step-0 held-out perplexity (beside the teacher and the dropped-layer baseline), the per-layer relative error,
then the held-out perplexity during teacher-forced layer-wise alignment of every Mamba layer at once
(training/align.py's loss, AdamW), at equal steps. Writes JSON (and a plot with --plot).

    python benchmarks/init_study.py --ratio 0.5 --steps 20 --out docs/results/init-study.json --plot docs/results/init-study.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from mamballama_cli.convert.calibrate import (InitSpec, builtin_documents, calibrate_hybrid, dropped_mixers,
                                              perplexity, token_block)
from mamballama_cli.convert.converter import convert_model
from mamballama_cli.convert.placement import attention_layers_for_ratio
from mamballama_cli.convert.teacher import load_teacher
from mamballama_cli.training import align

STARTS = {
    "paper": InitSpec(conv="random", gate="random", D=1.0, gains=False),
    "paper+gains": InitSpec(conv="random", gate="random", D=1.0, gains=True),
    "identity-conv": InitSpec(conv="identity", gate="random", D=1.0, gains=False),
    "identity-conv,D=0": InitSpec(conv="identity", gate="random", D=0.0, gains=False),
    "identity-conv,D=0,open-gate": InitSpec(conv="identity", gate="open", D=0.0, gains=False),
    "calibrated": InitSpec(),
    "calibrated,no-gate": InitSpec(),  # convert --no-gate: the same start, the mixers without the z projection
}
OVERRIDES = {"calibrated,no-gate": {"mamba_gate": False}}  # hybrid config fields a start changes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--starts", default=";".join(STARTS), help="';'-separated names of STARTS (names hold commas)")
    ap.add_argument("--train-starts", default="paper;paper+gains;calibrated",
                    help="';'-separated starts to align after measuring them")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    teacher, tok, _ = load_teacher(args.teacher, dtype=torch.float32)
    teacher.eval()
    L = teacher.config.num_hidden_layers
    attn = attention_layers_for_ratio(L, args.ratio)
    train_docs = builtin_documents(heldout=False)
    calib = token_block(tok, train_docs, 8, args.seq_len)
    heldout = token_block(tok, builtin_documents(heldout=True), 8, args.seq_len)
    # alignment batches: later windows of the training topics (not the calibration ones)
    pool = token_block(tok, train_docs, 8 + args.batch * args.steps, args.seq_len)[8:]
    if pool.shape[0] < args.batch * args.steps:  # token_block returns what the text holds
        raise SystemExit(f"--steps {args.steps}: the training topics hold {pool.shape[0]} alignment windows of "
                         f"{args.seq_len} tokens, {pool.shape[0] // args.batch} steps of --batch {args.batch}; "
                         "give fewer steps or a smaller batch")
    t_ppl = perplexity(teacher, heldout)
    print(f"teacher held-out perplexity {t_ppl:.2f}", file=sys.stderr)

    wanted = names(args.starts)
    training = names(args.train_starts)
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
              "teacher": args.teacher, "ratio": args.ratio, "attn_layers": attn, "teacher_ppl": t_ppl,
              "heldout_tokens": heldout.numel(), "starts": {}}
    for name in wanted:
        spec = STARTS[name]
        student, _ = convert_model(teacher, attn, dtype=torch.float32, seed=args.seed,
                                   config_overrides=OVERRIDES.get(name))
        t0 = time.perf_counter()
        layers = calibrate_hybrid(student, teacher, calib, spec)
        t_cal = time.perf_counter() - t0
        ppl0 = perplexity(student, heldout)
        with dropped_mixers(student):
            dropped = perplexity(student, heldout)
        rec = {"spec": spec.__dict__, "config": OVERRIDES.get(name, {}),
               "mixer_parameters": sum(p.numel() for layer in student.model.layers if not layer.is_attention
                                       for p in layer.mamba.parameters()),
               "calibration_s": round(t_cal, 2), "step0_ppl": ppl0, "dropped_ppl": dropped,
               "mean_rel_error": sum(r["final"]["rel_error"] for r in layers) / len(layers),
               "mean_norm_ratio": sum(r["final"]["norm_ratio"] for r in layers) / len(layers),
               "layers": layers}
        print(f"{name:32s} step-0 ppl {ppl0:12.1f}  dropped {dropped:8.1f}  rel err {rec['mean_rel_error']:.3f}  "
              f"norm ratio {rec['mean_norm_ratio']:.3f}", file=sys.stderr)
        if name in training:
            rec["curve"] = align_run(student, teacher, pool, heldout, args)
        result["starts"][name] = rec
        del student
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(json.dumps({k: {"step0_ppl": round(v["step0_ppl"], 1), "rel_error": round(v["mean_rel_error"], 3),
                          "curve": [(c["step"], round(c["ppl"], 2)) for c in v.get("curve", [])]}
                      for k, v in result["starts"].items()}, indent=1))


def names(text: str) -> list[str]:
    """';'-separated start names, each one of STARTS."""
    out = [n.strip() for n in text.split(";") if n.strip()]
    unknown = [n for n in out if n not in STARTS]
    if unknown:
        raise SystemExit(f"unknown start(s) {unknown}; choose from {list(STARTS)}")
    return out


def align_run(student, teacher, pool, heldout, args) -> list[dict]:
    """Teacher-forced alignment of every Mamba layer at once (mixers only), held-out perplexity on the way."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for layer in student.model.layers:
        if not layer.is_attention:
            for p in layer.mamba.parameters():
                p.requires_grad_(True)
                params.append(p)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    idx = align.mamba_layer_indices(student)
    curve = [{"step": 0, "ppl": perplexity(student, heldout), "loss": None}]
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = pool[step * args.batch:(step + 1) * args.batch]
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        handles, store = align.capture_layers(teacher, idx)
        with torch.no_grad():
            teacher.model(input_ids=batch)
        for h in handles:
            h.remove()
        student.train()
        loss, n = align.alignment_loss(student, store, torch.ones_like(batch, dtype=torch.bool))
        loss = loss / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        student.eval()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ppl = perplexity(student, heldout)
            curve.append({"step": step + 1, "ppl": ppl, "loss": float(loss.detach()),
                          "seconds": round(time.perf_counter() - t0, 1)})
            print(f"  step {step + 1:4d}  align loss {float(loss.detach()):.4f}  held-out ppl {ppl:.2f}", file=sys.stderr)
    return curve


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rec in result["starts"].items():
        c = rec.get("curve")
        if c:
            ax.plot([p["step"] for p in c], [p["ppl"] for p in c], marker="o", label=name)
    ax.axhline(result["teacher_ppl"], color="k", ls="--", lw=1, label="teacher")
    drop = next(iter(result["starts"].values()))["dropped_ppl"]
    ax.axhline(drop, color="gray", ls=":", lw=1, label="Mamba layers dropped")
    ax.set_yscale("log")
    ax.set_xlabel("alignment steps (8 x 256 tokens, all Mamba layers at once)")
    ax.set_ylabel("held-out perplexity (pydoc topics)")
    ax.set_title(f"starts of the {int(result['ratio'] * 100)}% hybrid, default teacher, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
