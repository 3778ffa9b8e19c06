"""The training loop shared by `distill`, `sft` and `dpo`, on accelerate (one process, DDP, FSDP, DeepSpeed).

One optimizer step reads one global batch (micro_batch_size x gradient_accumulation_steps x processes items,
chosen by :class:`~mamballama_cli.training.data.BatchPlan`). Each process runs its accumulation_steps
micro-batches; every micro-batch loss is a *sum* over target tokens (pairs for DPO) and is scaled by
``accum * processes / count(global batch)`` before backward, so that after accelerate's division by the
accumulation steps and the engines' averaging over processes the gradient is that of the mean over the whole
global batch, however it is split.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log
from mamballama_cli.training import checkpoint as ck
from mamballama_cli.training import align
from mamballama_cli.training.config import (ResolvedStage, config_dict, config_differences,
                                            config_hash)
from mamballama_cli.training.data import (BatchPlan, as_items, collate, collate_pairs, encode_pairs,
                                          encode_records, pack, pack_concat, read_records, split_global_batch)
from mamballama_cli.training.losses import dpo_loss, kd_loss_auto, sequence_logps
from mamballama_cli.training.models import (check_same_vocabulary, default_teacher, has_mamba_layers,
                                            load_frozen, load_trainable, model_inputs, packing_support, relayout,
                                            set_trainable, target_attention_layers, to_device)
from mamballama_cli.training.report import Reporter



# --- accelerate -------------------------------------------------------------------------------------------------
def resolve_mixed_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return name


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: forget a previous run's accelerate state (tests and notebooks run several in one process).
        AcceleratorState._reset_state()
        GradientState._reset_state()
    acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    # The recipe decides accumulation, not an environment variable left by `accelerate launch`.
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    _world_from_process_group(acc)
    return acc


def _world_from_process_group(acc) -> None:
    """Check that accelerate sees every launched process; under DeepSpeed on a CPU host, make it.

    On a host without an accelerator, accelerate (1.x) lets DeepSpeed initialise a process group of all the
    launched processes but keeps its own state at one process with every rank 0, so each rank would take itself
    for the main process and DeepSpeed would refuse the batch sizes: there the count and rank are taken from the
    process group (CPU runs of ZeRO, e.g. tests/test_train_distributed.py; with GPUs the two already agree).
    Any other disagreement (a GPU config launched on a host without GPUs) would run each process as a lone
    training writing the same run directory, and is refused.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    grouped = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if grouped else int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes == world:
        return
    if grouped and acc.distributed_type == DistributedType.DEEPSPEED:
        fix = {"num_processes": world, "process_index": dist.get_rank(),
               "local_process_index": int(os.environ.get("LOCAL_RANK", dist.get_rank()))}
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared.update(fix)
        return
    raise UsageError(
        f"{world} processes were launched but accelerate runs them as {acc.num_processes} (distributed type "
        f"{acc.distributed_type.value}): a GPU config on a host without GPUs? Launch CPU processes with "
        f"`accelerate launch --cpu` (or use_cpu: true in the config), or run on the GPUs")


def engine_name(acc) -> str:
    from accelerate.utils import DistributedType

    return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(
        acc.distributed_type, "ddp" if acc.num_processes > 1 else "single")


@contextlib.contextmanager
def whole_models(acc):
    """Load models whole while a DeepSpeed ZeRO-3 plugin is active.

    With a ZeRO-3 config registered, transformers' from_pretrained builds every model inside deepspeed.zero.Init,
    which partitions parameters at construction: the frozen teacher would be unusable unwrapped and the hybrid's
    mixers initialise their SSM parameters in __init__. Models are instead loaded whole on CPU; DeepSpeed
    partitions the student when it is prepared.
    """
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def configure_deepspeed(acc, cfg, st: ResolvedStage) -> None:
    """Fill the DeepSpeed config from the recipe (we pass no dataloader, so nothing else would)."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        return
    c = plugin.deepspeed_config
    c["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    c["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    c["train_batch_size"] = cfg.micro_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    c["gradient_clipping"] = float(st.max_grad_norm or 0.0)
    zero = c.setdefault("zero_optimization", {})
    zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints gather full weights on rank 0


# --- schedule and optimizer -------------------------------------------------------------------------------------
def lr_at(st: ResolvedStage, step: int, steps: int) -> float:
    """Linear warm-up, then cosine / linear decay to ``min_lr_ratio * lr`` at the stage's last step."""
    warm = st.warmup_steps(steps)
    if step < warm:
        return st.lr * (step + 1) / warm
    if st.schedule == "constant":
        return st.lr
    progress = (step - warm) / max(1, steps - warm)
    if st.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return st.lr * (st.min_lr_ratio + (1.0 - st.min_lr_ratio) * factor)


def build_optimizer(model, st: ResolvedStage, eps: float):
    """AdamW; weight decay on matrices only (not on norms, biases, dt_bias, A_log, D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # A_log of Mamba-1 is a matrix (d_inner x d_state) but, like dt_bias and D, it parametrises the
            # dynamics and must not be pulled towards zero.
            matrix = p.dim() >= 2 and "embed" not in name and not name.endswith("A_log")
            (decay if matrix else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": st.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=st.lr, betas=st.betas, eps=eps)


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# --- forward passes (module-level so that tests can inject failures such as running out of memory) -------------
def forward_logits(model, inputs: dict):
    return model(**inputs).logits


@dataclass
class Job:
    """What differs between the commands: which frozen model, which data, which loss."""

    kind: str  # distill | sft | dpo
    frozen: object | None = None  # teacher (distill/sft) or reference (dpo), on the device, eval mode
    items: list = field(default_factory=list)  # Items (distill/sft) or PairExamples (dpo)
    eval_items: list | None = None
    pad_id: int = 0

    def lengths(self) -> list[int]:
        if self.kind == "dpo":
            return [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in self.items]
        return [len(it) for it in self.items]

    def count(self, indices: list[int], loss_positions: str = "responses") -> int:
        """The loss normaliser of a global batch: target tokens (every predicted position with
        ``loss_positions: all``), or pairs for DPO."""
        if self.kind == "dpo":
            return len(indices)
        if loss_positions == "all":
            return sum(max(len(self.items[i]) - 1, 0) for i in indices)
        return sum(self.items[i].n_targets for i in indices)


def loss_mask(batch: dict, loss_positions: str) -> torch.Tensor:
    """Positions whose next-token loss counts: the response targets, or every real token that has a successor
    (``all``: the teacher's logits on prompts and plain text are signal too; padding never counts)."""
    if loss_positions != "all":
        return batch["target_mask"]
    valid = batch["valid"]
    mask = torch.zeros_like(valid)
    mask[:, :-1] = valid[:, :-1] & valid[:, 1:]
    if batch.get("position_ids") is not None:  # packed rows: no position predicts the next example's first token
        mask[:, :-1] &= batch["position_ids"][:, 1:] != 0
    return mask


def micro_step(job: Job, acc, model, items: list, st: ResolvedStage, cfg, kl_scale: float = 1.0
               ) -> tuple[torch.Tensor, dict]:
    """Loss sum and metric sums of one micro-batch. ``kl_scale`` multiplies the KL weights (the paper's KL summed
    per sequence: target tokens over sequences of the global batch)."""
    device = acc.device
    if job.kind == "dpo":
        batch = collate_pairs(items, job.pad_id)
        inputs = model_inputs(batch, device)
        targets, mask = to_device(batch["targets"], device), to_device(batch["target_mask"], device)
        n = len(items)
        with torch.no_grad(), acc.autocast():
            ref = sequence_logps(forward_logits(job.frozen, inputs), targets, mask)
        with acc.autocast():
            pol = sequence_logps(forward_logits(model, inputs), targets, mask)
        total, metrics = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=cfg.beta,
                                  label_smoothing=cfg.label_smoothing)
        metrics["n_tokens"] = torch.tensor(float(batch["n_tokens"]))
        return total, metrics
    batch = collate(items, job.pad_id)
    inputs = model_inputs(batch, device)
    w_hidden = getattr(st, "w_hidden", 0.0)
    logits_needed = bool(st.w_kl or st.w_rkl or st.w_ce)
    t_logits, store, handles = None, {}, []
    if job.frozen is not None:
        if w_hidden:  # the teacher's forward also records the inputs and outputs of the layers to align
            handles, store = align.capture_layers(job.frozen, align.mamba_layer_indices(acc.unwrap_model(model)))
        try:
            with torch.no_grad(), acc.autocast():
                if logits_needed:
                    t_logits = forward_logits(job.frozen, inputs)
                else:  # alignment alone: the teacher's layers, not its head
                    job.frozen.model(**inputs)
        finally:
            for h in handles:
                h.remove()
    if logits_needed:
        with acc.autocast():
            s_logits = forward_logits(model, inputs)
        mask = loss_mask(batch, getattr(st, "loss_positions", "responses"))
        total, metrics = kd_loss_auto(s_logits, t_logits, to_device(batch["targets"], device),
                                      to_device(mask, device), w_kl=st.w_kl * kl_scale, w_rkl=st.w_rkl * kl_scale,
                                      w_ce=st.w_ce, temperature=st.temperature)
    else:
        total, metrics = torch.zeros((), device=device), {}
    if w_hidden:
        with acc.autocast():
            hidden, n_valid = align.alignment_loss(acc.unwrap_model(model), store, to_device(batch["valid"], device))
        # per real token, counted like the other terms (the trainer divides by the global batch's target tokens)
        hidden = hidden * (float(loss_mask(batch, getattr(st, "loss_positions", "responses")).sum()) / n_valid)
        total = total + w_hidden * hidden
        metrics["hidden"] = hidden.detach()
        metrics["loss"] = total.detach()
    metrics["n_tokens"] = torch.tensor(float(batch["n_tokens"]))
    return total, metrics


METRIC_KEYS = {
    "distill": ("loss", "kl", "rkl", "ce", "hidden"),
    "sft": ("loss", "kl", "rkl", "ce"),
    "dpo": ("loss", "margin", "accuracy", "reward_chosen", "reward_rejected"),
}


def reduce_sums(acc, sums: dict, keys) -> dict[str, float]:
    """Sum per-process metric sums (tensors or numbers) over processes; missing keys count 0."""
    vec = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64).to(acc.device) for k in keys])
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="sum")
    return dict(zip(keys, vec.tolist()))


@torch.no_grad()
def evaluate(job: Job, acc, model, cfg) -> dict:
    """Held-out metrics per target token (KL at temperature 1, CE) or per pair (DPO); all processes join."""
    items = job.eval_items
    if not items:
        return {}
    model.eval()
    W, r, mb = acc.num_processes, acc.process_index, cfg.micro_batch_size
    keys = METRIC_KEYS[job.kind] + ("count",)
    sums: dict[str, float] = {}
    unit = ResolvedStage(0, "eval", None, 1.0, None, None, "all", 1.0, (0.9, 0.98), 0.0, 0.0, 0.0, "constant", 0.0,
                         w_kl=1.0 if job.frozen is not None else 0.0, w_rkl=0.0, w_ce=1.0, temperature=1.0)
    for start in range(0, len(items), mb * W):
        mine = items[start + r * mb: start + (r + 1) * mb]
        weight = 1.0
        if not mine:  # every process must run the same number of forwards (sharded engines gather weights)
            mine, weight = items[:1], 0.0
        _, m = micro_step(job, acc, model, mine, unit, cfg)
        count = len(mine) if job.kind == "dpo" else sum(it.n_targets for it in mine)
        for k in keys:
            v = count if k == "count" else float(m.get(k, torch.tensor(0.0)))
            sums[k] = sums.get(k, 0.0) + weight * v
    model.train()
    total = reduce_sums(acc, sums, keys)
    n = max(total.pop("count"), 1.0)
    out = {f"eval_{k}": v / n for k, v in total.items() if k != "loss" or job.kind == "dpo"}
    if job.kind != "dpo":
        out.pop("eval_rkl", None)
        out.pop("eval_hidden", None)  # held-out numbers are KL and CE; the alignment term is a training signal
        if job.frozen is None:
            out.pop("eval_kl", None)
    return out


# --- checkpoints ------------------------------------------------------------------------------------------------
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


# --- the run ----------------------------------------------------------------------------------------------------
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


def frozen_dtype(acc):
    mp = acc.mixed_precision
    if acc.device.type == "cuda" and mp == "bf16":
        return torch.bfloat16
    if acc.device.type == "cuda" and mp == "fp16":
        return torch.float16
    return torch.float32


def run_training(cfg, kind: str) -> dict:
    """Run (or resume) every stage of ``cfg``; returns the run's summary (also saved as training_summary.json)."""
    import yaml

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading/saving bars would drown the training progress
    t_start = time.perf_counter()
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    run_dir = Path(cfg.output)
    W, G, mb = acc.num_processes, cfg.gradient_accumulation_steps, cfg.micro_batch_size
    global_batch = mb * G * W
    cfg_d = {"command": kind, **config_dict(cfg)}
    engine = engine_name(acc)

    resume_ckpt = prepare_run_dir(acc, cfg, cfg_d, global_batch)
    # Read the data before loading any model: a bad file should fail in a second, not after a minute.
    rec_kind = "preference" if kind == "dpo" else "chat"
    # Shard folders come back pre-tokenised; encode_records checks them against the tokenizer and passes them on.
    records = read_records(cfg.data, split=cfg.data_split, kind=rec_kind, skip_bad=cfg.skip_bad_lines,
                           text_field=cfg.text_field)
    eval_records = (read_records(cfg.eval_data, split=cfg.data_split, kind=rec_kind, skip_bad=cfg.skip_bad_lines,
                                 text_field=cfg.text_field) if cfg.eval_data else None)

    start_spec = str(resume_ckpt) if resume_ckpt else cfg.model
    with whole_models(acc):
        student, s_tok, _ = load_trainable(start_spec)
    job = Job(kind)
    fdtype = frozen_dtype(acc)
    t_tok, teacher_spec = None, None
    if kind == "dpo":
        ref_spec = cfg.reference or cfg.model
        with whole_models(acc):
            job.frozen, t_tok, ref_name = load_frozen(ref_spec, fdtype, acc.device, "reference")
        check_same_vocabulary(job.frozen, t_tok, student, s_tok, f"reference {ref_name}", cfg.model)
    else:
        teacher_spec = getattr(cfg, "teacher", None)
        if kind == "distill" and not teacher_spec:
            teacher_spec, why = default_teacher(cfg.model)
            if teacher_spec is None:
                raise UsageError(f"--teacher is required: {cfg.model} records no teacher that can be found here")
            log(f"teacher: {teacher_spec} ({why})", main)
        if teacher_spec:
            with whole_models(acc):
                job.frozen, t_tok, t_name = load_frozen(teacher_spec, fdtype, acc.device, "teacher")
            check_same_vocabulary(job.frozen, t_tok, student, s_tok, t_name, cfg.model)
    tok = t_tok if t_tok is not None else s_tok
    if tok is None:
        raise MamballamaError(f"no tokenizer: neither {cfg.model} nor the teacher/reference has tokenizer files")
    job.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # Tokenise and lay out the data.
    stages = cfg.resolved_stages()
    if any(getattr(st, "w_hidden", 0.0) for st in stages) and acc.num_processes > 1:
        raise UsageError(f"--w-hidden (layer-wise alignment) runs on one process; this run has {acc.num_processes}. "
                         "Run the alignment stage alone without accelerate launch, then the rest distributed")
    if kind == "dpo":
        job.items = encode_pairs(tok, records, cfg.seq_len, cfg.max_prompt_length)
        job.eval_items = encode_pairs(tok, eval_records, cfg.seq_len, cfg.max_prompt_length) if eval_records else None
        packing_note = "off (preference pairs are padded)"
    else:
        examples = encode_records(tok, records, cfg.seq_len)
        use_pack, packing_note = decide_packing(cfg, student, job.frozen, stages)
        if use_pack:
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(examples), generator=g).tolist()
            packer = pack_concat if cfg.packing == "concat" else pack
            job.items = packer([examples[i] for i in order], cfg.seq_len)
        else:
            job.items = as_items(examples)
        job.eval_items = as_items(encode_records(tok, eval_records, cfg.seq_len)) if eval_records else None
    lengths = job.lengths()
    n_targets = sum(it.n_targets for it in job.items) if kind != "dpo" else None

    plans = [BatchPlan(len(job.items), global_batch, cfg.seed, st.index) for st in stages]
    mean_len = sum(lengths) / max(len(lengths), 1)
    stage_steps = [st.steps if st.steps is not None
                   else max(1, math.ceil(st.tokens / (global_batch * mean_len))) if st.tokens is not None
                   else plans[i].steps_for(st.epochs) for i, st in enumerate(stages)]
    total_steps = sum(stage_steps)
    log(f"{kind}: {len(job.items)} {'pairs' if kind == 'dpo' else 'rows'} from {cfg.data}"
        + (f" ({n_targets:,} target tokens)" if n_targets is not None else "")
        + f"; packing {packing_note}; global batch {global_batch} = micro {mb} x accumulation {G} x {W} "
          f"process(es) [{engine}]; {len(stages)} stage(s), {total_steps} step(s)", main)
    log(recipe_line(stages, stage_steps, plans, global_batch, len(job.items)), main)

    # Where to start.
    si0, step0, gstep = 0, 0, 0
    if resume_ckpt is not None:
        state = ck.read_trainer_state(resume_ckpt)
        si0, step0, gstep = state["stage"], state["stage_step"], state["global_step"]
        if step0 >= stage_steps[si0]:
            si0, step0 = si0 + 1, 0
        log(f"resuming from {resume_ckpt} (step {gstep})", main)
    init_run_dir(acc, cfg)
    if main:
        (run_dir / "run_config.yaml").write_text(yaml.safe_dump(cfg_d, sort_keys=False))
    reporter = Reporter(run_dir, main, total_steps, gstep)
    h = config_hash(cfg_d)
    last_ckpt = resume_ckpt
    stopped = timed_out = False
    last_record: dict = {}
    evals: list[dict] = []
    bad_steps = 0  # consecutive steps with a non-finite loss or gradient

    try:
        for si in range(si0, len(stages)):
            st, steps, plan = stages[si], stage_steps[si], plans[si]
            if cfg.max_steps is not None and gstep >= cfg.max_steps:
                stopped = True
                break
            if si != si0 or student is None:
                with whole_models(acc):
                    student, _, _ = load_trainable(str(last_ckpt))
            model = student
            student = None
            target = target_attention_layers(model, st.attn_layers, st.attn_ratio)
            if target is not None:
                model = relayout(model, target, cfg.seed + 1000 * (si + 1), st.name,
                                 teacher_info={"name_or_path": str(teacher_spec),
                                               "kind": "default" if teacher_spec == "default" else "dir"})
            set_trainable(model, st.trainable)
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            optimizer = build_optimizer(model, st, cfg.eps)
            configure_deepspeed(acc, cfg, st)
            model, optimizer = acc.prepare(model, optimizer)
            mid_stage = si == si0 and step0 > 0
            if mid_stage:
                restore_optimizer(acc, model, optimizer, engine, resume_ckpt, main)
                restore_rng(acc, resume_ckpt)
            reporter.stage(st.name, steps)
            if job.eval_items and not mid_stage:
                ev = {"step": gstep, "stage": st.name, **evaluate(job, acc, model, cfg)}
                reporter.eval(ev)
                evals.append(ev)
            start = step0 if si == si0 else 0
            stage_done = start
            for step in range(start, steps):
                if cfg.max_steps is not None and gstep >= cfg.max_steps:
                    stopped = True
                    break
                if out_of_time(acc, cfg, t_start):
                    timed_out = True
                    break
                reporter.begin_step(gstep + 1)
                record = train_step(job, acc, model, optimizer, st, plan, step, steps, lengths, cfg, engine,
                                    on_micro=reporter.micro)
                gstep += 1
                record = {"step": gstep, **record}
                stage_done = step + 1
                reporter.step(record, gstep % cfg.log_every == 0 or step + 1 == steps)
                what = non_finite(record, acc.scaler is not None)
                bad_steps = bad_steps + 1 if what else 0
                if what and (bad_steps > cfg.nan_patience or engine == "deepspeed"):
                    raise diverged(cfg, st, record, what, bad_steps, last_ckpt, gstep == 1)
                if what:
                    reporter.note(f"warning: step {gstep}: {what}; update skipped ({bad_steps}/{cfg.nan_patience} "
                                  "of --nan-patience)")
                else:
                    last_record = record
                if cfg.eval_every and job.eval_items and gstep % cfg.eval_every == 0 and step + 1 < steps:
                    ev = {"step": gstep, "stage": st.name, **evaluate(job, acc, model, cfg)}
                    reporter.eval(ev)
                    evals.append(ev)
                if cfg.save_every and gstep % cfg.save_every == 0 and step + 1 < steps:
                    last_ckpt = save_checkpoint(acc, model, optimizer, engine, run_dir,
                                                trainer_state(gstep, si, st, step + 1, steps, h, global_batch, W,
                                                              engine, record), cfg_d, tok, cfg.keep_checkpoints)
            if job.eval_items and not stopped:
                ev = {"step": gstep, "stage": st.name, **evaluate(job, acc, model, cfg)}
                reporter.eval(ev)
                evals.append(ev)
            last_ckpt = save_checkpoint(acc, model, optimizer, engine, run_dir,
                                        trainer_state(gstep, si, st, stage_done, steps, h, global_batch, W, engine,
                                                      last_record), cfg_d, tok, cfg.keep_checkpoints)
            acc.free_memory()
            del model, optimizer
            if stopped or timed_out:
                break
    finally:
        reporter.close()

    summary = {
        "command": kind, "output": str(run_dir), "steps": gstep, "total_steps": total_steps,
        "stopped_early": stopped or timed_out, "time_budget_reached": timed_out,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "last": last_record, "evals": evals, "engine": engine, "processes": W, "global_batch": global_batch,
        "mixed_precision": acc.mixed_precision,
        "packing": packing_note, "seconds": round(time.perf_counter() - t_start, 2),
    }
    if main:
        if not stopped and last_ckpt is not None:
            save_dtype = input_dtype_name(cfg.model) if cfg.save_dtype == "auto" else cfg.save_dtype
            with whole_models(acc):
                write_final_model(Path(last_ckpt), run_dir, save_dtype, tok,
                                  distill_length=cfg.seq_len if kind == "distill" else None)
            summary["model"] = str(run_dir)
        ck.write_json(run_dir / "training_summary.json", summary)
    acc.wait_for_everyone()
    return summary


def recipe_line(stages, stage_steps: list[int], plans: list[BatchPlan], global_batch: int, n_items: int) -> str:
    """What the recipe (template, file and flags) sets, in steps of this data: one line at the start of a run."""
    parts = [f"{st.name} {n} step(s) = epoch {plan.epoch_at(n):.3g}, lr {st.lr:.3g}, trainable {st.trainable}"
             for st, n, plan in zip(stages, stage_steps, plans)]
    return f"recipe: global batch {global_batch} over {n_items} row(s); stages: " + "; ".join(parts)


def train_step(job: Job, acc, model, optimizer, st: ResolvedStage, plan: BatchPlan, step: int, steps: int,
               lengths: list[int], cfg, engine: str, on_micro=None) -> dict:
    """One optimizer step on global batch ``step`` of the stage; returns its metrics over the global batch.
    ``on_micro(done, total)`` is called after each of this process's micro-batches (progress inside a step)."""
    t0 = time.perf_counter()
    G, W = cfg.gradient_accumulation_steps, acc.num_processes
    lr = lr_at(st, step, steps)
    set_lr(optimizer, lr)  # before the last backward: DeepSpeed steps inside it
    indices = plan.global_indices(step)
    norm = max(job.count(indices, getattr(st, "loss_positions", "responses")), 1)
    kl_scale = norm / len(indices) if getattr(st, "kl_reduction", "token") == "sequence" else 1.0
    sums: dict[str, torch.Tensor] = {}
    micros = split_global_batch(indices, lengths, cfg.micro_batch_size, G, W, acc.process_index)
    for done, micro in enumerate(micros, 1):
        with acc.accumulate(model):
            try:
                total, metrics = micro_step(job, acc, model, [job.items[i] for i in micro], st, cfg, kl_scale)
                acc.backward(total * (G * W / norm))
            except torch.OutOfMemoryError as exc:
                raise out_of_memory(cfg) from exc
        for k, v in metrics.items():  # kept on the device: one synchronisation per step, in reduce_sums
            sums[k] = sums[k] + v.detach() if k in sums else v.detach()
        if on_micro is not None:
            on_micro(done, len(micros))
    grad_norm = clip_and_norm(acc, model, st, engine)
    # A non-finite gradient would turn every weight into NaN: skip the update (fp16's loss scaler skips its own
    # overflow steps, and DeepSpeed has already stepped); the run loop decides whether to stop (--nan-patience).
    skip = grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None and engine != "deepspeed"
    if not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tot = reduce_sums(acc, sums, METRIC_KEYS[job.kind] + ("n_tokens",))
    dt = time.perf_counter() - t0
    record = {"stage": st.name, "stage_step": step + 1, "epoch": round(plan.epoch_at(step + 1), 4)}
    record.update({k: tot[k] / norm for k in METRIC_KEYS[job.kind] if k in sums})
    record.update(lr=lr, grad_norm=grad_norm, tokens=int(tot["n_tokens"]), count=norm, step_s=round(dt, 4),
                  tokens_per_s=round(tot["n_tokens"] / dt, 1) if dt > 0 else 0.0)
    return record


def trainer_state(gstep, si, st, stage_step, stage_steps, h, global_batch, world, engine, record) -> dict:
    return {"global_step": gstep, "stage": si, "stage_name": st.name, "stage_step": stage_step,
            "stage_steps": stage_steps, "config_hash": h, "global_batch": global_batch, "world_size": world,
            "engine": engine, "last": record}


def out_of_time(acc, cfg, t_start: float) -> bool:
    """--max-seconds reached (every process agrees: the main process's clock decides)."""
    if cfg.max_seconds is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - t_start >= cfg.max_seconds)], device=acc.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum")
    return bool(flag.item() > 0)


def clip_and_norm(acc, model, st: ResolvedStage, engine: str) -> float | None:
    if engine == "deepspeed":  # DeepSpeed clips inside its step (gradient_clipping in its config)
        norm = acc.deepspeed_engine_wrapped.get_global_grad_norm()
        return None if norm is None else float(norm)
    max_norm = st.max_grad_norm if st.max_grad_norm and st.max_grad_norm > 0 else float("inf")
    norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    return None if norm is None else float(norm)


def out_of_memory(cfg) -> MamballamaError:
    return MamballamaError(
        f"out of memory at --micro-batch-size {cfg.micro_batch_size} with --seq-len {cfg.seq_len}: lower "
        "--micro-batch-size (raise --gradient-accumulation-steps to keep the global batch), add "
        "--gradient-checkpointing, or shard the model with DeepSpeed ZeRO-3 (--accelerate-config "
        "templates/accelerate/zero3.yaml)"
    )


def non_finite(record: dict, scaled: bool) -> str | None:
    """What is not finite in a step's record (the loss, a loss term or the gradient norm), or None.

    Under fp16's loss scaler an infinite gradient norm is the scaler's own overflow signal, not divergence."""
    for key in ("loss", *(k for k in record if k in ("kl", "rkl", "ce", "hidden", "margin"))):
        v = record.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            return f"the {'loss' if key == 'loss' else key + ' term'} is {v}"
    g = record.get("grad_norm")
    if isinstance(g, float) and not math.isfinite(g) and not scaled:
        return f"the gradient norm is {g}"
    return None


def diverged(cfg, st: ResolvedStage, record: dict, what: str, bad_steps: int, last_ckpt,
             first: bool) -> MamballamaError:
    """The one-line error of a run stopped by a non-finite loss or gradient: step, likely cause, what is kept."""
    if first:
        cause = ("the input model or data already produce it (check the weights for NaN), or mixed precision "
                 "overflows (try --mixed-precision no)")
    else:
        cause = (f"a learning rate too high (--lr {st.lr:.3g}, {record.get('lr', st.lr):.3g} at this step); lower "
                 "--lr (e.g. 10x) and keep --max-grad-norm clipping on")
    kept = f"the last finite checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved before it"
    after = f" for {bad_steps} consecutive steps (--nan-patience {cfg.nan_patience})" if bad_steps > 1 else ""
    return MamballamaError(f"training stopped at step {record['step']} (stage {st.name}): {what}{after}; likely "
                           f"cause: {cause}. No model was written; {kept}")


def decide_packing(cfg, student, frozen, stages) -> tuple[bool, str]:
    """Pack only where every model honours packed boundaries; say why not otherwise."""
    mode = getattr(cfg, "packing", "off")
    if mode == "off":
        return False, "off (--packing off)"
    if mode == "concat":
        return True, f"concat (examples concatenated into full rows of {cfg.seq_len}, positions running on)"
    reason = None
    if any(st.attn_layers is not None or st.attn_ratio is not None for st in stages):
        reason = "the stages turn layers into Mamba layers, which carry state across packed boundaries"
    elif has_mamba_layers(student):
        reason = ("the student has Mamba layers; their recurrent and conv state would leak across packed "
                  "boundaries (the SSD ops take no sequence index), so batches are right-padded instead")
    else:
        for m in (student, frozen):
            if m is None:
                continue
            ok, why = packing_support(m)
            if not ok:
                reason = f"{type(m).__name__}: {why}"
                break
    if reason is None:
        return True, "on (position ids restart per example)"
    if mode == "on":
        raise UsageError(f"--packing on is not possible: {reason}; use --packing auto or off")
    return False, f"off ({reason})"
