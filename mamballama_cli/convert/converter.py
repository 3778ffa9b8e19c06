"""Teacher -> hybrid conversion: apply a family's mapping table and prove it consumed everything."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from mamballama_cli.convert.families import TeacherFamily, family_for
from mamballama_cli.errors import MamballamaError
from mamballama_cli.models.configuration import MamballamaConfig
from mamballama_cli.models.modeling import MamballamaForCausalLM


class ConversionError(MamballamaError):
    pass


@dataclass
class ConversionReport:
    family: str
    attn_layers: list[int]
    mamba_layers: list[int]
    copied: list[tuple[str, str]] = field(default_factory=list)  # (teacher key, student key[:role])
    dropped: list[str] = field(default_factory=list)  # teacher keys deliberately not carried over
    fresh: list[str] = field(default_factory=list)  # student parameters (or row ranges) initialised fresh


class _Coverage:
    """Tracks which rows of each student tensor were written, to prove nothing was left uninitialised."""

    def __init__(self, model: nn.Module):
        self.rows = {name: torch.zeros(p.shape[0] if p.dim() else 1, dtype=torch.bool)
                     for name, p in model.named_parameters(remove_duplicate=False)}

    def mark(self, name: str, rows: slice | None) -> None:
        self.rows[name][rows if rows is not None else slice(None)] = True

    def missing(self) -> list[str]:
        out = []
        for name, cov in self.rows.items():
            if not bool(cov.all()):
                idx = (~cov).nonzero().flatten()
                out.append(name if bool((~cov).all()) else f"{name}[rows {int(idx[0])}..{int(idx[-1])}]")
        return out


def hybrid_config_for(teacher_config, family: TeacherFamily, attn_layers: list[int], mixer: str = "mamba2",
                      teacher_info: dict | None = None, **overrides) -> MamballamaConfig:
    kwargs = family.hybrid_config(teacher_config)
    kwargs.update(attn_layers=list(attn_layers), mixer=mixer, teacher=teacher_info or {}, **overrides)
    return MamballamaConfig(**kwargs)


@torch.no_grad()
def convert_model(
    teacher: nn.Module,
    attn_layers: list[int],
    *,
    mixer: str = "mamba2",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    teacher_info: dict | None = None,
    family: TeacherFamily | None = None,
    config_overrides: dict | None = None,
) -> tuple[MamballamaForCausalLM, ConversionReport]:
    """Build the hybrid from a loaded teacher (any registered family).

    Attention layers in ``attn_layers`` are copied verbatim; every other layer's attention becomes a Mamba
    mixer via the family's role table; embeddings, norms, MLPs and the head are copied. Raises
    ConversionError naming any teacher key not consumed (nor deliberately dropped) and any student
    parameter rows neither copied nor initialised fresh.
    """
    tc = teacher.config
    family = family or family_for(tc)
    if family.check is not None:
        family.check(tc)
    dtype = dtype or next(teacher.parameters()).dtype
    info = {"family": family.name, "model_type": tc.model_type, **(teacher_info or {})}
    cfg = hybrid_config_for(tc, family, attn_layers, mixer=mixer, teacher_info=info, **(config_overrides or {}))

    torch.manual_seed(seed)
    student = MamballamaForCausalLM(cfg).to(torch.float32)
    for layer in student.model.layers:
        if not layer.is_attention:
            layer.mamba.reset_fresh_parameters()

    table = family.mapping
    tsd = teacher.state_dict()
    student_params = dict(student.named_parameters(remove_duplicate=False))
    coverage = _Coverage(student)
    consumed: set[str] = set()
    report = ConversionReport(family.name, cfg.attn_layers, cfg.mamba_layers)

    def copy(tkey: str, skey: str, optional: bool) -> None:
        if tkey not in tsd:
            if optional:
                return
            raise ConversionError(f"teacher checkpoint lacks {tkey}, which the {family.name} family requires")
        if skey not in student_params:
            raise ConversionError(f"teacher has {tkey} but the hybrid has no {skey} to receive it")
        src, dst = tsd[tkey], student_params[skey]
        if src.shape != dst.shape:
            raise ConversionError(f"{tkey} {tuple(src.shape)} does not fit {skey} {tuple(dst.shape)}")
        dst.copy_(src.to(dst.dtype))
        consumed.add(tkey)
        coverage.mark(skey, None)
        report.copied.append((tkey, skey))

    for skey, tkey in table.shared.items():
        copy(tkey, skey, optional=skey in table.optional or tkey in table.optional)
    for i, layer in enumerate(student.model.layers):
        pre = f"model.layers.{i}."
        for skey, tkey in table.per_layer.items():
            copy(pre + tkey, pre + skey, optional=tkey in table.optional)
        if layer.is_attention:
            for skey, tkey in table.attention.items():
                copy(pre + tkey, pre + skey, optional=tkey in table.optional)
            continue
        mixer_mod = layer.mamba
        targets = mixer_mod.role_targets()
        for role, tkey in table.mamba_roles.items():
            full = pre + tkey
            if full not in tsd:
                if tkey in table.optional:
                    continue
                raise ConversionError(f"teacher checkpoint lacks {full}, which the {family.name} family requires")
            if role not in targets:
                raise ConversionError(
                    f"{full} has role {role!r}, which the {cfg.mixer} mixer cannot hold; "
                    f"it accepts {sorted(targets)}"
                )
            try:
                mixer_mod.assign_role(role, tsd[full])
            except ValueError as exc:
                raise ConversionError(f"{full}: {exc}") from exc
            consumed.add(full)
            pname, rows = targets[role]
            coverage.mark(f"{pre}mamba.{pname}", rows)
            report.copied.append((full, f"{pre}mamba.{pname}:{role}"))
        for pname, rows in mixer_mod.fresh_targets():
            coverage.mark(f"{pre}mamba.{pname}", rows)
            report.fresh.append(f"{pre}mamba.{pname}" + ("" if rows is None else f"[{rows.start}:{rows.stop}]"))
        # The attention weights of a Mamba layer are consumed through roles; biases without a role are
        # reported below unless the family lists them as dropped.

    if cfg.tie_word_embeddings:
        coverage.mark("lm_head.weight", None)  # tied to model.embed_tokens.weight
    dropped_res = [re.compile(p) for p in table.dropped]
    leftovers = []
    for key in tsd:
        if key in consumed:
            continue
        if any(r.search(key) for r in dropped_res):
            report.dropped.append(key)
            continue
        if key == "lm_head.weight" and getattr(tc, "tie_word_embeddings", False):
            report.dropped.append(key)  # the same tensor as the embeddings
            continue
        leftovers.append(key)
    if leftovers:
        shown = ", ".join(leftovers[:8]) + (f" (+{len(leftovers) - 8} more)" if len(leftovers) > 8 else "")
        raise ConversionError(
            f"the {family.name} mapping left {len(leftovers)} teacher tensor(s) unused: {shown}; "
            "extend the family's table or list them as dropped"
        )
    missing = coverage.missing()
    if missing:
        raise ConversionError(f"hybrid parameters neither copied nor initialised: {', '.join(missing[:8])}")

    student = student.to(dtype)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = teacher.generation_config
    return student.eval(), report


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


def memory_summary(cfg, dtype: torch.dtype) -> dict:
    """Bytes of decoding state: K/V per token (attention layers) and fixed state per sequence (Mamba)."""
    elt = torch.finfo(dtype).bits // 8
    n_attn = len(cfg.attn_layers)
    kv_per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * elt
    if cfg.mixer == "mamba2":
        conv = cfg.mamba_conv_dim * (cfg.mamba_d_conv - 1) * elt
        ssm = cfg.mamba_n_heads * cfg.mamba_headdim * cfg.mamba_d_state * 4  # float32 state
    else:  # Mamba1Mixer.allocate_state: conv over x only (n_kv * d channels), state (d_inner, d_state) in fp32
        d_x = cfg.mamba_n_groups * cfg.mamba_headdim
        d_inner = cfg.mamba_n_heads * cfg.mamba_headdim
        conv = d_x * (cfg.mamba_d_conv - 1) * elt
        ssm = d_inner * cfg.mamba1_d_state * 4
    n_mamba = cfg.num_hidden_layers - n_attn
    return {
        "kv_bytes_per_token": n_attn * kv_per_layer,
        "state_bytes_per_sequence": n_mamba * (conv + ssm),
        "teacher_kv_bytes_per_token": cfg.num_hidden_layers * kv_per_layer,
    }


def conversion_summary(teacher: nn.Module, student: MamballamaForCausalLM, report: ConversionReport,
                       dtype: torch.dtype, ratio: float | None) -> dict:
    cfg = student.config
    mem = memory_summary(cfg, dtype)
    contexts = [4096, 32768]
    return {
        "teacher": cfg.teacher,
        "family": report.family,
        "mixer": cfg.mixer,
        "num_layers": cfg.num_hidden_layers,
        "ratio_requested": ratio,
        "attention_fraction": len(cfg.attn_layers) / cfg.num_hidden_layers,
        "attn_layers": cfg.attn_layers,
        "mamba_layers": cfg.mamba_layers,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters": {"teacher": parameter_count(teacher), "hybrid": parameter_count(student)},
        "state_memory": {
            "teacher_kv_bytes_per_token": mem["teacher_kv_bytes_per_token"],
            "hybrid_kv_bytes_per_token": mem["kv_bytes_per_token"],
            "hybrid_fixed_state_bytes_per_sequence": mem["state_bytes_per_sequence"],
            "at_context": {
                str(n): {
                    "teacher_bytes": n * mem["teacher_kv_bytes_per_token"],
                    "hybrid_bytes": n * mem["kv_bytes_per_token"] + mem["state_bytes_per_sequence"],
                }
                for n in contexts
            },
        },
        "mapping": {"copied": len(report.copied), "fresh": len(report.fresh), "dropped": report.dropped},
    }
