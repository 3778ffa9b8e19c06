"""Models for training: load the student and frozen teacher/reference, check they share a vocabulary, turn
more attention layers into Mamba between progressive stages, choose what trains, probe packing support."""

from __future__ import annotations

from pathlib import Path

import torch

from mamballama_cli.errors import MamballamaError
from mamballama_cli.output import log


def load_trainable(spec: str, dtype=torch.float32):
    """(model in train mode, tokenizer or None, resolved path). Weights in ``dtype`` (fp32 master weights)."""
    import mamballama_cli  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoTokenizer

    from mamballama_cli.loading import auto_model, checkpoint_dir

    path = checkpoint_dir(spec)
    model = auto_model(spec, path, dtype, refused=(ValueError, OSError))
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception:
        tok = None
    model.config.use_cache = False
    return model.train(), tok, path


def load_frozen(spec: str, dtype, device, what: str):
    """A frozen model (teacher or reference) in eval mode: (model, tokenizer or None, display name)."""
    import mamballama_cli  # noqa: F401
    from mamballama_cli.convert.teacher import load_teacher

    path = Path(spec).expanduser()
    if spec != "default" and path.is_dir() and (path / "config.json").is_file():
        model, tok, _ = load_trainable(spec, dtype)
        name = str(path)
    else:  # 'default', a GGUF file or a hub id: the teacher loader knows them all
        try:
            model, tok, source = load_teacher(spec, dtype=dtype)
        except MamballamaError as exc:
            raise MamballamaError(f"{what}: {exc}") from exc
        name = source.name
    model = model.to(device).eval()
    model.requires_grad_(False)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, tok, name


def default_teacher(model_spec: str) -> tuple[str | None, str]:
    """(teacher spec, why) for an input model given without --teacher, from its own config.json.

    A hybrid names the teacher `convert` recorded (None if it cannot be found here); a plain Transformer is its
    own teacher (progressive stages then convert the student). Read from the input, not from a checkpoint, so a
    resumed run picks the same teacher.
    """
    import json

    from mamballama_cli.loading import checkpoint_dir

    cfg = json.loads((checkpoint_dir(model_spec) / "config.json").read_text())
    if cfg.get("model_type") != "mamballama":
        return model_spec, "the input model itself"
    info = cfg.get("teacher") or {}
    name = info.get("name_or_path")
    if info.get("kind") == "default" or name == "SmolLM2-135M-Instruct":
        return "default", "recorded in the model's config"
    if name and Path(name).expanduser().exists():
        return name, "recorded in the model's config"
    return None, ""


def check_same_vocabulary(teacher, t_tok, student, s_tok, t_name: str, s_name: str) -> None:
    """KL between two models is only defined over one shared vocabulary: refuse anything else."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise MamballamaError(
            f"teacher {t_name} has a vocabulary of {tv} tokens but the student {s_name} has {sv}: the KL needs "
            "both over the same vocabulary; distil from the teacher the student was converted from"
        )
    if t_tok is not None and s_tok is not None:
        a, b = t_tok.get_vocab(), s_tok.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:1]
            example = f" (e.g. token {diff[0][0]!r} has id {diff[0][1]} in one only)" if diff else ""
            raise MamballamaError(
                f"teacher {t_name} and student {s_name} tokenise differently{example}: the same id must mean "
                "the same token for the KL to make sense; use the teacher the student was converted from"
            )


def is_hybrid(model) -> bool:
    return getattr(model.config, "model_type", None) == "mamballama"


def has_mamba_layers(model) -> bool:
    return is_hybrid(model) and bool(model.config.mamba_layers)


def attention_layers(model) -> list[int]:
    if is_hybrid(model):
        return list(model.config.attn_layers)
    return list(range(model.config.num_hidden_layers))


@torch.no_grad()
def relayout(model, attn_layers: list[int], seed: int, stage_name: str, teacher_info: dict | None = None):
    """Turn the attention layers not in ``attn_layers`` into Mamba layers initialised from their own attention.

    A plain Transformer goes through the converter. A hybrid keeps every trained parameter; only the layers
    that change get a fresh mixer whose x/B/C/out come from that layer's current attention weights (the
    family's role table), exactly as `convert` would have done.
    """
    current = attention_layers(model)
    if sorted(attn_layers) == sorted(current):
        return model
    regained = sorted(set(attn_layers) - set(current))
    if regained:
        raise MamballamaError(
            f"stage {stage_name!r} keeps attention in layer(s) {regained}, which are already Mamba layers; "
            "progressive stages may only replace attention (lower ratio from stage to stage)"
        )
    if not is_hybrid(model):
        from mamballama_cli.convert.converter import convert_model

        student, _ = convert_model(model, list(attn_layers), dtype=torch.float32, seed=seed,
                                   teacher_info=teacher_info)
        student.config.use_cache = False
        return student.train()

    import copy

    from mamballama_cli import plugins as plugin_registry
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    family_name = (model.config.teacher or {}).get("family", "llama")
    family = plugin_registry.teachers.find(lambda f: f.name == family_name)
    if family is None:
        raise MamballamaError(f"the model was converted from family {family_name!r}, which is not registered")
    table = family.mapping
    # teacher key of an attention weight -> the hybrid's own key for it
    hybrid_name = {t: s for s, t in table.attention.items()}

    new_cfg = copy.deepcopy(model.config)
    new_cfg.attn_layers = sorted(attn_layers)
    dtype = next(model.parameters()).dtype
    torch.manual_seed(seed)
    new = MamballamaForCausalLM(new_cfg).to(dtype)
    old_sd = model.state_dict()
    new_params = dict(new.named_parameters(remove_duplicate=False))
    changed = set(current) - set(attn_layers)
    for name, p in new_params.items():
        if name in old_sd and old_sd[name].shape == p.shape:
            p.copy_(old_sd[name])
    for i in sorted(changed):
        mixer = new.model.layers[i].mamba
        mixer.reset_fresh_parameters()
        for role, tkey in table.mamba_roles.items():
            key = f"model.layers.{i}.{hybrid_name.get(tkey, tkey)}"
            if key not in old_sd:
                if tkey in table.optional:
                    continue
                raise MamballamaError(f"layer {i} lacks {key}, which its conversion to Mamba needs")
            mixer.assign_role(role, old_sd[key])
    new.generation_config = model.generation_config
    log(f"stage {stage_name}: layer(s) {sorted(changed)} now Mamba (initialised from their attention); "
        f"attention kept in {sorted(attn_layers)}")
    return new.train()


def set_trainable(model, mode: str) -> list[str]:
    """'all', 'mixers' (Mamba mixers only; MLPs, norms, embeddings and attention frozen) or 'all-but-embeddings'
    (the input embedding and the output head frozen, whatever their names: a draft that shares its target's).
    Returns the names of the trainable parameters."""
    frozen: set[int] = set()
    if mode == "all-but-embeddings":
        frozen = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None}
    names = []
    for name, p in model.named_parameters():
        train = id(p) not in frozen if mode == "all-but-embeddings" else (mode == "all" or ".mamba." in name)
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names and mode == "all-but-embeddings":
        raise MamballamaError("trainable: 'all-but-embeddings' selects no parameter: the model is its embedding "
                              "and head alone")
    if not names:
        raise MamballamaError(
            "trainable: 'mixers' selects no parameter because the model has no Mamba layer; give the stage an "
            "ratio below 1 or use trainable: all"
        )
    return names


@torch.no_grad()
def packing_support(model) -> tuple[bool, str]:
    """Whether packed rows (restarting position ids) keep sequences apart in this model, by trying it."""
    if has_mamba_layers(model):
        return False, ("Mamba layers carry recurrent and conv state across a packed boundary and the SSD ops "
                       "take no sequence index to reset it")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        a = torch.randint(0, vocab, (1, 5), generator=g).to(device)
        b = torch.randint(0, vocab, (1, 4), generator=g).to(device)
        pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=device)
        packed = model(torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits.float()
        alone = model(b, use_cache=False).logits.float()
        ok = torch.allclose(packed[:, 5:], alone, atol=1e-3, rtol=1e-3)
    except Exception as exc:
        ok = False
        return ok, f"the probe failed ({type(exc).__name__})"
    finally:
        model.train(was_training)
    return ok, "" if ok else "its attention does not restart at packed boundaries given position ids"


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto ``device``; to CUDA through pinned memory without blocking the host.

    A copy from pageable memory makes the host wait until the GPU has finished all queued work, which empties
    the queue at every micro-batch: the next kernels then start only as fast as Python launches them.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def model_inputs(batch: dict, device) -> dict:
    out = {"input_ids": to_device(batch["input_ids"], device), "use_cache": False}
    if batch.get("position_ids") is not None:
        out["position_ids"] = to_device(batch["position_ids"], device)
    return out
