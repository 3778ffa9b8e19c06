"""Every bad input of distill / sft / dpo / label through the CLI: one line naming the problem, non-zero exit,
nothing lost."""

import json
from pathlib import Path

import pytest
import torch

from clihelp import one_line_error, run_cli
from helpers import save_teacher, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DATA = Path(__file__).parent / "data"
TRAIN = str(DATA / "chat_train.jsonl")
FAST = ["--template", "none", "--steps", "1", "--seq-len", "96", "--micro-batch-size", "2"]


def test_missing_data_file(models, tmp_path, capsys):
    r = run_cli(["distill", models["hybrid"], "--data", tmp_path / "nope.jsonl", "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "nope.jsonl", "does not exist", "mamballama data build")
    assert not (tmp_path / "o").exists()


def test_malformed_line_names_file_and_line_or_is_skipped(models, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = Path(TRAIN).read_text().splitlines()[:6]
    lines[3] = lines[3][:40]  # cut in the middle of a JSON object
    bad.write_text("\n".join(lines) + "\n")
    r = run_cli(["sft", models["hybrid"], "--data", bad, "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "bad.jsonl line 4", "not valid JSON", "--skip-bad-lines")
    assert not (tmp_path / "o").exists()
    r = run_cli(["sft", models["hybrid"], "--data", bad, "-o", tmp_path / "o", *FAST, "--skip-bad-lines"], capsys)
    assert r.code == 0, r.err
    assert "skipped 1 malformed line" in r.err and "line 4" in r.err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "no messages here"}) + "\n")
    r = run_cli(["distill", models["hybrid"], "--data", wrong, "-o", tmp_path / "o2", *FAST], capsys)
    one_line_error(r, "wrong.jsonl line 1", "expected 'messages', 'text'")


def test_report_to_names_an_unknown_tracker_or_a_missing_package(models, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    r = run_cli(["sft", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "o", *FAST, "--report-to",
                 "tensorbord"], capsys)
    one_line_error(r, "--report-to 'tensorbord'", "tensorboard, wandb")
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "o", *FAST, "--report-to",
                 "none,wandb"], capsys)
    one_line_error(r, "--report-to wandb", "pip install wandb")
    assert not (tmp_path / "o").exists()


def test_preference_file_without_rejected(models, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    r = run_cli(["dpo", models["hybrid"], "--data", f, "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "p.jsonl line 1", "'rejected'")


def test_teacher_with_another_vocabulary_size_is_refused(models, tmp_path, capsys):
    other = save_teacher(tmp_path / "t80", model=tiny_llama(vocab=80))
    r = run_cli(["distill", models["hybrid"], "--teacher", other, "--data", TRAIN, "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "vocabulary of 80 tokens", "96", "same vocabulary")
    assert not (tmp_path / "o").exists()


def test_teacher_with_another_tokenizer_is_refused(models, tmp_path, capsys):
    """Same vocabulary size, different token ids: the KL would compare unrelated tokens."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = save_teacher(tmp_path / "t", model=tiny_llama(), tokenizer=False)
    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    chars = [chr(c) for c in reversed(range(32, 127))][: 96 - len(specials)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(tmodels.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>").save_pretrained(d)
    r = run_cli(["distill", models["hybrid"], "--teacher", d, "--data", TRAIN, "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "tokenise differently", "same id")


def test_resume_refuses_a_different_config_and_needs_a_checkpoint(models, tmp_path, capsys):
    out = tmp_path / "run"
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", out, "--template", "none", "--steps", "2", "--max-steps", "1",
                 "--seq-len", "96", "--micro-batch-size", "2"], capsys)
    assert r.code == 0, r.err
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", out, "--template", "none", "--steps", "2", "--seq-len", "96",
                 "--micro-batch-size", "2", "--w-ce", "1", "--resume"], capsys)
    one_line_error(r, "different config", "w_ce: 0.0 -> 1.0")
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", out, "--template", "none", "--steps", "2", "--seq-len", "96",
                 "--micro-batch-size", "1", "--resume"], capsys)
    one_line_error(r, "global batch of 2", "gives 1")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "empty", *FAST, "--resume"], capsys)
    one_line_error(r, "--resume", "no complete checkpoint")


def test_out_of_memory_names_the_remedies(models, tmp_path, capsys, monkeypatch):
    from mamballama_cli.training import trainer

    def oom(model, inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "forward_logits", oom)
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "out of memory", "--micro-batch-size 2", "--gradient-checkpointing", "ZeRO-3")


def test_output_guard_and_option_checks(models, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", out, *FAST], capsys)
    one_line_error(r, "not empty", "--force")
    assert (out / "keep.txt").read_text() == "precious"
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "p", *FAST, "--packing", "on"], capsys)
    one_line_error(r, "--packing on", "Mamba")
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "p", "--template", "distill-papr"],
                capsys)
    one_line_error(r, "did you mean 'distill-paper'")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stages:\n  - {attn_ratio: 0.25}\n  - {attn_ratio: 0.5}\n")
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "s", *FAST, "--config", cfg], capsys)
    one_line_error(r, "already Mamba layers")
    cfg.write_text("stages:\n  - {attn_raito: 0.25}\n")
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "s", "--config", cfg], capsys)
    one_line_error(r, "'attn_raito'", "did you mean 'attn_ratio'")
    r = run_cli(["sft", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "s", "--w-kl", "1"], capsys)
    one_line_error(r, "--w-kl", "--teacher")
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "-o", tmp_path / "s", "--accelerate-config", "nope"],
                capsys)
    one_line_error(r, "--accelerate-config nope", "ddp", "zero3")


def test_flags_replace_template_stage_values(tmp_path):
    """--lr on the command line wins over the template's per-stage learning rates (precedence holds for stages)."""
    from mamballama_cli.training.config import DistillConfig, merge_train_config

    base = dict(model="m", data="d", output="o")
    cfg = merge_train_config(DistillConfig, template="distill-paper", config_file=None, overrides=base)
    assert [s.lr for s in cfg.resolved_stages()] == [8e-5, 8e-5, 8e-5, 2e-5]
    assert [s.steps for s in cfg.resolved_stages()] == [None] * 4  # one epoch each
    cfg = merge_train_config(DistillConfig, template="distill-paper", config_file=None,
                             overrides={**base, "lr": 1e-3, "steps": 7})
    assert [(s.lr, s.steps) for s in cfg.resolved_stages()] == [(1e-3, 7)] * 4
    assert [s.w_kl for s in cfg.resolved_stages()] == [0.1, 0.1, 0.1, 1.0]  # untouched keys stay per stage
    f = tmp_path / "c.yaml"
    f.write_text("max_grad_norm: 0.5\n")
    cfg = merge_train_config(DistillConfig, template="distill-paper", config_file=f, overrides=base)
    assert {s.max_grad_norm for s in cfg.resolved_stages()} == {0.5}


def test_a_stage_ratio_has_one_name_and_the_old_one_still_reads(tmp_path):
    """A stage's `ratio` (as `convert --ratio`) resolves through convert/placement.py; `attn_ratio`, its old name,
    is read as the same key, and a run saved with it still resumes (same config hash)."""
    from mamballama_cli.convert.placement import resolve_attention_layers
    from mamballama_cli.errors import UsageError
    from mamballama_cli.training.config import DistillConfig, config_dict, config_hash, merge_train_config

    base = dict(model="m", data="d", output="o")
    f = tmp_path / "c.yaml"
    f.write_text("stages:\n  - {attn_ratio: 0.5}\n  - {ratio: 0.25}\n")
    cfg = merge_train_config(DistillConfig, template=None, config_file=f, overrides=base)
    assert [s.ratio for s in cfg.resolved_stages()] == [0.5, 0.25]
    assert [resolve_attention_layers(8, s.ratio, s.attn_layers) for s in cfg.resolved_stages()] == [[1, 3, 5, 7],
                                                                                                    [3, 7]]
    assert resolve_attention_layers(8, 0.5, "2,4") == [2, 4] and resolve_attention_layers(8) is None
    saved = config_dict(cfg)
    old = {**saved, "stages": [{("attn_ratio" if k == "ratio" else k): v for k, v in st.items()}
                               for st in saved["stages"]]}
    assert config_hash(old) == config_hash(saved)
    f.write_text("stages:\n  - {attn_ratio: 0.5, ratio: 0.25}\n")
    with pytest.raises(UsageError, match="'attn_ratio' and 'ratio' are one key"):
        merge_train_config(DistillConfig, template=None, config_file=f, overrides=base)


def test_label_bad_inputs(models, tmp_path, capsys):
    r = run_cli(["label", models["teacher"], "--prompts", tmp_path / "none.jsonl", "-o", tmp_path / "l.jsonl"], capsys)
    one_line_error(r, "none.jsonl", "does not exist")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": \n')
    r = run_cli(["label", models["teacher"], "--prompts", p, "-o", tmp_path / "l.jsonl"], capsys)
    one_line_error(r, "p.jsonl line 2", "not valid JSON")
    assert not (tmp_path / "l.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host the two processes form a real DDP group")
def test_processes_that_accelerate_runs_alone_are_refused(models, tmp_path):
    """Two launched processes that accelerate would run as two lone trainings (a GPU config without GPUs) stop at
    once with one line that says how to launch CPU processes, before writing anything."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29561", "-m", "mamballama_cli", "distill", str(models["hybrid"]), "--data", TRAIN,
                        "--output", str(tmp_path / "run"), *FAST], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    errors = {ln for ln in r.stderr.splitlines() if ln.startswith("error:")}
    assert len(errors) == 1, r.stderr[-3000:]  # both ranks print the same line
    line = errors.pop()
    assert "2 processes were launched" in line and "accelerate launch --cpu" in line, line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_cpu_micro_batch_past_the_ram_is_our_error_not_the_oom_killer(models, tmp_path, capsys, monkeypatch):
    """On a CPU run the trainer caps its writable memory at what the system has available (RLIMIT_DATA), so an
    allocation past it fails in torch and gets the out-of-memory advice; the cap is lifted when the run ends.
    Here the system is made to report 256 MiB available and a micro-batch asks 1 GiB more (never touched: without
    the cap it would be granted, and the run would succeed)."""
    resource = pytest.importorskip("resource")
    from mamballama_cli.generation import fast
    from mamballama_cli.training import engine, trainer

    if engine._data_segment() is None:
        pytest.skip("no /proc: the cap is Linux-only")
    real_available = fast.available_bytes
    monkeypatch.setattr(fast, "available_bytes", lambda device: 256 << 20)
    real_forward = trainer.forward_logits

    def greedy(model, inputs):
        spare = torch.empty(1 << 30, dtype=torch.uint8)  # 1 GiB of address space, no page of it written
        del spare
        return real_forward(model, inputs)

    monkeypatch.setattr(trainer, "forward_logits", greedy)
    before = resource.getrlimit(resource.RLIMIT_DATA)
    args = ["distill", models["hybrid"], "--data", TRAIN, "--template", "none", "--steps", "1", "--seq-len", "96",
            "--micro-batch-size", "4", "--gradient-accumulation-steps", "1"]
    r = run_cli([*args, "-o", tmp_path / "o"], capsys)
    one_line_error(r, "out of memory at --micro-batch-size 4", "--micro-batch-size 2 --gradient-accumulation-steps 2")
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    monkeypatch.setattr(fast, "available_bytes", real_available)  # the RAM as it is: the same run goes through
    r = run_cli([*args, "-o", tmp_path / "p"], capsys)
    assert r.code == 0, r.err
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
