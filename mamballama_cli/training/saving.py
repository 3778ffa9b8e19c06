"""What the training loop saves and restores: full model and optimizer states gathered from any engine
(DDP, FSDP, DeepSpeed), checkpoints, the final model, and the run directory (refuse, clear or resume).

The files themselves (atomic, pickle-free, checksummed) are :mod:`mamballama_cli.training.checkpoint`'s.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mamballama_cli.errors import MamballamaError
from mamballama_cli.output import log
from mamballama_cli.training import checkpoint as ck
from mamballama_cli.training.config import config_differences, config_hash


def gather_states(acc, model, optimizer, engine: str):
    """(full model state dict, full optimizer state dict) on the main process; collective (every process calls).

    DDP / FSDP / one process: torch.distributed.checkpoint's state_dict API gathers both, keyed by parameter name.
    DeepSpeed: its partitioned fp32 master weights and Adam moments are gathered parameter by parameter through
    deepspeed.utils.safe_get_full_* (DeepSpeed's own checkpoints are pickles, which this project does not load).
    """
    if engine == "deepspeed":
        return gather_deepspeed(acc, model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=acc.num_processes > 1)
    msd, osd = get_state_dict(model, optimizer.optimizer, options=opts)
    return msd, osd


def _deepspeed_step(engine) -> float:
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            return float(st["step"])
    return 0.0


def _deepspeed_flat_partitions(zero_opt) -> list:
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zero_opt, attr):
            return list(getattr(zero_opt, attr))
    raise MamballamaError(f"unknown DeepSpeed optimizer {type(zero_opt).__name__}: cannot read its fp32 partitions")


def _deepspeed_link_states(engine, step: float | None = None) -> None:
    """Make sure the inner optimizer holds Adam state for every fp32 partition and that each parameter's view
    into it is current. DeepSpeed creates the state lazily at the first step and links the per-parameter views
    once, on the first group's step, before the other groups have state: relink so that every view exists."""
    zero_opt = engine.optimizer
    state = zero_opt.optimizer.state
    for flat in _deepspeed_flat_partitions(zero_opt):
        if "exp_avg" not in state[flat]:  # no step taken yet (a resume): create the state Adam would create
            state[flat] = {"step": torch.tensor(float(step or 0.0)), "exp_avg": torch.zeros_like(flat),
                           "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()


def gather_deepspeed(acc, engine):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _deepspeed_link_states(engine)
    msd = acc.get_state_dict(engine)  # every parameter, 16-bit under bf16 (gathered on rank 0 for ZeRO-3)
    state: dict = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        master = safe_get_full_fp32_param(p)  # collective under ZeRO-3: same order on every process
        moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        if acc.is_main_process:
            if master is not None:
                msd[name] = master.detach().float().cpu()  # the fp32 master, not its 16-bit copy
            state[name] = {k: v.detach().float().cpu() for k, v in moments.items() if v is not None}
    osd = {"format": "deepspeed-full", "step": _deepspeed_step(engine), "state": state}
    return msd, osd


def restore_deepspeed(engine, ckpt: Path, osd: dict) -> None:
    """Scatter saved fp32 masters and Adam moments back into DeepSpeed's partitions; collective."""
    from safetensors import safe_open
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        if f.name.startswith(("optimizer", "rank")):
            continue
        with safe_open(str(f), framework="pt") as sf:
            weights.update({k: sf.get_tensor(k) for k in sf.keys()})
    _deepspeed_link_states(engine, osd["step"])
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if name in weights:
            safe_set_full_fp32_param(p, weights[name].float().to(p.device))
        for key, value in osd["state"].get(name, {}).items():
            safe_set_full_optimizer_state(p, value.to(p.device), key)
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], osd["step"]) if torch.is_tensor(st["step"]) else osd["step"]


def save_checkpoint(acc, model, optimizer, engine: str, run_dir: Path, state: dict, cfg_d: dict, tokenizer,
                    keep: int) -> Path | None:
    import yaml

    step = state["global_step"]
    main = acc.is_main_process
    if main:
        ck.begin(run_dir, step)
    acc.wait_for_everyone()
    tmp = ck.partial_dir(run_dir, step)
    msd, osd = gather_states(acc, model, optimizer, engine)
    ck.save_state(tmp / "rng" / f"rank{acc.process_index}", ck.rng_state())
    if main:
        unwrapped = acc.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict={k: v.detach().cpu() for k, v in msd.items()},
                                  safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if osd is not None:
            ck.save_state(tmp / "optimizer", osd)
        state = {**state, "optimizer_state": osd.get("format", "torch-full")}
        ck.write_json(tmp / "trainer_state.json", state)
        (tmp / "run_config.yaml").write_text(yaml.safe_dump(cfg_d, sort_keys=False))
    acc.wait_for_everyone()
    final = None
    if main:
        final = ck.commit(run_dir, step, keep)
    acc.wait_for_everyone()
    return final or ck.final_dir(run_dir, step)


def restore_optimizer(acc, model, optimizer, engine: str, ckpt: Path, main: bool) -> None:
    if not (ckpt / "optimizer.safetensors").is_file():
        log(f"warning: {ckpt} holds no optimizer state; Adam moments restart from zero", main)
        return
    osd = ck.load_state(ckpt / "optimizer")
    if (osd.get("format") == "deepspeed-full") != (engine == "deepspeed"):
        # The formats differ (DeepSpeed's per-parameter gather vs torch's state dict): weights, schedule and
        # data position carry over, the moments do not.
        log(f"warning: {ckpt} was saved by another engine; Adam moments restart from zero", main)
        return
    if engine == "deepspeed":
        restore_deepspeed(model, ckpt, osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, osd, options=StateDictOptions(full_state_dict=True))


def restore_rng(acc, ckpt: Path) -> None:
    path = ckpt / "rng" / f"rank{acc.process_index}"
    if not path.with_suffix(".safetensors").is_file():
        path = ckpt / "rng" / "rank0"
    if path.with_suffix(".safetensors").is_file():
        ck.set_rng_state(ck.load_state(path))


def write_final_model(ckpt: Path, run_dir: Path, save_dtype: str, tokenizer,
                      distill_length: int | None = None) -> None:
    """The last checkpoint's weights in the run directory itself, in ``save_dtype``, file by file atomically.

    ``distill_length`` (the sequence length a hybrid was distilled at) is recorded in the config, so that
    `eval` can place retrieval lengths at multiples of it.
    """
    from transformers import AutoModelForCausalLM

    dtype = None if save_dtype in ("auto", None) else getattr(torch, save_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype or torch.float32)
    if distill_length and hasattr(model.config, "distill_max_length"):
        model.config.distill_max_length = max(int(distill_length), int(model.config.distill_max_length or 0))
    tmp = run_dir / ".final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


def input_dtype_name(model_spec: str) -> str:
    """The dtype the input checkpoint was stored in (what 'save_dtype: auto' writes)."""
    import json

    from mamballama_cli.loading import checkpoint_dir

    try:
        cfg = json.loads((checkpoint_dir(model_spec) / "config.json").read_text())
    except Exception:
        return "float32"
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def prepare_run_dir(acc, cfg, cfg_d: dict, global_batch: int) -> Path | None:
    """Checks on every process first, writes on the main one: refuse, clear (--force) or pick the resume point."""
    from mamballama_cli.io import check_output_dir

    run_dir = Path(cfg.output)
    if cfg.resume:
        ckpt = ck.latest_checkpoint(run_dir)
        if ckpt is None:
            raise MamballamaError(f"--resume: {run_dir} holds no complete checkpoint; start without --resume")
        if not ck.verify_checksums(ckpt):
            log(f"note: {ckpt} predates checkpoint checksums; resuming without verifying its files",
                acc.is_main_process)
        import yaml

        saved_cfg = yaml.safe_load((ckpt / "run_config.yaml").read_text()) or {}
        if config_hash(saved_cfg) != config_hash(cfg_d):
            diffs = config_differences(saved_cfg, cfg_d)
            raise MamballamaError(
                f"--resume: {ckpt.name} of {run_dir} was written by a different config ({'; '.join(diffs[:4])}); "
                "resume with the options of that run, or start a new run with another --output"
            )
        state = ck.read_trainer_state(ckpt)
        if state.get("global_batch") != global_batch:
            raise MamballamaError(
                f"--resume: the checkpoint was trained with a global batch of {state.get('global_batch')} items, "
                f"this launch gives {global_batch} (micro-batch {cfg.micro_batch_size} x accumulation "
                f"{cfg.gradient_accumulation_steps} x {acc.num_processes} process(es)); keep the global batch"
            )
        return ckpt
    check_output_dir(run_dir, cfg.force)
    return None


def init_run_dir(acc, cfg) -> None:
    """After every check passed: clear (--force) and create the run directory."""
    run_dir = Path(cfg.output)
    acc.wait_for_everyone()
    if acc.is_main_process and not cfg.resume:
        if run_dir.exists() and cfg.force:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
