"""The accelerate side of training: the accelerator and its engine (one process, DDP, FSDP, DeepSpeed), loading
models around ZeRO-3, the optimizer, its learning-rate schedule and gradient clipping."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from mamballama_cli.errors import UsageError
from mamballama_cli.training.config import ResolvedStage


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
    trackers = cfg.trackers()
    acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_with=trackers or None,
                      project_dir=str(Path(cfg.output) / "trackers") if trackers else None)
    # The recipe decides accumulation, not an environment variable left by `accelerate launch`.
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    _world_from_process_group(acc)
    return acc


def start_trackers(acc, cfg_d: dict):
    """The --report-to trackers started with the run's configuration (scalars as they are, anything else as
    text: TensorBoard's hyperparameters take nothing else; credentials in a URL blanked, since a tracker may upload
    them); None when there are none."""
    if not acc.log_with:
        return None
    from mamballama_cli.redact import redact_text

    flat = {k: v if v is None or isinstance(v, (bool, int, float)) else redact_text(v if isinstance(v, str) else
                                                                                    json.dumps(v))
            for k, v in cfg_d.items()}
    acc.init_trackers("mamballama", config=flat)
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


def frozen_dtype(acc):
    mp = acc.mixed_precision
    if acc.device.type == "cuda" and mp == "bf16":
        return torch.bfloat16
    if acc.device.type == "cuda" and mp == "fp16":
        return torch.float16
    return torch.float32


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


class TimeFit:
    """``--fit-to-time``: fit the stages to ``--max-seconds`` so that the schedule, its learning-rate decay included,
    ends inside the budget instead of being cut where the clock runs out.

    A stage's time per step (wall clock from one step's end to the next: logging and checks included) is measured
    over its first steps (the first :attr:`SKIP` left out: compilation, warm-up) and again every eighth of what
    remains: the mean of the last :attr:`WINDOW` steps, each counted at most :attr:`SPIKE` times their median, so
    that a step which compiled kernels for a new shape does not speak for the steps after it. The rest of the plan
    (this stage's remaining steps and every later stage's) is then set by one factor to fit the time left, less
    :attr:`RESERVE` of the budget for the checkpoints and the final model. It shrinks whenever it must, and grows
    back (never beyond ``ceiling``, the plan the run started with) only when the fit is :attr:`REGROW` longer than
    the plan in force: on 2026-12-04 an early measurement, slowed by kernels compiling, cut a 300 s feature-draft
    run to 587 steps that then took 136 s. A later stage re-measures its own step time. The main process decides
    and every process follows (``agree``).

    Where steps are long against the budget (a CPU trial, a large model on few GPUs), waiting for the first full
    measurement would spend those steps on the long plan's warm-up, at a sliver of the learning rate (a 180-s CPU
    run of the default teacher's hybrid: 10 steps at 15 s, 2% of the peak rate). So each step before it, from the
    first past the skipped ones, checks the plan against the fastest step measured so far: where even at that
    rate the plan overshoots the time left :attr:`EARLY` times over, it is shrunk to fit at once (once a stage),
    and the full measurement refines it, growing it back if it was too short."""

    SKIP, WINDOW, RESERVE, SPIKE, REGROW, EARLY = 2, 8, 0.05, 3.0, 1.10, 2.0

    def __init__(self, max_seconds: float, t_start: float, agree=None, clock=time.perf_counter,
                 ceiling: list[int] | None = None):
        self.budget, self.t_start, self.clock = float(max_seconds), t_start, clock
        self.agree = agree or (lambda plan: plan)
        self.ceiling = list(ceiling) if ceiling is not None else None
        self.times: list[float] = []
        self.next_at = self.last = 0
        self.early = False  # the stage's plan was shrunk before its first full measurement

    def stage_start(self, start: int) -> None:
        self.times = []
        self.next_at = start + self.SKIP + self.WINDOW
        self.last = self.clock()
        self.early = False

    def step_seconds(self) -> float:
        """The time per step from the last :attr:`WINDOW` measured steps, spikes clipped (see the class)."""
        recent = self.times[self.SKIP:][-self.WINDOW:]
        cap = self.SPIKE * statistics.median(recent)
        return sum(min(t, cap) for t in recent) / len(recent)

    def after_step(self, done: int, plan: list[int], si: int) -> list[int] | None:
        """After step ``done`` (1-based) of stage ``si``: a new plan, or None."""
        now = self.clock()
        self.times.append(now - self.last)
        self.last = now
        if len(self.times) <= self.SKIP:
            return None
        left = self.budget * (1.0 - self.RESERVE) - (now - self.t_start)
        if done < self.next_at:  # before the full measurement: only a plan far too long changes (the class)
            if self.early:
                return None
            fastest = min(self.times[self.SKIP:])
            rest = plan[si] - done + sum(plan[si + 1:])
            new = self.agree(fitted_plan(plan, si, done, fastest, left) if fastest * rest > self.EARLY * left
                             else list(plan))  # every process calls agree at the same steps
            self.early = new != plan
            return new if self.early else None
        step_s = self.step_seconds()
        new = fitted_plan(plan, si, done, step_s, left)
        if new == plan and self.ceiling is not None:  # it fits: room to grow back towards the ceiling?
            grown = fitted_plan(self.ceiling, si, done, step_s, left)
            if sum(grown[si:]) - done >= self.REGROW * (sum(plan[si:]) - done):
                new = list(plan[:si]) + grown[si:]
        new = self.agree(new)
        self.next_at = done + max(self.WINDOW, (new[si] - done) // 8)
        return new if new != plan else None


def fitted_plan(plan: list[int], si: int, done: int, step_s: float, left_s: float) -> list[int]:
    """``plan`` (steps per stage) shrunk so that what remains of it, from step ``done`` of stage ``si`` on at
    ``step_s`` seconds a step, takes at most ``left_s`` seconds: every remaining part by the same factor, each
    later stage at least one step. Unchanged when it already fits."""
    rest = [plan[si] - done] + list(plan[si + 1:])
    need = step_s * sum(rest)
    if need <= left_s or sum(rest) == 0:
        return list(plan)
    f = max(0.0, left_s) / need
    return (list(plan[:si]) + [done + int(rest[0] * f)]
            + [max(1, int(n * f)) for n in plan[si + 1:]])


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


def clip_and_norm(acc, model, st: ResolvedStage, engine: str) -> float | None:
    if engine == "deepspeed":  # DeepSpeed clips inside its step (gradient_clipping in its config)
        norm = acc.deepspeed_engine_wrapped.get_global_grad_norm()
        return None if norm is None else float(norm)
    max_norm = st.max_grad_norm if st.max_grad_norm and st.max_grad_norm > 0 else float("inf")
    norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    return None if norm is None else float(norm)


# --- memory on a CPU run ------------------------------------------------------------------------------------------
def _data_segment() -> int | None:
    """This process's writable private memory as RLIMIT_DATA counts it (VmData), in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:")), None)
    except (OSError, ValueError, IndexError):
        return None


def cap_cpu_memory(device, margin: float = 0.05):
    """On a CPU run, cap this process's writable private memory (RLIMIT_DATA) at what it holds now plus the RAM
    the system has available, less ``margin`` of it. A micro-batch too large then fails in torch's allocator, which
    the trainer answers with its out-of-memory advice, instead of the kernel's OOM killer ending the run with no
    word said. Returns a function that puts the previous limit back (a no-op where none was set: not a CPU run,
    not Linux, or a tighter limit already in place)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return lambda: None
    if torch.device(device).type != "cpu":
        return lambda: None
    from mamballama_cli.generation.fast import available_bytes

    held, free = _data_segment(), available_bytes("cpu")
    if held is None or free is None:
        return lambda: None
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = held + int(free * (1 - margin))
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        return lambda: None
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    except (ValueError, OSError):
        return lambda: None
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU's out-of-memory error, or an allocation that failed on the CPU (torch's allocator, or Python's)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc) and "allocate" in str(exc)
