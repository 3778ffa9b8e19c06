"""Configs of `distill`, `sft` and `dpo`: one dataclass per command, merged once, stages resolved here.

Precedence is defaults < template < --config FILE < flags, and it holds for stage values too: a key given at
the top level of a higher source (``--lr`` on the command line, ``lr:`` in ``--config``) replaces that key in
every stage of a lower source (the template's stages). Inside one source a stage's own value beats the top
level, which is the stage default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mamballama_cli.config import option
from mamballama_cli.errors import UsageError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
TRAINABLE = ("all", "mixers", "all-but-embeddings")
PACKING = ("auto", "on", "off", "concat", "fit")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")

# Keys that steer the run but not what it computes: excluded from the config hash that --resume compares.
# The global batch (micro_batch_size x gradient_accumulation_steps x processes) is compared on its own, so a
# run may resume on another number of GPUs or with another micro-batch as long as the global batch holds.
RUN_CONTROL_KEYS = frozenset({
    "output", "force", "resume", "max_steps", "max_seconds", "fit_to_time", "save_every", "keep_checkpoints",
    "log_every", "eval_every", "eval_data", "accelerate_config", "micro_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "save_dtype", "nan_patience", "report_to",
})


@dataclass
class Stage:
    """One stage of a distillation recipe. Unset keys take the run's top-level value."""

    ALIASES: ClassVar[dict[str, str]] = {"attn_ratio": "ratio"}  # old spellings still read (config.canonical_keys)

    name: str | None = None
    steps: int | None = None  # optimizer steps; else ``tokens``, else ``epochs`` passes over the data
    tokens: float | None = None  # stage length in tokens (steps = tokens / (global batch x mean item length))
    epochs: float | None = None
    ratio: float | None = None  # fraction of layers that keep attention (0.25 = 75% Mamba), as `convert --ratio`
    attn_layers: str | None = None  # explicit "3,7,11" or "none" (overrides ratio), as `convert --attn-layers`
    trainable: str | None = None  # "all", "mixers" (Mamba mixers only) or "all-but-embeddings" (no embedding, head)
    lr: float | None = None
    betas: list[float] | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    warmup: float | None = None  # < 1: fraction of the stage's steps; >= 1: steps
    schedule: str | None = None
    min_lr_ratio: float | None = None
    w_kl: float | None = None
    w_rkl: float | None = None
    w_ce: float | None = None
    temperature: float | None = None
    w_hidden: float | None = None  # layer-wise alignment of the Mamba layers to the teacher's (training/align.py)
    w_feature: float | None = None  # a feature draft's predicted features to the target's (smooth L1; recipes.py)
    unroll: int | None = None  # a feature draft's passes: the first on the target's features, the rest on its own
    unroll_decay: float | None = None  # pass k's loss weighted unroll_decay ** k (1: every pass alike)
    loss_positions: str | None = None  # responses (targets only) | all (every real token of every record)
    kl_reduction: str | None = None  # token (mean per token) | sequence (sum per sequence, the paper's code)


# Stage keys that inherit from the top level of the config.
INHERITED = ("steps", "tokens", "epochs", "trainable", "lr", "betas", "weight_decay", "max_grad_norm", "warmup", "schedule",
             "min_lr_ratio", "w_kl", "w_rkl", "w_ce", "temperature", "w_hidden", "w_feature", "unroll",
             "unroll_decay", "loss_positions", "kl_reduction")

LOSS_POSITIONS = ("responses", "all")
KL_REDUCTIONS = ("token", "sequence")

# Help shared by several fields.
TRAIN_DATA_HELP = ("JSONL ({'messages': [...]}, {'text': ...} or {'prompt', 'response'}), a local data set "
                   "(save_to_disk folder, .parquet, .arrow), a folder from `data build` (its train split) or `data "
                   "generate`, a Hugging Face dataset name, or builtin:pydoc-topics; several comma-separated are "
                   "concatenated.")
TEXT_FIELD_HELP = "Field holding each record's text (a string) or conversation (a message list)."
TEXT_FIELD_DEFAULT = "messages, text or prompt+response"
PACKING_HELP = ("auto, on, off or concat. on packs rows with position ids restarting per example, where every model "
                "keeps packed examples apart (auto: where possible; a hybrid with Mamba layers is right-padded "
                "instead); concat joins records into full rows with positions running on: exact for KD with any "
                "model; fit is concat without cutting a record shorter than a row (best-fit; rows padded where "
                "nothing fits).")


@dataclass
class TrainConfig:
    """Options shared by distill, sft and dpo (also readable from --config FILE or a --template)."""

    model: str = ""  # the model to train: a checkpoint directory or 'default' (the command's argument MODEL)
    data: str = option("", help=TRAIN_DATA_HELP)
    data_split: str = option("train", help="Split of a Hugging Face dataset or of a saved DatasetDict in --data.")
    text_field: str | None = option(None, help=TEXT_FIELD_HELP, default_text=TEXT_FIELD_DEFAULT)
    eval_data: str | None = option(None, help="Held-out data of the same format (of a `data build` folder, its "
                                   "held-out split): CE, and KL to the teacher, at stage starts and ends (and every "
                                   "--eval-every steps), once per state of the weights.")
    output: str = option("", flags=("--output", "-o"), help="Run directory: checkpoints, metrics, final model.")
    force: bool = option(False, help="Replace a non-empty --output.")
    resume: bool = option(False, help="Continue the run in --output from its last checkpoint.")
    seq_len: int = option(2048, help="Tokens per sequence.")
    micro_batch_size: int = option(4, help="Sequences per device per forward.")
    gradient_accumulation_steps: int = option(1, help="Micro-batches per optimizer step (global batch = "
                                              "micro-batch x this x processes).")
    steps: int | None = option(None, help="Optimizer steps per stage (instead of --tokens and --epochs).")
    tokens: float | None = option(None, help="Tokens per stage (instead of --epochs).")
    epochs: float = option(1.0, help="Passes over the data per stage.")
    max_steps: int | None = option(None, help="Stop after this many steps in all (with a checkpoint); --resume "
                                   "continues.", default_text="no limit")
    max_seconds: float | None = option(None, help="Wall-clock budget in seconds: stop there, checkpoint, and still "
                                       "write the final model.", default_text="no limit")
    fit_to_time: bool = option(False, help="With --max-seconds: shorten every stage by one factor, re-measured "
                               "as it runs, so that the schedule (its learning-rate decay included) ends inside "
                               "the budget instead of being cut mid-way.")
    lr: float = option(2e-5, help="Peak learning rate.")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = option(0.0, help="AdamW weight decay (on matrices only).")
    max_grad_norm: float = option(1.0, help="Clip the gradient norm (0: off).")
    warmup: float = option(0.01, help="Warm-up: a fraction of the stage's steps (<1) or steps (>=1).")
    schedule: str = option("cosine", help=f"Learning-rate decay after the warm-up: {', '.join(SCHEDULES)}.")
    min_lr_ratio: float = 0.0
    trainable: str = option("all", help="all, mixers (the Mamba mixers only) or all-but-embeddings (the embedding "
                            "and the head frozen: a draft that shares its target's).")
    mixed_precision: str = option("auto", help="auto (bf16 on CUDA, no on CPU), bf16, fp16, no.")
    gradient_checkpointing: bool = option(False, flags=("--gradient-checkpointing/--no-gradient-checkpointing",),
                                          help="Recompute activations in the backward pass: less memory, slower.")
    seed: int = option(0, help="Seed of the data order and of freshly initialised parameters.")
    save_every: int = option(0, help="Steps between checkpoints (0: only at stage ends and at the end).")
    keep_checkpoints: int = option(2, help="Checkpoints kept in the run directory, older ones deleted.")
    log_every: int = option(1, help="Steps between progress lines when stderr is not a terminal (metrics.jsonl has "
                            "every step).")
    eval_every: int = option(0, help="Steps between held-out evaluations (0: stage starts and ends only).")
    skip_bad_lines: bool = option(False, help="Skip malformed data lines (with a count) instead of stopping.")
    nan_patience: int = option(0, help="Consecutive steps with a non-finite loss or gradient to skip before "
                               "stopping (0: stop at the first, keeping the last finite checkpoint).")
    save_dtype: str = option("auto", help=f"Dtype of the final model: {', '.join(SAVE_DTYPES)} (auto: the input "
                             "model's).")
    report_to: str = option("none", help="Experiment trackers that get every step's and evaluation's metrics, "
                            "through accelerate: a comma list of tensorboard (into RUN/trackers/), wandb, mlflow, "
                            "aim, comet_ml, clearml, dvclive, swanlab, trackio; each needs its package. metrics.jsonl "
                            "is written either way.")
    accelerate_config: str | None = option(None, help="Run under `accelerate launch` with this config: a file, or "
                                           "the name of one of templates/accelerate/*.yaml (single-gpu, ddp, fsdp, "
                                           "zero2, zero3).", default_text="this process alone")

    def validate(self) -> None:
        if not self.model:
            raise UsageError("MODEL is required: the checkpoint directory to train")
        if not self.data:
            raise UsageError("--data is required: a JSONL file, a local data set (folder, .parquet, .arrow), a "
                             "folder from `mamballama data build` or `data generate`, a Hugging Face dataset name "
                             "or builtin:pydoc-topics")
        if not self.output:
            raise UsageError("--output is required: the run directory (checkpoints, metrics, final model)")
        if self.force and self.resume:
            raise UsageError("--force and --resume contradict each other: --force starts over, --resume continues")
        for name, low in (("seq_len", 8), ("micro_batch_size", 1), ("gradient_accumulation_steps", 1),
                          ("keep_checkpoints", 1), ("log_every", 1)):
            if int(getattr(self, name)) < low:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least {low}")
        if self.nan_patience < 0:
            raise UsageError(f"--nan-patience {self.nan_patience} must be 0 (stop at the first) or more")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps {self.max_steps} must be at least 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise UsageError(f"--max-seconds {self.max_seconds} must be positive")
        if self.fit_to_time and self.max_seconds is None:
            raise UsageError("--fit-to-time fits the schedule to --max-seconds: give --max-seconds S too")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"--mixed-precision {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UsageError(f"--save-dtype {self.save_dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
        self.trackers()  # a name accelerate does not know, or whose package is missing, fails here
        _check_stage_values(self, "")

    def trackers(self) -> list[str]:
        """The --report-to names, each checked against accelerate's trackers and its package."""
        names = [n.strip() for n in str(self.report_to or "").split(",") if n.strip() and n.strip() != "none"]
        if not names:
            return []
        import accelerate.utils
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for name in names:
            if name not in LOGGER_TYPE_TO_CLASS:
                raise UsageError(f"--report-to {name!r} is not a tracker accelerate knows: give a comma list of "
                                 f"{', '.join(LOGGER_TYPE_TO_CLASS)}, or none")
            available = getattr(accelerate.utils, f"is_{name}_available", None)
            if available is not None and not available():
                package = {"tensorboard": "tensorboard (or tensorboardX)", "comet_ml": "comet-ml"}.get(name, name)
                raise UsageError(f"--report-to {name}: its package is not installed; pip install {package}")
        return names

    def resolved_stages(self) -> list[ResolvedStage]:
        return [resolve_stage(self, Stage(name="train"), 0)]


@dataclass
class DistillConfig(TrainConfig):
    """`mamballama distill`: KL/CE to a frozen teacher, optionally in progressive stages."""

    # The help of the command's MODEL argument and of --template (cli/options.training_command).
    MODEL_HELP: ClassVar[str] = ("The student: a hybrid from `convert` (or the teacher itself, with a template whose "
                                 "stages convert it), a checkpoint directory.")
    TEMPLATE_HELP: ClassVar[str] = ("Recipe from templates/ (default: distill-default: layer-wise alignment, then KD "
                                    "of the mixers, then KD of everything); distill-paper (the paper's recipe), "
                                    "distill-e2e, distill-align; 'none' for the options alone.")

    teacher: str | None = option(None, help="Teacher checkpoint, .gguf, hub id or 'default'.",
                                 default_text="the teacher recorded by convert")
    w_kl: float = option(1.0, help="Weight of KL(teacher || student), the forward KL.")
    w_rkl: float = option(0.0, help="Weight of KL(student || teacher), the reverse KL.")
    w_ce: float = option(0.0, help="Weight of CE on the response tokens.")
    temperature: float = option(1.0, help="Softening of both distributions.")
    w_hidden: float = option(0.0, help="Weight of the teacher-forced alignment of each Mamba layer to the teacher "
                             "layer it replaced (one process).")
    w_feature: float = option(0.0, help="Weight of a feature draft's feature loss: smooth L1 between its last hidden "
                              "state and the target's (models/feature_draft.py).")
    unroll: int = option(1, help="A feature draft's training passes per batch: the first reads the target's "
                         "features; pass k reads the features pass k-1 predicted and attends as the (k+1)-th "
                         "drafting step does (a training-time test).")
    unroll_decay: float = option(1.0, help="Weight of a feature draft's later passes: pass k's loss counts "
                                 "unroll_decay ** k (1: every pass alike; below 1 favours the first proposal).")
    loss_positions: str = option("responses", help="responses (the target tokens) or all (every real token, "
                                 "prompts included: the teacher's logits on prompts too).")
    kl_reduction: str = option("token", help="token (KL averaged per token) or sequence (summed per sequence, as "
                               "the paper's code's batchmean).")
    packing: str = option("auto", help=PACKING_HELP)
    stages: list[Stage] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        if self.packing not in PACKING:
            raise UsageError(f"--packing {self.packing!r} is not one of {', '.join(PACKING)}")
        for i, st in enumerate(self.stages):
            _check_stage_values(st, f"stages[{i}].")
        resolved = self.resolved_stages()
        for s in resolved:
            if not (s.w_kl or s.w_rkl or s.w_ce or s.w_hidden or s.w_feature):
                raise UsageError(f"stage {s.name!r}: every loss weight is 0: set --w-kl, --w-rkl, --w-ce, --w-hidden "
                                 "or --w-feature")

    def resolved_stages(self) -> list[ResolvedStage]:
        specs = list(self.stages) or [Stage(name="train")]
        return [resolve_stage(self, st, i) for i, st in enumerate(specs)]


@dataclass
class SFTConfig(TrainConfig):
    """`mamballama sft`: cross-entropy on response tokens, optionally plus KL to a teacher."""

    MODEL_HELP: ClassVar[str] = "Checkpoint directory to fine-tune (a hybrid, a draft, any causal LM)."
    TEMPLATE_HELP: ClassVar[str] = "Recipe from templates/ (e.g. sft)."

    teacher: str | None = option(None, help="Teacher checkpoint, .gguf, hub id or 'default', for the KL terms "
                                 "(--w-kl, --w-rkl).", default_text="none")
    w_kl: float = option(0.0, help="Weight of KL(teacher || student); needs --teacher.")
    w_rkl: float = option(0.0, help="Weight of KL(student || teacher); needs --teacher.")
    w_ce: float = option(1.0, help="Weight of CE on the response tokens.")
    temperature: float = option(1.0, help="Softening of both distributions in the KL terms.")
    packing: str = option("auto", help=PACKING_HELP)

    def validate(self) -> None:
        super().validate()
        if self.packing not in PACKING:
            raise UsageError(f"--packing {self.packing!r} is not one of {', '.join(PACKING)}")
        if (self.w_kl or self.w_rkl) and not self.teacher:
            raise UsageError("--w-kl/--w-rkl need a --teacher to take the KL to")
        if not (self.w_kl or self.w_rkl or self.w_ce):
            raise UsageError("every loss weight is 0: set --w-ce (and --w-kl with a --teacher)")


@dataclass
class DPOConfig(TrainConfig):
    """`mamballama dpo`: sigmoid DPO against a frozen reference (default: the input model)."""

    MODEL_HELP: ClassVar[str] = "Checkpoint directory to train (usually the distilled/SFT hybrid)."
    TEMPLATE_HELP: ClassVar[str] = "Recipe from templates/ (e.g. dpo)."

    data: str = option("", help="JSONL of {'prompt', 'chosen', 'rejected'} (strings or message lists), a local "
                       "data set (save_to_disk folder, .parquet, .arrow) or a Hugging Face dataset name; several "
                       "comma-separated are concatenated.")
    text_field: str | None = None  # not an option of dpo: pairs are read from 'prompt', 'chosen' and 'rejected'
    eval_data: str | None = option(None, help="Held-out pairs: DPO margin and accuracy, at stage starts and ends "
                                   "(and every --eval-every steps).")
    seq_len: int = option(2048, help="Prompt + answer tokens per row.")
    micro_batch_size: int = option(4, help="Pairs per device per forward.")
    reference: str | None = option(None, help="Frozen reference model.", default_text="MODEL")
    beta: float = option(0.01, help="DPO beta (0.01 is the paper's).")
    max_prompt_length: int | None = option(None, help="Prompt tokens kept (from the end).",
                                           default_text="half of --seq-len")
    label_smoothing: float = option(0.0, help="Conservative DPO (0: plain sigmoid DPO).")

    def validate(self) -> None:
        super().validate()
        if self.text_field:
            raise UsageError("text_field applies to distill and sft; dpo reads 'prompt', 'chosen' and 'rejected'")
        if self.beta <= 0:
            raise UsageError(f"--beta {self.beta} must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise UsageError(f"--label-smoothing {self.label_smoothing} must be in [0, 0.5)")
        if self.max_prompt_length is None:
            self.max_prompt_length = self.seq_len // 2
        if not 1 <= self.max_prompt_length < self.seq_len:
            raise UsageError(f"--max-prompt-length {self.max_prompt_length} must be below --seq-len {self.seq_len}")


@dataclass
class ResolvedStage:
    """A stage with every value filled in (steps may still be None until the data size is known)."""

    index: int
    name: str
    steps: int | None
    epochs: float
    attn_layers: str | None
    ratio: float | None
    trainable: str
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    max_grad_norm: float
    warmup: float
    schedule: str
    min_lr_ratio: float
    w_kl: float = 0.0
    w_rkl: float = 0.0
    w_ce: float = 1.0
    temperature: float = 1.0
    w_hidden: float = 0.0
    loss_positions: str = "responses"
    kl_reduction: str = "token"
    tokens: float | None = None
    w_feature: float = 0.0
    unroll: int = 1
    unroll_decay: float = 1.0

    def warmup_steps(self, steps: int) -> int:
        return int(round(self.warmup * steps)) if self.warmup < 1 else int(self.warmup)


def resolve_stage(cfg: TrainConfig, st: Stage, index: int) -> ResolvedStage:
    def pick(key, default=None):
        v = getattr(st, key, None)
        if v is None:
            v = getattr(cfg, key, default)
        return default if v is None else v

    own_length = st.steps is not None or st.tokens is not None or st.epochs is not None
    steps = st.steps if st.steps is not None else (cfg.steps if not own_length else None)
    tokens = st.tokens if st.tokens is not None else (getattr(cfg, "tokens", None) if not own_length else None)
    if steps is not None:
        tokens = None
    epochs = st.epochs if st.epochs is not None else cfg.epochs
    betas = pick("betas")
    return ResolvedStage(
        index=index, name=st.name or f"stage{index + 1}", steps=steps, epochs=float(epochs),
        attn_layers=st.attn_layers, ratio=st.ratio, trainable=pick("trainable", "all"),
        lr=float(pick("lr")), betas=(float(betas[0]), float(betas[1])), weight_decay=float(pick("weight_decay")),
        max_grad_norm=float(pick("max_grad_norm") or 0.0), warmup=float(pick("warmup")),
        schedule=pick("schedule"), min_lr_ratio=float(pick("min_lr_ratio")), w_kl=float(pick("w_kl", 0.0)),
        w_rkl=float(pick("w_rkl", 0.0)), w_ce=float(pick("w_ce", 0.0)), temperature=float(pick("temperature", 1.0)),
        w_hidden=float(pick("w_hidden", 0.0)), loss_positions=pick("loss_positions", "responses"),
        kl_reduction=pick("kl_reduction", "token"), tokens=None if tokens is None else float(tokens),
        w_feature=float(pick("w_feature", 0.0)), unroll=int(pick("unroll", 1)),
        unroll_decay=float(pick("unroll_decay", 1.0)),
    )


def _one_of(choices):
    return lambda v: v in choices, lambda v: f"{v!r} is not one of {', '.join(choices)}"


_POSITIVE = (lambda v: v > 0, lambda v: f"{v} must be positive")
_NOT_NEGATIVE = (lambda v: not v < 0, lambda v: f"{v} must not be negative")

# (key, (test, why it failed)) in the order they are checked; a value of None is not checked.
_STAGE_RULES = (
    ("schedule", _one_of(SCHEDULES)),
    ("trainable", _one_of(TRAINABLE)),
    ("lr", _POSITIVE),
    ("loss_positions", _one_of(LOSS_POSITIONS)),
    ("kl_reduction", _one_of(KL_REDUCTIONS)),
    ("tokens", (lambda v: float(v) >= 1, lambda v: f"{v} must be at least 1")),
    ("temperature", _POSITIVE),
    *((key, _NOT_NEGATIVE) for key in ("w_kl", "w_rkl", "w_ce", "w_hidden", "w_feature", "weight_decay",
                                       "max_grad_norm", "warmup", "min_lr_ratio")),
    ("betas", (lambda v: len(v) == 2 and all(0 <= float(b) < 1 for b in v),
               lambda v: f"{v} must be two numbers in [0, 1), e.g. [0.9, 0.98]")),
    ("ratio", (lambda v: 0 <= v <= 1, lambda v: f"{v} is outside [0, 1]")),
    ("steps", (lambda v: not int(v) < 1, lambda v: f"{v} must be at least 1")),
    ("unroll", (lambda v: float(v) == int(v) and not int(v) < 1, lambda v: f"{v} must be a whole number, at least 1")),
    ("unroll_decay", (lambda v: 0 < float(v) <= 1, lambda v: f"{v} is outside (0, 1]: pass k counts decay ** k")),
    ("epochs", _POSITIVE),
)


def _check_stage_values(obj, prefix: str) -> None:
    def flag(name):
        return f"{prefix}{name}" if prefix else f"--{name.replace('_', '-')}"

    for key, (ok, why) in _STAGE_RULES:
        v = getattr(obj, key, None)
        if v is not None and not ok(v):
            raise UsageError(f"{flag(key)} {why(v)}")


def merge_train_config(cls, *, template: str | None, config_file: str | Path | None, overrides: dict):
    """defaults < template < config file < flags, with flags (and file keys) replacing stage values below them."""
    from mamballama_cli.config import _check_keys, build, check_types, find_template, read_yaml

    given = {k: v for k, v in overrides.items() if v is not None}
    if template is not None and template.strip().lower() == "none":  # flags (and --config) alone
        template = None
    layers: list[tuple[str, dict]] = []
    if template:
        tpath = find_template(template)
        layers.append((f"template {tpath.name}", read_yaml(tpath)))
    if config_file:
        layers.append((f"config file {config_file}", read_yaml(config_file)))
    layers.append(("command line", given))
    for source, data in layers:
        _check_keys(cls, data, source)
        for i, st in enumerate(data.get("stages") or []):
            if not isinstance(st, dict):
                raise UsageError(f"{source}: stages[{i}] must be a mapping of stage keys")
            _check_keys(Stage, st, f"{source} stages[{i}]")
        check_types(cls, data, source)
    merged: dict = {}
    for depth, (_, data) in enumerate(layers):
        above = {k for _, d in layers[depth + 1:] for k in d}  # top-level keys a higher source sets
        strip = {k for k in above if k in INHERITED}
        if strip & {"steps", "tokens", "epochs"}:  # a length given higher up replaces every spelling below
            strip |= {"steps", "tokens", "epochs"}
        data = dict(data)
        if "stages" in data:
            data["stages"] = [{k: v for k, v in st.items() if k not in strip} for st in data["stages"] or []]
        for k in ("steps", "tokens", "epochs"):
            if k in strip and k not in above:
                data.pop(k, None)
        merged.update(data)
    cfg = build(cls, merged)
    cfg.validate()
    return cfg


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def canonical_config(cfg_dict: dict) -> dict:
    """A saved config with the keys this version writes (a run saved before `ratio` was one name says
    ``attn_ratio`` in its stages), so that it still resumes."""
    stages = cfg_dict.get("stages")
    if not stages:
        return cfg_dict
    return {**cfg_dict, "stages": [{Stage.ALIASES.get(k, k): v for k, v in st.items()} if isinstance(st, dict) else st
                                   for st in stages]}


def config_hash(cfg_dict: dict) -> str:
    """Hash of what the run computes: the resolved config without run-control keys."""
    core = {k: v for k, v in canonical_config(cfg_dict).items() if k not in RUN_CONTROL_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict) -> list[str]:
    old, new = canonical_config(old), canonical_config(new)
    keys = sorted((set(old) | set(new)) - RUN_CONTROL_KEYS)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
