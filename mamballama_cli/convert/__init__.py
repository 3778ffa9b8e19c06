"""`mamballama convert`: teacher -> hybrid initialised from attention (design.md sections 1-2)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mamballama_cli.output import console, log, out
from mamballama_cli.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ConvertConfig:
    """Options of `mamballama convert` (also readable from --config FILE)."""

    teacher: str = "default"
    output: str = ""
    ratio: float | None = None  # fraction of layers that keep attention (0.5 when neither this nor attn_layers)
    attn_layers: str | None = None  # explicit list "3,7,11" (overrides ratio); "" or "none" = no attention
    draft_layers: str | None = None  # build a shrunk Transformer draft from these teacher layers instead
    feature_draft: bool = False  # build a one-layer feature (EAGLE-style) draft of the teacher instead
    mixer: str = "mamba2"
    dtype: str = "auto"  # auto = the teacher's stored dtype
    seed: int = 0
    force: bool = False
    init: str = "calibrated"  # calibrated | paper | key=value,... (convert/calibrate.py)
    calibration_seqs: int = 8  # sequences of built-in text that calibrate and measure the converted layers
    calibration_len: int = 256  # tokens per calibration sequence
    placement_score: str = "kl+recall"  # --attn-layers auto: kl | recall | kl+recall (that layer alone converted) | residual
    gate: bool = True  # Mamba-2's z projection and gate; False (--no-gate): none (docs/method.md, "The gate")

    def validate(self) -> None:
        if not self.output:
            raise UsageError("--output is required: the directory to write the hybrid to")
        if self.ratio is not None and not 0.0 <= float(self.ratio) <= 1.0:
            raise UsageError(f"--ratio {self.ratio} is outside [0, 1]; it is the fraction of layers that keep attention")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.mixer not in ("mamba2", "mamba1"):
            raise UsageError(f"--mixer {self.mixer!r} is not supported; use mamba2 (default) or mamba1")
        if self.feature_draft:
            given = [flag for flag, v in (("--draft-layers", self.draft_layers), ("--ratio", self.ratio),
                                          ("--attn-layers", self.attn_layers)) if v is not None]
            if self.mixer != "mamba2":
                given.append("--mixer")
            if given:
                raise UsageError(f"--feature-draft builds a one-layer draft that reads the teacher's features; drop "
                                 f"{' and '.join(given)} (they shape hybrids and cut drafts)")
        if not self.gate and (self.mixer != "mamba2" or self.draft_layers is not None or self.feature_draft):
            what = "--draft-layers" if self.draft_layers is not None else (
                "--feature-draft" if self.feature_draft else f"--mixer {self.mixer}")
            raise UsageError(f"--no-gate drops the Mamba-2 mixers' z projection; it does not apply with {what} "
                             "(drop --no-gate)")
        from mamballama_cli.convert.calibrate import init_spec

        init_spec(self.init)
        if int(self.calibration_seqs) < 1 or int(self.calibration_len) < 16:
            raise UsageError(f"--calibration-seqs {self.calibration_seqs} / --calibration-len "
                             f"{self.calibration_len}: need at least 1 sequence of at least 16 tokens")
        if self.placement_score not in PLACEMENT_SCORES:
            raise UsageError(f"--placement-score {self.placement_score!r} is not one of {', '.join(PLACEMENT_SCORES)}")
        if self.attn_layers is not None and self.attn_layers.strip().lower() == "auto" and self.ratio is None:
            raise UsageError("--attn-layers auto needs --ratio: the fraction of layers that keep attention "
                             "(e.g. --attn-layers auto --ratio 0.5)")


def check_mamba1_teacher(tconfig, d_state: int = 16) -> None:
    """Mamba-1 groups take d_state rows of W_K / W_Q each, so the head dim must be a multiple of d_state."""
    head_dim = getattr(tconfig, "head_dim", None) or tconfig.hidden_size // tconfig.num_attention_heads
    if head_dim % d_state:
        raise UsageError(
            f"--mixer mamba1 needs the teacher's head dim ({head_dim}) to be a multiple of {d_state} "
            "(B and C take 16 rows of W_K / W_Q per group of channels); use --mixer mamba2"
        )


def torch_dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def run_convert(cfg: ConvertConfig) -> dict:
    """Validate everything cheap first, then load, convert, check and save atomically. Returns the summary."""
    from mamballama_cli.convert.placement import resolve_attention_layers
    from mamballama_cli.io import check_output_dir

    out_dir = check_output_dir(cfg.output, cfg.force)
    if cfg.feature_draft:
        from mamballama_cli.convert.feature_draft import run_feature_draft_convert

        return run_feature_draft_convert(cfg, out_dir)
    from mamballama_cli.convert.families import family_for
    from mamballama_cli.convert.teacher import load_teacher, peek_teacher_config

    tconfig, source = peek_teacher_config(cfg.teacher)
    family = family_for(tconfig)
    n_layers = tconfig.num_hidden_layers
    if cfg.mixer == "mamba1" and cfg.draft_layers is None:
        check_mamba1_teacher(tconfig)
    if cfg.draft_layers is not None:
        from mamballama_cli.convert.draft import run_draft_convert

        return run_draft_convert(cfg, out_dir)
    ratio = 0.5 if cfg.ratio is None and cfg.attn_layers is None else cfg.ratio
    auto = cfg.attn_layers is not None and cfg.attn_layers.strip().lower() == "auto"
    attn_layers = resolve_attention_layers(n_layers, ratio, None if auto else cfg.attn_layers)

    import torch

    from mamballama_cli.convert.calibrate import init_spec
    from mamballama_cli.convert.converter import conversion_summary, convert_model

    spec = init_spec(cfg.init)
    teacher, tokenizer, source = load_teacher(cfg.teacher, dtype=torch_dtype(cfg.dtype))
    dtype = torch_dtype(cfg.dtype) or next(teacher.parameters()).dtype
    calib = None
    if spec.needs_data or auto or tokenizer is not None:
        calib = CalibrationRun(teacher, tokenizer, cfg)
    placement = None
    if auto:
        placement = calib.auto_placement(len(attn_layers), spec, cfg.mixer, cfg.seed, cfg.placement_score,
                                         overrides=mixer_overrides(cfg))
        attn_layers = placement["attn_layers"]
    log(f"converting {source.name} ({family.name}, {n_layers} layers) -> {cfg.mixer} hybrid keeping attention in "
        f"{len(attn_layers)} layer(s): {attn_layers}")
    student, report = convert_model(
        teacher, attn_layers, mixer=cfg.mixer, dtype=torch.float32, seed=cfg.seed,
        teacher_info={"name_or_path": source.name, "kind": source.kind}, config_overrides=mixer_overrides(cfg),
    )
    calibration = calib.run(student, spec) if calib is not None else {"init": cfg.init, "measured": False}
    if placement is not None:
        calibration["placement"] = placement
    student = student.to(dtype)
    summary = conversion_summary(teacher, student, report, dtype,
                                 ratio=None if (cfg.attn_layers is not None and not auto) else float(ratio))
    summary["init"] = cfg.init
    summary["calibration"] = calibration
    from mamballama_cli import __version__

    summary["mamballama_version"] = __version__
    return save_conversion(out_dir, student, tokenizer, summary, cfg)


def mixer_overrides(cfg: ConvertConfig) -> dict:
    """The hybrid config's mixer options that `convert`'s own options set."""
    return {} if cfg.gate else {"mamba_gate": False}


def save_conversion(out_dir, model, tokenizer, summary: dict, cfg) -> dict:
    """Write a converted ``model`` (a hybrid or a draft), its tokenizer when there is one, the summary and the
    config into ``out_dir`` atomically; the summary, with the output directory, back."""
    from mamballama_cli.io import atomic_dir, write_json_atomic

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "convert_summary.json", summary)
        write_json_atomic(tmp / "mamballama_config.json", {"command": "convert", **asdict(cfg)})
    summary["output"] = str(out_dir)
    return summary


class CalibrationRun:
    """Built-in calibration text, the teacher on it, and the numbers convert reports (convert/calibrate.py).

    The teacher runs in float32 on CPU (bfloat16 matrix products are slow there and the fit wants the
    precision) or in its own dtype on a CUDA device when one is present.
    """

    def __init__(self, teacher, tokenizer, cfg: ConvertConfig):
        import torch

        from mamballama_cli.convert.calibrate import builtin_documents, token_block

        self.teacher, self.tokenizer = teacher, tokenizer
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.restore = (next(teacher.parameters()).device, next(teacher.parameters()).dtype)
        self.calc_dtype = torch.float32 if self.device.type == "cpu" else self.restore[1]
        if tokenizer is None:
            raise UsageError(f"the teacher {cfg.teacher} has no tokenizer, which calibration needs; "
                             "add tokenizer files or pass --init paper")
        n, L = int(cfg.calibration_seqs), int(cfg.calibration_len)
        self.ids = token_block(tokenizer, builtin_documents(heldout=False), n, L)
        self.heldout = token_block(tokenizer, builtin_documents(heldout=True), n, L)
        self.text = {"source": "CPython pydoc topics (training split of `mamballama data build`)",
                     "sequences": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]),
                     "heldout_source": "pydoc topics held out by `mamballama data build` (5%, seed 0)",
                     "heldout_tokens": int(self.heldout.numel())}

    def _teacher(self):
        return self.teacher.to(device=self.device, dtype=self.calc_dtype)

    def _done(self):
        self.teacher.to(device=self.restore[0], dtype=self.restore[1])

    def run(self, student, spec) -> dict:
        """Calibrate ``student`` in place (float32) and measure it; returns the summary's calibration block."""
        import time

        import torch

        from mamballama_cli.convert.calibrate import calibrate_hybrid, dropped_mixers, perplexity

        t0 = time.perf_counter()
        teacher = self._teacher()
        student.to(self.device)
        try:
            with _progress("calibrating converted layers", len(student.config.mamba_layers)) as tick:
                layers = calibrate_hybrid(student, teacher, self.ids, spec, progress=tick)
            ppl = {"teacher": perplexity(teacher, self.heldout), "hybrid": perplexity(student, self.heldout)}
            if layers:
                with dropped_mixers(student):
                    ppl["mamba_layers_dropped"] = perplexity(student, self.heldout)
        finally:
            student.to("cpu")
            self._done()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mean = (lambda key, part: sum(r[part][key] for r in layers) / len(layers)) if layers else None
        return {
            "init": spec.__dict__, "text": self.text, "measured": True,
            "seconds": round(time.perf_counter() - t0, 2),
            "step0_perplexity": ppl,
            "mean_rel_error": {"mapped": mean("rel_error", "mapped"), "final": mean("rel_error", "final")}
            if layers else None,
            "layers": layers,
        }

    def auto_placement(self, n_keep: int, spec, mixer: str, seed: int, score: str, overrides=None) -> dict:
        """Keep attention in the ``n_keep`` layers whose conversion hurts most.

        Every layer is converted once (calibrated start), then scored with that layer alone converted in the
        teacher: ``kl`` is KL(teacher || converted) per token on the calibration text; ``recall`` is how much
        worse the code tokens of associative-recall probes are predicted (nats per token, clipped at 0);
        ``kl+recall`` adds the two, each divided by its mean over layers; ``residual`` is the layer's calibrated
        relative error against its attention output (no extra forwards).
        """
        import torch
        import torch.nn.functional as F

        from mamballama_cli.convert.calibrate import builtin_documents, calibrate_hybrid, recall_nll, recall_probes
        from mamballama_cli.convert.converter import convert_model

        teacher = self._teacher()
        L = teacher.config.num_hidden_layers
        want_kl, want_recall = score in ("kl", "kl+recall"), score in ("recall", "kl+recall")
        try:
            allm, _ = convert_model(teacher, [], mixer=mixer, dtype=torch.float32, seed=seed,
                                    config_overrides=overrides)
            allm.to(self.device)
            with _progress("placement: converting every layer", L) as tick:
                layers = calibrate_hybrid(allm, teacher, self.ids, spec, progress=tick)
            residual = {r["layer"]: r["final"]["rel_error"] for r in layers}
            kl: dict[int, float] = {}
            recall: dict[int, float] = {}
            probes, base = None, None
            if want_recall:
                probes = recall_probes(self.tokenizer, builtin_documents(heldout=False), int(self.ids.shape[0]),
                                       int(self.ids.shape[1]), seed)
                base = recall_nll(teacher, probes)
            if want_kl or want_recall:
                ids = self.ids.to(self.device)
                with torch.no_grad():
                    ref = F.log_softmax(teacher(input_ids=ids).logits.float(), -1) if want_kl else None
                with _progress(f"placement: {score} with one layer converted", L) as tick:
                    for i in range(L):
                        mixer_mod = allm.model.layers[i].mamba.to(self.calc_dtype)

                        def swap(module, args, kwargs, output, m=mixer_mod):
                            x = args[0] if args else kwargs["hidden_states"]
                            return (m(x),) + tuple(output[1:]) if isinstance(output, tuple) else m(x)

                        h = teacher.model.layers[i].self_attn.register_forward_hook(swap, with_kwargs=True)
                        try:
                            if want_kl:
                                with torch.no_grad():
                                    lp = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
                                kl[i] = float((ref.exp() * (ref - lp)).sum(-1).mean())
                            if want_recall:
                                recall[i] = max(0.0, recall_nll(teacher, probes) - base)
                        finally:
                            h.remove()
                        tick(i)
            scores = combine_scores(score, kl, recall, residual)
            keep = sorted(sorted(scores, key=lambda i: -scores[i])[:n_keep])
        finally:
            self._done()
        return {"method": "auto", "score": score, "attn_layers": keep, "kl_one_layer_converted": kl or None,
                "recall_nll_increase_one_layer_converted": recall or None,
                "recall_nll_teacher": base, "calibrated_rel_error": residual}


PLACEMENT_SCORES = ("kl", "recall", "kl+recall", "residual")


def combine_scores(score: str, kl: dict[int, float], recall: dict[int, float],
                   residual: dict[int, float]) -> dict[int, float]:
    """Per-layer scores for --placement-score (higher = keep attention). ``kl+recall`` divides each part by its
    mean over layers so that neither unit dominates; a part that is zero everywhere adds nothing."""
    if score == "residual":
        return dict(residual)
    if score == "kl":
        return dict(kl)
    if score == "recall":
        return dict(recall)
    def scaled(d: dict[int, float]) -> dict[int, float]:
        mean = sum(d.values()) / len(d) if d else 0.0
        return {i: (v / mean if mean > 0 else 0.0) for i, v in d.items()}
    a, b = scaled(kl), scaled(recall)
    return {i: a.get(i, 0.0) + b.get(i, 0.0) for i in set(a) | set(b)}


class _progress:
    """A rich progress bar on stderr for a known number of steps; ``tick(anything)`` advances it."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from rich.console import Console

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(file=sys.stderr), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.what, total=self.total)
        return lambda _=None: self.bar.advance(task)

    def __exit__(self, *exc):
        self.bar.stop()
        return False


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(summary: dict):
    from rich.table import Table

    what = "draft" if summary.get("kind") in ("draft", "feature-draft") else "hybrid"
    t = Table(title=f"converted {summary['teacher'].get('name_or_path')} -> {summary['output']}", show_header=True)
    t.add_column("")
    t.add_column("teacher", justify="right")
    t.add_column(what, justify="right")
    L = summary["num_layers"]
    L_teacher = summary.get("teacher_num_layers", L)
    n_attn = len(summary["attn_layers"])
    t.add_row("layers", str(L_teacher), str(L) + (f" (teacher layers {summary['draft_layers']})"
                                                  if "draft_layers" in summary else
                                                  f" (from teacher layer {summary['source_layer']})"
                                                  if "source_layer" in summary else ""))
    t.add_row("attention layers", str(L_teacher), f"{n_attn} {summary['attn_layers']}" if what == "hybrid"
              else str(n_attn))
    t.add_row("mamba layers", "0", f"{L - n_attn} ({summary['mixer']})" if what == "hybrid" else "0")
    p = summary["parameters"]
    t.add_row("parameters", f"{p['teacher']:,}", f"{p['hybrid']:,}")
    m = summary["state_memory"]
    t.add_row("K/V bytes per token", format_bytes(m["teacher_kv_bytes_per_token"]),
              format_bytes(m["hybrid_kv_bytes_per_token"]))
    t.add_row("fixed state per sequence", "0 B", format_bytes(m["hybrid_fixed_state_bytes_per_sequence"]))
    for ctx, v in m["at_context"].items():
        t.add_row(f"state at {int(ctx) // 1024}K tokens", format_bytes(v["teacher_bytes"]),
                  format_bytes(v["hybrid_bytes"]))
    cal = summary.get("calibration") or {}
    ppl = cal.get("step0_perplexity")
    if ppl:
        t.add_row(f"held-out perplexity ({cal['text']['heldout_tokens']} tokens)", f"{ppl['teacher']:.2f}",
                  f"{ppl['hybrid']:.2f}")
        if "mamba_layers_dropped" in ppl:
            t.add_row("  with those layers dropped instead", "", f"{ppl['mamba_layers_dropped']:.2f}")
    return t


def layer_table(summary: dict):
    """Per converted layer: relative error and norm ratio against the attention output it replaces."""
    from rich.table import Table

    cal = summary.get("calibration") or {}
    layers = cal.get("layers") or []
    if not layers:
        return None
    init = summary.get("init", "calibrated")
    t = Table(title=f"converted layers vs their attention output ({cal['text']['sequences']} x "
                    f"{cal['text']['seq_len']} tokens of calibration text, teacher-forced)")
    t.add_column("layer", justify="right")
    t.add_column("rel. error, mapped", justify="right")
    t.add_column(f"rel. error, {init} start", justify="right")
    t.add_column("norm ratio", justify="right")
    t.add_column("cosine", justify="right")
    for r in layers:
        t.add_row(str(r["layer"]), f"{r['mapped']['rel_error']:.3f}", f"{r['final']['rel_error']:.3f}",
                  f"{r['final']['norm_ratio']:.3f}", f"{r['final']['cosine']:.3f}")
    return t


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        out(json.dumps(summary, indent=2, default=str))
        return
    console().print(summary_table(summary))
    lt = layer_table(summary)
    if lt is not None:
        console().print(lt)
    print(f"summary written to {Path(summary['output']) / 'convert_summary.json'}", file=sys.stderr)
