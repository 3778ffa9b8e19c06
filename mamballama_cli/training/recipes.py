"""Training recipes: what `distill`, `sft` and `dpo` each bring to the one training loop.

The loop (:func:`mamballama_cli.training.trainer.run_training`) reads records, loads the models, lays out the
data and runs optimizer steps. Every question whose answer depends on the command goes to the run's
:class:`Recipe`: which records it reads, which frozen model it needs (a teacher or a reference), how records
become items, an item's length and a global batch's loss normaliser, the loss and metric sums of a micro-batch,
and what a held-out evaluation reports. The loop itself never asks which command it runs.

Distillation and SFT share one recipe for token data (:class:`TokenRecipe`: chat records, packing, KL and CE to
an optional teacher); DPO has its own (:class:`DPORecipe`: preference pairs against a frozen reference). A
command's recipe may hand the run to a specialisation once the student is loaded (:meth:`Recipe.for_model`):
distilling a feature draft is :class:`FeatureDraftRecipe`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from collections.abc import Callable

import torch

from mamballama_cli.errors import UsageError
from mamballama_cli.models.feature_draft import chained_passes, features_in, is_feature_draft, target_features
from mamballama_cli.output import log
from mamballama_cli.training import align
from mamballama_cli.training.config import ResolvedStage
from mamballama_cli.training.data import (as_items, collate, collate_pairs, count_true, fill_ratio, pack, pack_concat,
                                          pack_fit)
from mamballama_cli.training.encoding import encode_pairs, encode_records
from mamballama_cli.training.losses import dpo_loss, feature_draft_loss, kd_loss_auto, sequence_logps
from mamballama_cli.training.models import (default_teacher, has_mamba_layers, model_inputs, packing_support,
                                            to_device)

# (model, inputs) -> logits. The loop passes its own module-level forward, which tests replace to inject failures.
Forward = Callable[[object, dict], torch.Tensor]


class Recipe:
    """What one training command supplies to the loop. Subclasses set the four attributes and the methods."""

    kind: str = ""  # the command (distill | sft | dpo), recorded in run_config.yaml and the summary
    records: str = "chat"  # what read_records checks each record against: "chat" or "preference"
    unit: str = "rows"  # what one item is, in the run's first log line
    metric_keys: tuple[str, ...] = ("loss",)  # metric sums of a micro-batch, divided by the loss normaliser

    def eval_unit(self, frozen: bool) -> ResolvedStage:
        """The loss terms of a held-out evaluation (:func:`eval_stage`; a recipe may add to them)."""
        return eval_stage(frozen)

    def frozen_model(self, cfg, main: bool) -> tuple[str | None, str]:
        """(spec, role): the frozen model to load (None: none) and what it is called ("teacher", "reference")."""
        raise NotImplementedError

    def for_model(self, student) -> Recipe:
        """The recipe that trains this student (just loaded): this one, or a specialisation of it."""
        return self

    def layout(self, tok, records: list, cfg, stages: list[ResolvedStage], student, frozen) -> tuple[list, str]:
        """The training items (tokenised, packed or padded) and a note on packing for the log."""
        raise NotImplementedError

    def eval_items(self, tok, records: list, cfg) -> list:
        """The held-out items (never packed)."""
        raise NotImplementedError

    def length(self, item) -> int:
        """Tokens of an item (what the micro-batches are sorted by and stage lengths in tokens count)."""
        raise NotImplementedError

    def targets(self, items: list) -> int | None:
        """Target tokens of the training items, for the log (None: not counted)."""
        return None

    def count(self, items: list, indices: list[int], loss_positions: str) -> int:
        """The loss normaliser of a global batch (the items at ``indices``)."""
        raise NotImplementedError

    def loss(self, job: Job, acc, model, items: list, st: ResolvedStage, cfg, kl_scale: float,
             forward: Forward) -> tuple[torch.Tensor, dict]:
        """Loss sum and metric sums of one micro-batch (tensors on the device; ``n_tokens`` among the metrics)."""
        raise NotImplementedError

    def eval_count(self, items: list) -> int:
        """What a held-out micro-batch's metric sums are divided by."""
        raise NotImplementedError

    def eval_report(self, means: dict[str, float], frozen: bool) -> dict[str, float]:
        """The held-out numbers reported, from the means of every metric key."""
        raise NotImplementedError

    def final_length(self, cfg) -> int | None:
        """The sequence length to record in the final model's config (``distill_max_length``), or None."""
        return None


@dataclass
class Job:
    """One run's recipe and data: the frozen model (teacher or reference, on the device, eval mode), the items
    and the padding id."""

    recipe: Recipe
    frozen: object | None = None
    items: list = field(default_factory=list)
    eval_items: list | None = None
    pad_id: int = 0

    def lengths(self) -> list[int]:
        return [self.recipe.length(it) for it in self.items]

    def count(self, indices: list[int], loss_positions: str = "responses") -> int:
        return self.recipe.count(self.items, indices, loss_positions)


def eval_stage(frozen: bool) -> ResolvedStage:
    """The loss terms of a held-out evaluation: CE, and KL at temperature 1 when there is a frozen model."""
    return ResolvedStage(0, "eval", None, 1.0, None, None, "all", 1.0, (0.9, 0.98), 0.0, 0.0, 0.0, "constant", 0.0,
                         w_kl=1.0 if frozen else 0.0, w_rkl=0.0, w_ce=1.0, temperature=1.0)


# --- token data: distill and sft -----------------------------------------------------------------------------------
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


def decide_packing(cfg, student, frozen, stages) -> tuple[bool, str]:
    """Pack only where every model honours packed boundaries; say why not otherwise."""
    mode = getattr(cfg, "packing", "off")
    if mode == "off":
        return False, "off (--packing off)"
    if mode == "concat":
        return True, f"concat (examples concatenated into full rows of {cfg.seq_len}, positions running on)"
    if mode == "fit":
        return True, (f"fit (whole examples best-fit into rows of at most {cfg.seq_len}, positions running on; "
                      "longer ones cut into rows)")
    reason = None
    if any(st.attn_layers is not None or st.ratio is not None for st in stages):
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


class TokenRecipe(Recipe):
    """Chat or text records as token rows; KL to a frozen teacher (when there is one) and CE on the targets."""

    records = "chat"
    unit = "rows"
    metric_keys = ("loss", "kl", "rkl", "ce")

    def frozen_model(self, cfg, main: bool) -> tuple[str | None, str]:
        return getattr(cfg, "teacher", None), "teacher"

    def layout(self, tok, records, cfg, stages, student, frozen):
        streamed = cfg.packing in ("concat", "fit")  # these cut long records into rows themselves
        examples = encode_records(tok, records, cfg.seq_len, whole=streamed)
        use_pack, note = decide_packing(cfg, student, frozen, stages)
        if not use_pack:
            return as_items(examples), note
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(examples), generator=g).tolist()
        packer = {"concat": pack_concat, "fit": pack_fit}.get(cfg.packing, pack)
        rows = packer([examples[i] for i in order], cfg.seq_len)
        if cfg.packing == "fit":
            note += f"; {fill_ratio(rows, cfg.seq_len):.1%} of row tokens are real"
        return rows, note

    def eval_items(self, tok, records, cfg):
        return as_items(encode_records(tok, records, cfg.seq_len))

    def length(self, item) -> int:
        return len(item)

    def targets(self, items) -> int:
        return sum(it.n_targets for it in items)

    def count(self, items, indices, loss_positions):
        """Target tokens, or every predicted position with ``loss_positions: all``."""
        if loss_positions == "all":
            return sum(max(len(items[i]) - 1, 0) for i in indices)
        return sum(items[i].n_targets for i in indices)

    def loss(self, job, acc, model, items, st, cfg, kl_scale, forward):
        """``kl_scale`` multiplies the KL weights (the paper's KL summed per sequence: target tokens over
        sequences of the global batch)."""
        device = acc.device
        batch = collate(items, job.pad_id)
        inputs = model_inputs(batch, device)
        w_hidden = getattr(st, "w_hidden", 0.0)
        logits_needed = bool(st.w_kl or st.w_rkl or st.w_ce)
        t_logits, store, handles = None, {}, []
        if job.frozen is not None:
            if w_hidden:  # the teacher's forward also records the inputs and outputs of the layers to align
                handles, store = align.capture_layers(job.frozen,
                                                      align.mamba_layer_indices(acc.unwrap_model(model)))
            try:
                with torch.no_grad(), acc.autocast():
                    if logits_needed:
                        t_logits = forward(job.frozen, inputs)
                    else:  # alignment alone: the teacher's layers, not its head
                        job.frozen.model(**inputs)
            finally:
                for h in handles:
                    h.remove()
        if logits_needed:
            with acc.autocast():
                s_logits = forward(model, inputs)
            mask = loss_mask(batch, getattr(st, "loss_positions", "responses"))
            total, metrics = kd_loss_auto(s_logits, t_logits, to_device(batch["targets"], device),
                                          to_device(mask, device), w_kl=st.w_kl * kl_scale,
                                          w_rkl=st.w_rkl * kl_scale, w_ce=st.w_ce, temperature=st.temperature)
        else:
            total, metrics = torch.zeros((), device=device), {}
        if w_hidden:
            with acc.autocast():
                hidden, n_valid = align.alignment_loss(acc.unwrap_model(model), store,
                                                       to_device(batch["valid"], device))
            # per real token, counted like the other terms (the trainer divides by the global batch's target tokens)
            hidden = hidden * (float(loss_mask(batch, getattr(st, "loss_positions", "responses")).sum()) / n_valid)
            total = total + w_hidden * hidden
            metrics["hidden"] = hidden.detach()
            metrics["loss"] = total.detach()
        metrics["n_tokens"] = torch.tensor(float(batch["n_tokens"]))
        return total, metrics

    def eval_count(self, items):
        return sum(it.n_targets for it in items)

    def eval_report(self, means, frozen):
        """KL (with a teacher) and CE; the alignment term is a training signal, not a held-out number."""
        return {f"eval_{k}": means[k] for k in ("kl", "ce") if k in means and (frozen or k != "kl")}


class DistillRecipe(TokenRecipe):
    """`distill`: the teacher is required (default: the one the student records) and layer-wise alignment is a
    loss term; the final model records the length it was distilled at."""

    kind = "distill"
    metric_keys = ("loss", "kl", "rkl", "ce", "hidden")

    def frozen_model(self, cfg, main):
        if cfg.teacher:
            return cfg.teacher, "teacher"
        spec, why = default_teacher(cfg.model)
        if spec is None:
            raise UsageError(f"--teacher is required: {cfg.model} records no teacher that can be found here")
        log(f"teacher: {spec} ({why})", main)
        return spec, "teacher"

    def for_model(self, student):
        """A feature draft (`convert TARGET --feature-draft`) reads its target's features: its own recipe."""
        return FEATURE_DRAFT if is_feature_draft(student) else self

    def layout(self, tok, records, cfg, stages, student, frozen):
        for st in stages:
            if st.w_feature or st.unroll > 1 or st.unroll_decay != 1:
                flag = ("--w-feature" if st.w_feature else f"--unroll {st.unroll}" if st.unroll > 1
                        else f"--unroll-decay {st.unroll_decay}")
                raise UsageError(f"{flag} trains a feature draft (`mamballama convert TARGET --feature-draft`); "
                                 f"{cfg.model} is not one")
        return super().layout(tok, records, cfg, stages, student, frozen)

    def final_length(self, cfg):
        return cfg.seq_len


class FeatureDraftRecipe(DistillRecipe):
    """`distill` of a feature draft against its target (the teacher): the target runs once over each row, handing
    out its logits and its features f; the draft runs over the row less its first token, reading f one position
    back (:func:`~mamballama_cli.models.feature_draft.draft_forward`), and is trained towards the target's next-token
    distributions (KL, CE as for any student) and its features (``w_feature``: smooth L1,
    :func:`~mamballama_cli.training.losses.feature_draft_loss`). With ``unroll`` N > 1 the draft runs N passes per
    batch: each after the first reads, at position j, the feature the pass before predicted for position j instead
    of the target's, the way its drafting steps after the first read their own predictions (on the H200 the
    teacher-forced draft was accepted about half the time at its first proposal and rarely after: 0.58 tokens
    accepted per call at K=2, 0.64 at K=4). The passes' losses add up, pass k's weighted ``unroll_decay ** k``;
    ``kl_unrolled`` is the later passes' KL (unweighted).
    ``agree`` is the share of loss positions where the draft's top token is the target's (the first pass: what
    greedy drafting would accept at its first proposal), ``agree_unrolled`` the same summed over the later
    passes; held-out evaluation runs :attr:`EVAL_UNROLL` passes, so ``eval_agree_unrolled`` is the second
    proposal's. The passes attend as a training-time test (EAGLE-3; ``chained_passes``): pass k at position j
    sees pass 0's keys up to j - k and the later passes' along its own chain, what the (k+1)-th drafting step
    sees after a verify call; its loss covers the positions j >= k.
    The draft has no output for a row's first target (it reads tokens 1..T-1), so the loss normaliser leaves it
    out."""

    metric_keys = ("loss", "kl", "rkl", "ce", "feature", "kl_unrolled", "agree", "agree_unrolled")
    EVAL_UNROLL = 2  # held-out passes: the teacher-forced one and one on the draft's own features

    def for_model(self, student):
        return self

    def layout(self, tok, records, cfg, stages, student, frozen):
        for st in stages:
            if st.w_hidden:
                raise UsageError(f"stage {st.name!r}: --w-hidden aligns Mamba layers, which a feature draft does not "
                                 "have; train it with --template distill-feature-draft (KL and --w-feature)")
            if st.ratio is not None or st.attn_layers is not None:
                raise UsageError(f"stage {st.name!r} turns attention layers into Mamba layers; a feature draft keeps "
                                 "its one attention layer: drop ratio / attn_layers from the stage")
        width, reads = frozen.config.hidden_size, student.config.hidden_size
        if width != reads:
            raise UsageError(f"the teacher's features are {width} wide but the feature draft {cfg.model} reads "
                             f"{reads}: distil it from the target it was converted from")
        return TokenRecipe.layout(self, tok, records, cfg, stages, student, frozen)

    def count(self, items, indices, loss_positions):
        """Loss positions from the second on: a row's target tokens after its second token (every predicted
        position but the first with ``loss_positions: all``)."""
        if loss_positions == "all":
            return sum(max(len(items[i]) - 2, 0) for i in indices)
        return sum(count_true(items[i].mask[2:]) for i in indices)

    def targets(self, items):
        return sum(count_true(it.mask[2:]) for it in items)

    def eval_count(self, items):
        return self.targets(items)

    def loss(self, job, acc, model, items, st, cfg, kl_scale, forward):
        device = acc.device
        batch = collate(items, job.pad_id)
        inputs = model_inputs(batch, device)
        ids = inputs.pop("input_ids")
        with torch.no_grad(), acc.autocast():
            t_logits, features = target_features(job.frozen, ids, **inputs)
        pos = inputs.get("position_ids")
        draft_inputs = {"input_ids": ids[:, 1:], "use_cache": False, "output_hidden_states": True}
        if pos is not None:  # the draft's position j reads the target's feature at position j
            draft_inputs["position_ids"] = pos[:, :-1]
        mask = loss_mask(batch, getattr(st, "loss_positions", "responses"))
        targets, mask, valid = (to_device(t, device) for t in (batch["targets"], mask, batch["valid"]))
        reads = features[:, :-1]
        total, metrics = 0.0, {}
        unroll = max(1, getattr(st, "unroll", 1))
        row = torch.arange(mask.shape[1], device=mask.device)
        draft = acc.unwrap_model(model)
        with chained_passes(draft) if unroll > 1 else contextlib.nullcontext():
            for k in range(unroll):
                # Through the (possibly wrapped) model's own forward, with fc([embed; f]) as its input embeddings;
                # pass k attends as the (k+1)-th drafting step does (models/feature_draft.py, chained_passes).
                with acc.autocast(), features_in(draft, reads):
                    out = model(**draft_inputs)
                in_chain = (row > k)[None]  # pass k: draft positions j >= k (index j + 1 of the masks)
                loss_k, m = feature_draft_loss(
                    out.logits, out.hidden_states[-1], t_logits, features, targets, mask & in_chain,
                    valid & in_chain, w_kl=st.w_kl * kl_scale, w_rkl=st.w_rkl * kl_scale, w_ce=st.w_ce,
                    temperature=st.temperature, w_feature=getattr(st, "w_feature", 0.0))
                total = total + loss_k * (st.unroll_decay ** k)
                if k == 0:
                    metrics = m
                else:  # the later passes' KL and agreement, summed over the passes as their losses are
                    metrics["kl_unrolled"] = metrics.get("kl_unrolled", 0.0) + m["kl"]
                    metrics["agree_unrolled"] = metrics.get("agree_unrolled", 0.0) + m["agree"]
                # The next pass: position j reads what this pass predicted for f_j (its output at j - 1), as the
                # draft's second and later steps read their own predictions; position 0 (left out of its loss)
                # keeps the target's f_0.
                reads = torch.cat([features[:, :1], out.hidden_states[-1][:, :-1].detach().to(features.dtype)],
                                  dim=1)
        metrics["loss"] = total.detach()
        metrics["n_tokens"] = torch.tensor(float(batch["n_tokens"]))
        return total, metrics

    def eval_report(self, means, frozen):
        """KL, CE and the feature term (smooth L1 per position) on held-out rows."""
        return {f"eval_{k}": means[k] for k in ("kl", "ce", "feature", "kl_unrolled", "agree", "agree_unrolled")
                if k in means}

    def eval_unit(self, frozen: bool) -> ResolvedStage:
        return replace(eval_stage(frozen), unroll=self.EVAL_UNROLL)


FEATURE_DRAFT = FeatureDraftRecipe()


class SFTRecipe(TokenRecipe):
    """`sft`: CE on the responses, plus KL when a teacher is given."""

    kind = "sft"


# --- preference pairs: dpo -----------------------------------------------------------------------------------------
class DPORecipe(Recipe):
    """`dpo`: sigmoid DPO on preference pairs against a frozen reference (default: the input model)."""

    kind = "dpo"
    records = "preference"
    unit = "pairs"
    metric_keys = ("loss", "margin", "accuracy", "reward_chosen", "reward_rejected")

    def frozen_model(self, cfg, main):
        return cfg.reference or cfg.model, "reference"

    def layout(self, tok, records, cfg, stages, student, frozen):
        return encode_pairs(tok, records, cfg.seq_len, cfg.max_prompt_length), "off (preference pairs are padded)"

    def eval_items(self, tok, records, cfg):
        return encode_pairs(tok, records, cfg.seq_len, cfg.max_prompt_length)

    def length(self, item) -> int:
        return len(item.prompt) + max(len(item.chosen), len(item.rejected))

    def count(self, items, indices, loss_positions):
        """Pairs."""
        return len(indices)

    def loss(self, job, acc, model, items, st, cfg, kl_scale, forward):
        device = acc.device
        batch = collate_pairs(items, job.pad_id)
        inputs = model_inputs(batch, device)
        targets, mask = to_device(batch["targets"], device), to_device(batch["target_mask"], device)
        n = len(items)
        with torch.no_grad(), acc.autocast():
            ref = sequence_logps(forward(job.frozen, inputs), targets, mask)
        with acc.autocast():
            pol = sequence_logps(forward(model, inputs), targets, mask)
        total, metrics = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=cfg.beta,
                                  label_smoothing=cfg.label_smoothing)
        metrics["n_tokens"] = torch.tensor(float(batch["n_tokens"]))
        return total, metrics

    def eval_count(self, items):
        return len(items)

    def eval_report(self, means, frozen):
        return {f"eval_{k}": v for k, v in means.items()}


RECIPES: dict[str, Recipe] = {r.kind: r for r in (DistillRecipe(), SFTRecipe(), DPORecipe())}


def recipe_for(kind: str) -> Recipe:
    """The recipe of a training command."""
    try:
        return RECIPES[kind]
    except KeyError:
        raise UsageError(f"unknown training command {kind!r}; one of {', '.join(RECIPES)}") from None
