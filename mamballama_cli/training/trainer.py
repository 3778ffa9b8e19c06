"""The training loop shared by `distill`, `sft` and `dpo`, on accelerate (one process, DDP, FSDP, DeepSpeed).

One optimizer step reads one global batch (micro_batch_size x gradient_accumulation_steps x processes items,
chosen by :class:`~mamballama_cli.training.data.BatchPlan`). Each process runs its accumulation_steps
micro-batches; every micro-batch loss is a *sum* over target tokens (pairs for DPO) and is scaled by
``accum * processes / count(global batch)`` before backward, so that after accelerate's division by the
accumulation steps and the engines' averaging over processes the gradient is that of the mean over the whole
global batch, however it is split.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from mamballama_cli.convert.placement import resolve_attention_layers
from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log
from mamballama_cli.training import checkpoint as ck
from mamballama_cli.training.config import ResolvedStage, config_dict, config_hash
from mamballama_cli.training.data import BatchPlan, split_global_batch
from mamballama_cli.training.engine import (TimeFit, build_optimizer, cap_cpu_memory, clip_and_norm,
                                            configure_deepspeed, engine_name, frozen_dtype, is_out_of_memory, lr_at,
                                            make_accelerator, set_lr, start_trackers, whole_models)
from mamballama_cli.training.models import (check_same_vocabulary, load_frozen, load_trainable, relayout,
                                            set_trainable)
from mamballama_cli.training.recipes import Job, recipe_for
from mamballama_cli.training.records import read_records
from mamballama_cli.training.report import Reporter
from mamballama_cli.training.saving import (init_run_dir, input_dtype_name, prepare_run_dir, restore_optimizer,
                                            restore_rng, save_checkpoint, write_final_model)


# --- forward passes (module-level so that tests can inject failures such as running out of memory) -------------
def forward_logits(model, inputs: dict):
    return model(**inputs).logits


def micro_step(job: Job, acc, model, items: list, st: ResolvedStage, cfg, kl_scale: float = 1.0
               ) -> tuple[torch.Tensor, dict]:
    """Loss sum and metric sums of one micro-batch, by the run's recipe, through :func:`forward_logits`."""
    return job.recipe.loss(job, acc, model, items, st, cfg, kl_scale, forward_logits)


def reduce_sums(acc, sums: dict, keys) -> dict[str, float]:
    """Sum per-process metric sums (tensors or numbers) over processes; missing keys count 0."""
    vec = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64).to(acc.device) for k in keys])
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="sum")
    return dict(zip(keys, vec.tolist()))


@torch.no_grad()
def evaluate(job: Job, acc, model, cfg, on_batch=None) -> dict:
    """Held-out metrics per target token (KL at temperature 1, CE) or per pair (DPO); all processes join.
    ``on_batch(done, total)`` is called after each batch (progress on a long evaluation)."""
    items = job.eval_items
    if not items:
        return {}
    model.eval()
    W, r, mb = acc.num_processes, acc.process_index, cfg.micro_batch_size
    keys = job.recipe.metric_keys + ("count",)
    sums: dict[str, float] = {}
    unit = job.recipe.eval_unit(job.frozen is not None)
    starts = range(0, len(items), mb * W)
    for done, start in enumerate(starts, 1):
        mine = items[start + r * mb: start + (r + 1) * mb]
        weight = 1.0
        if not mine:  # every process must run the same number of forwards (sharded engines gather weights)
            mine, weight = items[:1], 0.0
        _, m = micro_step(job, acc, model, mine, unit, cfg)
        count = job.recipe.eval_count(mine)
        for k in keys:
            v = count if k == "count" else float(m.get(k, torch.tensor(0.0)))
            sums[k] = sums.get(k, 0.0) + weight * v
        if on_batch is not None:
            on_batch(done, len(starts))
    model.train()
    total = reduce_sums(acc, sums, keys)
    n = max(total.pop("count"), 1.0)
    return job.recipe.eval_report({k: v / n for k, v in total.items()}, job.frozen is not None)


# --- the run ----------------------------------------------------------------------------------------------------
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
    recipe = recipe_for(kind)
    cfg_d = {"command": kind, **config_dict(cfg)}
    engine = engine_name(acc)

    resume_ckpt = prepare_run_dir(acc, cfg, cfg_d, global_batch)
    # Read the data before loading any model: a bad file should fail in a second, not after a minute.
    # Shard folders come back pre-tokenised; encode_records checks them against the tokenizer and passes them on.
    records = read_records(cfg.data, split=cfg.data_split, kind=recipe.records, skip_bad=cfg.skip_bad_lines,
                           text_field=cfg.text_field)
    eval_records = (read_records(cfg.eval_data, split=cfg.data_split, kind=recipe.records, heldout=True,
                                 skip_bad=cfg.skip_bad_lines, text_field=cfg.text_field) if cfg.eval_data else None)

    student, job, tok, frozen_spec = load_models(acc, cfg, recipe, str(resume_ckpt) if resume_ckpt else cfg.model)
    recipe = job.recipe  # the command's recipe, or its specialisation for this student (Recipe.for_model)

    # Tokenise and lay out the data.
    stages = cfg.resolved_stages()
    if any(getattr(st, "w_hidden", 0.0) for st in stages) and acc.num_processes > 1:
        raise UsageError(f"--w-hidden (layer-wise alignment) runs on one process; this run has {acc.num_processes}. "
                         "Run the alignment stage alone without accelerate launch, then the rest distributed")
    job.items, packing_note = recipe.layout(tok, records, cfg, stages, student, job.frozen)
    job.eval_items = recipe.eval_items(tok, eval_records, cfg) if eval_records else None
    lengths = job.lengths()
    n_targets = recipe.targets(job.items)

    plans = [BatchPlan(len(job.items), global_batch, cfg.seed, st.index) for st in stages]
    stage_steps = stage_lengths(stages, plans, lengths, global_batch)
    planned = list(stage_steps)  # the recipe's plan; --fit-to-time (and a resumed fitted run) may shorten it
    total_steps = sum(stage_steps)
    log(f"{kind}: {len(job.items)} {recipe.unit} from {cfg.data}"
        + (f" ({n_targets:,} target tokens)" if n_targets is not None else "")
        + f"; packing {packing_note}; global batch {global_batch} = micro {mb} x accumulation {G} x {W} "
          f"process(es) [{engine}]; {len(stages)} stage(s), {total_steps} step(s)", main)
    log(recipe_line(stages, stage_steps, plans, global_batch, len(job.items)), main)

    # Where to start.
    si0, step0, gstep = 0, 0, 0
    if resume_ckpt is not None:
        state = ck.read_trainer_state(resume_ckpt)
        si0, step0, gstep = state["stage"], state["stage_step"], state["global_step"]
        if len(state.get("plan") or []) == len(stage_steps):  # a plan --fit-to-time shortened stays so
            stage_steps = [int(n) for n in state["plan"]]
            total_steps = sum(stage_steps)
        if step0 >= stage_steps[si0]:
            si0, step0 = si0 + 1, 0
        log(f"resuming from {resume_ckpt} (step {gstep})", main)
    init_run_dir(acc, cfg)
    if main:
        (run_dir / "run_config.yaml").write_text(yaml.safe_dump(cfg_d, sort_keys=False))
    reporter = Reporter(run_dir, main, total_steps, gstep, start_trackers(acc, cfg_d))
    h = config_hash(cfg_d)
    last_ckpt = resume_ckpt
    stopped = timed_out = False
    last_record: dict = {}
    evals: list[dict] = []
    bad_steps = 0  # consecutive steps with a non-finite loss or gradient
    # it may grow back up to the plan it starts from: the recipe's, or a resumed run's fitted one
    fit = (TimeFit(cfg.max_seconds, t_start, agree=lambda plan: agree_on(acc, plan), ceiling=stage_steps)
           if cfg.fit_to_time else None)

    # Held-out evaluation, once per state of the weights: a stage that ran no step, or one that begins on the
    # weights the last stage ended with (no relayout between), is not evaluated again.
    weights = {"relayouts": 0, "evaluated": None}

    def held_out(stage: str, model) -> None:
        if weights["evaluated"] != (gstep, weights["relayouts"]):
            weights["evaluated"] = (gstep, weights["relayouts"])
            reporter.begin_eval(gstep)
            evals.append({"step": gstep, "stage": stage, **evaluate(job, acc, model, cfg, reporter.eval_batch)})
            reporter.eval(evals[-1])

    uncap = cap_cpu_memory(acc.device)  # a micro-batch too large for the RAM: our error, not the OOM killer
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
            target = resolve_attention_layers(model.config.num_hidden_layers, st.ratio, st.attn_layers)
            if target is not None:
                weights["relayouts"] += 1
                model = relayout(model, target, cfg.seed + 1000 * (si + 1), st.name,
                                 teacher_info={"name_or_path": str(frozen_spec),
                                               "kind": "default" if frozen_spec == "default" else "dir"})
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
                held_out(st.name, model)
            start = step0 if si == si0 else 0
            stage_done = start
            if fit is not None:
                fit.stage_start(start)
            step = start - 1
            while step + 1 < steps:  # steps may shrink as it runs (--fit-to-time)
                step += 1
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
                new_plan = fit.after_step(step + 1, stage_steps, si) if fit else None
                if new_plan is not None:
                    stage_steps, steps = new_plan, new_plan[si]
                    total_steps = sum(stage_steps)
                    reporter.replan(total_steps)
                    reporter.note(f"--fit-to-time: {total_steps} step(s) in all now (stages "
                                  f"{', '.join(map(str, stage_steps))}) to end inside --max-seconds "
                                  f"{cfg.max_seconds:g}")
                if cfg.eval_every and job.eval_items and gstep % cfg.eval_every == 0 and step + 1 < steps:
                    held_out(st.name, model)
                if cfg.save_every and gstep % cfg.save_every == 0 and step + 1 < steps:
                    last_ckpt = save_checkpoint(acc, model, optimizer, engine, run_dir,
                                                trainer_state(gstep, si, st, step + 1, steps, h, global_batch, W,
                                                              engine, record, stage_steps), cfg_d, tok,
                                                cfg.keep_checkpoints)
            if job.eval_items and not stopped:
                held_out(st.name, model)
            last_ckpt = save_checkpoint(acc, model, optimizer, engine, run_dir,
                                        trainer_state(gstep, si, st, stage_done, steps, h, global_batch, W, engine,
                                                      last_record, stage_steps), cfg_d, tok, cfg.keep_checkpoints)
            acc.free_memory()
            del model, optimizer
            if stopped or timed_out:
                break
    finally:
        uncap()
        reporter.close()

    summary = {
        "command": kind, "output": str(run_dir), "steps": gstep, "total_steps": total_steps,
        "stopped_early": stopped or timed_out, "time_budget_reached": timed_out,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "last": last_record, "evals": evals, "engine": engine, "processes": W, "global_batch": global_batch,
        "mixed_precision": acc.mixed_precision,
        **({"planned_steps": sum(planned), "fitted_plan": stage_steps} if stage_steps != planned else {}),
        "packing": packing_note, "seconds": round(time.perf_counter() - t_start, 2),
    }
    if main:
        if not stopped and last_ckpt is not None:
            save_dtype = input_dtype_name(cfg.model) if cfg.save_dtype == "auto" else cfg.save_dtype
            with whole_models(acc):
                write_final_model(Path(last_ckpt), run_dir, save_dtype, tok,
                                  distill_length=recipe.final_length(cfg))
            summary["model"] = str(run_dir)
        ck.write_json(run_dir / "training_summary.json", summary)
    acc.wait_for_everyone()
    return summary


def load_models(acc, cfg, recipe, start_spec: str):
    """(student, job with its frozen model and padding id, tokenizer, frozen model's spec): the student from
    ``start_spec`` (the input model or the checkpoint resumed), the teacher or reference the recipe asks for."""
    with whole_models(acc):
        student, s_tok, _ = load_trainable(start_spec)
    job = Job(recipe.for_model(student))
    recipe = job.recipe
    t_tok = None
    spec, role = recipe.frozen_model(cfg, acc.is_main_process)
    if spec:
        with whole_models(acc):
            job.frozen, t_tok, name = load_frozen(spec, frozen_dtype(acc), acc.device, role)
        check_same_vocabulary(job.frozen, t_tok, student, s_tok, name if role == "teacher" else f"{role} {name}",
                              cfg.model)
    tok = t_tok if t_tok is not None else s_tok
    if tok is None:
        raise MamballamaError(f"no tokenizer: neither {cfg.model} nor the teacher/reference has tokenizer files")
    job.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return student, job, tok, spec


def stage_lengths(stages, plans: list[BatchPlan], lengths: list[int], global_batch: int) -> list[int]:
    """Optimizer steps of each stage: its own steps, else its tokens over the mean item length, else epochs."""
    mean_len = sum(lengths) / max(len(lengths), 1)
    return [st.steps if st.steps is not None
            else max(1, math.ceil(st.tokens / (global_batch * mean_len))) if st.tokens is not None
            else plans[i].steps_for(st.epochs) for i, st in enumerate(stages)]


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
            except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                if is_out_of_memory(exc):
                    raise out_of_memory(cfg) from exc
                raise
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
    keys = job.recipe.metric_keys
    tot = reduce_sums(acc, sums, keys + ("n_tokens",))
    dt = time.perf_counter() - t0
    record = {"stage": st.name, "stage_step": step + 1, "epoch": round(plan.epoch_at(step + 1), 4)}
    record.update({k: tot[k] / norm for k in keys if k in sums})
    record.update(lr=lr, grad_norm=grad_norm, tokens=int(tot["n_tokens"]), count=norm, step_s=round(dt, 4),
                  tokens_per_s=round(tot["n_tokens"] / dt, 1) if dt > 0 else 0.0)
    return record


def trainer_state(gstep, si, st, stage_step, stage_steps, h, global_batch, world, engine, record, plan) -> dict:
    return {"global_step": gstep, "stage": si, "stage_name": st.name, "stage_step": stage_step,
            "stage_steps": stage_steps, "plan": list(plan), "config_hash": h, "global_batch": global_batch,
            "world_size": world, "engine": engine, "last": record}


def agree_on(acc, plan: list[int]) -> list[int]:
    """Every process takes the main process's plan (their clocks differ)."""
    if acc.num_processes == 1:
        return plan
    from accelerate.utils import broadcast

    return [int(x) for x in broadcast(torch.tensor(plan, device=acc.device), from_process=0).tolist()]


def out_of_time(acc, cfg, t_start: float) -> bool:
    """--max-seconds reached (every process agrees: the main process's clock decides)."""
    if cfg.max_seconds is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - t_start >= cfg.max_seconds)], device=acc.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum")
    return bool(flag.item() > 0)


def out_of_memory(cfg) -> MamballamaError:
    mb, G = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    same = (f" (--micro-batch-size {mb // 2} --gradient-accumulation-steps {G * 2} keeps the global batch)"
            if mb > 1 and mb % 2 == 0 else " (raise --gradient-accumulation-steps to keep the global batch)")
    return MamballamaError(
        f"out of memory at --micro-batch-size {mb} with --seq-len {cfg.seq_len}: lower --micro-batch-size{same}, "
        "add --gradient-checkpointing, or shard the model with DeepSpeed ZeRO-3 (--accelerate-config "
        "templates/accelerate/zero3.yaml)"
    )


def non_finite(record: dict, scaled: bool) -> str | None:
    """What is not finite in a step's record (the loss, a loss term or the gradient norm), or None.

    Under fp16's loss scaler an infinite gradient norm is the scaler's own overflow signal, not divergence."""
    for key in ("loss", *(k for k in record if k in ("kl", "rkl", "ce", "hidden", "feature", "margin"))):
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
