"""`mamballama export`: write a hybrid as a standard architecture that stock transformers and vLLM load.

One format today, ``granite-hybrid`` (GraniteMoeHybridForCausalLM, design.md section 7). The output
directory holds config.json, model.safetensors, generation_config.json, the tokenizer files of the source
and export_summary.json (what was mapped, what was checked, what was not).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mamballama_cli.output import console, log, out
from mamballama_cli.errors import MamballamaError, UsageError

FORMATS = ("granite-hybrid",)
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class ExportConfig:
    """Options of `mamballama export` (also readable from --config FILE)."""

    model: str = ""
    output: str = ""
    format: str = "granite-hybrid"
    dtype: str = "auto"  # auto = the hybrid's stored dtype
    verify: bool = True  # reload the export with transformers here and compare logits with the hybrid
    force: bool = False

    def validate(self) -> None:
        if not self.model:
            raise UsageError(
                "MODEL is required: a hybrid checkpoint directory from `mamballama convert`/`distill`"
            )
        if not self.output:
            raise UsageError("--output is required: the directory to write the exported model to")
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format!r} is not supported; use one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if Path(self.output).expanduser().resolve() == Path(self.model).expanduser().resolve():
            raise UsageError("--output must differ from MODEL; the export never overwrites its source")


def _source_dir(spec: str) -> Path:
    """The hybrid's checkpoint directory; anything that is not a mamballama hybrid is refused unloaded."""
    from mamballama_cli.loading import checkpoint_dir

    path = checkpoint_dir(spec)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise MamballamaError(f"model {spec!r}: {path / 'config.json'} is not valid JSON ({exc})") from exc
    if model_type != "mamballama":
        raise MamballamaError(
            f"model {spec!r} has model_type={model_type!r}, not a mamballama hybrid; export converts the "
            "output of `mamballama convert`/`distill` (a plain transformers model is a standard architecture "
            "already)"
        )
    return path


def _caveats(cfg, installed_grouped_norm: bool) -> list[str]:
    out = []
    r = cfg.mamba_n_heads // cfg.mamba_n_groups if cfg.mamba_layers else 1
    if cfg.mamba_layers and cfg.mamba_n_heads > 1:
        from mamballama_cli.export.granite import EXACT_TRANSFORMERS

        out.append(
            f"transformers < {EXACT_TRANSFORMERS} normalises GraniteMoeHybrid's gated RMSNorm over the whole "
            "mixer width instead of per group, so Mamba layers (and the logits) differ there; "
            f"transformers >= {EXACT_TRANSFORMERS} and vLLM group it like the hybrid"
            + (
                ""
                if installed_grouped_norm
                else " (the transformers installed here is such an older release)"
            )
        )
    if r > 1:
        out.append(
            f"x and B are stored once per head instead of once per KV group (x{r}): in_proj and the conv "
            "state of each Mamba layer are larger than the hybrid's, the computation is identical"
        )
    if cfg.mamba_layers and not cfg.attn_layers:
        out.append(
            "all layers are Mamba: transformers' cache for GraniteMoeHybrid needs at least one attention "
            "layer, so config.json and generation_config.json set use_cache=false (generation recomputes "
            "the prefix each step; correct but slow)"
        )
    if cfg.mamba_layers:
        out.append(
            "transformers refuses assisted (speculative) generation for stateful models; use "
            "`mamballama generate --draft` on the hybrid for speculative decoding"
        )
    return out


def run_export(cfg: ExportConfig) -> dict:
    """Validate cheaply, load the hybrid, map it, check names/shapes (and logits), write atomically."""
    from mamballama_cli.io import check_output_dir

    out_dir = check_output_dir(cfg.output, cfg.force)
    src = _source_dir(cfg.model)

    from transformers import AutoConfig

    import mamballama_cli  # noqa: F401  (registers the hybrid with the Auto classes)
    from mamballama_cli.export import granite

    hcfg = AutoConfig.from_pretrained(str(src))
    granite.check_exportable(hcfg)  # refuse before loading any weight

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from mamballama_cli import __version__
    from mamballama_cli.io import atomic_dir, write_json_atomic

    log(f"loading {src} ...")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto", trust_remote_code=False).eval()
    except Exception as exc:
        from mamballama_cli.convert.teacher import unreadable_weights

        if damaged := unreadable_weights(cfg.model, src, exc):
            raise damaged from exc
        raise
    dtype = next(model.parameters()).dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    hcfg = model.config
    gconfig = granite.granite_config(hcfg, dtype)
    if hcfg.mamba_layers and not hcfg.attn_layers:
        gconfig["use_cache"] = False
    tensors = granite.granite_state_dict(model.state_dict(), hcfg, dtype)
    granite.check_against_transformers(gconfig, tensors)
    grouped = granite.transformers_norm_is_grouped()

    summary = {
        "format": cfg.format,
        "architecture": granite.ARCHITECTURE,
        "source": str(src),
        "output": str(out_dir),
        "dtype": str(dtype).replace("torch.", ""),
        "layer_types": gconfig["layer_types"],
        "attn_layers": list(hcfg.attn_layers),
        "mamba_layers": list(hcfg.mamba_layers),
        "teacher": getattr(hcfg, "teacher", {}),
        "gqa_repeat": hcfg.mamba_n_heads // hcfg.mamba_n_groups if hcfg.mamba_layers else 1,
        "tensors": len(tensors),
        "parameters": {
            "hybrid": sum(p.numel() for p in model.parameters()),
            "export": sum(t.numel() for t in tensors.values()),
        },
        "caveats": _caveats(hcfg, grouped),
        "not_verified": [
            "vLLM: GraniteMoeHybridForCausalLM is in-tree in vLLM (dense when num_local_experts = 0, "
            "per-group gated norm), but vLLM could not be installed where this was built, so no vLLM run "
            "checked it"
        ],
        "mamballama_version": __version__,
        "transformers_version": transformers.__version__,
    }

    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", gconfig)
        _write_generation_config(src, tmp, use_cache=gconfig["use_cache"])
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        for name in copied:
            shutil.copyfile(src / name, tmp / name)
        summary["tokenizer_files"] = copied
        if not copied:
            log(f"warning: {src} has no tokenizer files; the export has none either")
        if cfg.verify:
            summary["verification"] = verify_logits(model, tmp, dtype, grouped)
        else:
            summary["verification"] = {"skipped": "--no-verify"}
        write_json_atomic(tmp / "export_summary.json", summary)
        write_json_atomic(tmp / "mamballama_config.json", {"command": "export", **asdict(cfg)})
    return summary


def _write_generation_config(src: Path, dst: Path, use_cache: bool) -> None:
    from mamballama_cli.io import write_json_atomic

    path = src / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    if not use_cache:
        gen["use_cache"] = False
    if gen:
        write_json_atomic(dst / "generation_config.json", gen)


def verify_logits(model, export_dir: Path, dtype, grouped_norm: bool, seqlen: int = 48) -> dict:
    """Reload the export with stock transformers (GraniteMoeHybridForCausalLM) and compare its logits with the
    hybrid's in float32, the hybrid's weights first rounded through the export dtype (both hold the same
    numbers)."""
    import torch

    from mamballama_cli.export.granite import granite_modeling

    GraniteMoeHybridForCausalLM = granite_modeling().GraniteMoeHybridForCausalLM
    log("verifying: reloading the export with transformers and comparing logits ...")
    # Rebind each parameter to a rounded float32 copy (the exported tensors keep the old storage). Parameters
    # only: casting the whole module would also round non-persistent buffers such as the rotary inverse
    # frequencies, which the export recomputes in float32.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype).float()
    ref = model.eval()
    exported = GraniteMoeHybridForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=g)
    with torch.no_grad():
        a = ref(ids).logits
        b = exported(ids, use_cache=False).logits
    diff = (a - b).abs().max().item()
    scale = max(1.0, a.abs().max().item())
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        # A NaN compares false with every tolerance: non-finite logits are a failure whatever the tolerance says.
        which = "the hybrid's" if not torch.isfinite(a).all() else "the export's"
        raise MamballamaError(
            f"export verification failed: {which} logits are not finite (NaN or inf); nothing was written. "
            "Check the hybrid's weights for NaN (e.g. from a diverged training run)"
        )
    exact_expected = grouped_norm or not model.config.mamba_layers
    result = {
        "tokens": seqlen,
        "max_abs_logit_diff": diff,
        "max_abs_logit": a.abs().max().item(),
        "greedy_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }
    if exact_expected:
        result["tolerance"] = tol = 1e-4 * scale
        if not diff <= tol:  # written so that a NaN difference fails too
            raise MamballamaError(
                f"export verification failed: max logit difference {diff:.3g} exceeds {tol:.3g}; "
                "nothing was written. Please report this with the hybrid's config.json"
            )
        result["exact"] = True
    else:
        result["exact"] = False
        result["note"] = (
            "this transformers release normalises the gated RMSNorm over the whole width; the "
            "difference is expected here and vanishes with transformers >= 5.23"
        )
    return result


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        out(json.dumps(summary, indent=2, default=str))
        return
    from rich.table import Table

    t = Table(title=f"exported {summary['source']} -> {summary['output']} ({summary['architecture']})")
    t.add_column("")
    t.add_column("value")
    kinds = summary["layer_types"]
    t.add_row(
        "layers",
        f"{len(kinds)}: {kinds.count('attention')} attention {summary['attn_layers']}, "
        f"{kinds.count('mamba')} mamba",
    )
    t.add_row("dtype", summary["dtype"])
    t.add_row(
        "parameters",
        f"hybrid {summary['parameters']['hybrid']:,} -> export {summary['parameters']['export']:,}",
    )
    v = summary.get("verification", {})
    if "max_abs_logit_diff" in v:
        t.add_row(
            "verification",
            f"max |logit diff| {v['max_abs_logit_diff']:.2e} "
            f"({'exact' if v.get('exact') else 'not exact on this transformers'}), "
            f"greedy agreement {v['greedy_agreement']:.3f}",
        )
    else:
        t.add_row("verification", str(v.get("skipped", "-")))
    console().print(t)
    for c in summary["caveats"] + summary["not_verified"]:
        print(f"note: {c}", file=sys.stderr)
    print(f"summary written to {Path(summary['output']) / 'export_summary.json'}", file=sys.stderr)
