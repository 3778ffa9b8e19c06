"""distill / sft / dpo / label on tiny models through the real CLI, and the losses they use."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from clihelp import run_cli
from helpers import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DATA = Path(__file__).parent / "data"
TRAIN, EVAL, PAIRS, PROMPTS = (str(DATA / n) for n in ("chat_train.jsonl", "chat_eval.jsonl", "pairs.jsonl",
                                                         "prompts.jsonl"))


def metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r and "eval_kl" not in r]


def flags_only(cmd, args) -> list:
    """distill runs the default recipe (templates/distill-default.yaml) unless told otherwise; these tests set
    every knob with flags."""
    return ["--template", "none"] if cmd == "distill" and "--template" not in [str(a) for a in args] else []


def train(capsys, cmd, model, out, *args):
    r = run_cli([cmd, model, "--output", out, "--json", *flags_only(cmd, args), *args], capsys)
    assert r.code == 0, r.err
    return json.loads(r.out)


# --- losses -----------------------------------------------------------------------------------------------------
def test_kd_loss_terms_match_their_definitions():
    from mamballama_cli.training.losses import kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    T = 2.0
    total, m = kd_loss(s, t, y, mask, w_kl=0.5, w_rkl=0.25, w_ce=2.0, temperature=T)
    ps, pt = F.softmax(s[mask] / T, -1), F.softmax(t[mask] / T, -1)
    fkl = (pt * (pt.log() - ps.log())).sum() * T * T
    rkl = (ps * (ps.log() - pt.log())).sum() * T * T
    ce = F.cross_entropy(s[mask], y[mask], reduction="sum")
    torch.testing.assert_close(m["kl"], fkl)
    torch.testing.assert_close(m["rkl"], rkl)
    torch.testing.assert_close(m["ce"], ce)
    torch.testing.assert_close(total, 0.5 * fkl + 0.25 * rkl + 2.0 * ce)


def test_kd_loss_ignores_the_teacher_on_prompt_and_padding_positions():
    """Masking verified: rewriting the teacher's logits where the target is not a response token changes nothing."""
    from mamballama_cli.training.data import Example, as_items, collate
    from mamballama_cli.training.losses import kd_loss

    tok = tiny_tokenizer()
    from mamballama_cli.training.data import encode_chat

    ex = encode_chat(tok, [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A cat."}])
    short = Example(ex.ids[:20], [False] * 20)
    short.mask[15:18] = [True] * 3
    batch = collate(as_items([ex, short]), pad_id=0)
    mask = batch["target_mask"]
    assert mask.any() and (~mask).any()
    g = torch.Generator().manual_seed(1)
    L, V = mask.shape[1], 96
    student = torch.randn(2, L, V, generator=g, requires_grad=True)
    teacher = torch.randn(2, L, V, generator=g)
    base, _ = kd_loss(student, teacher, batch["targets"], mask, w_kl=1.0, w_rkl=0.5, w_ce=0.3)
    scrambled = teacher.clone()
    scrambled[~mask] = torch.randn(int((~mask).sum()), V, generator=g) * 50  # prompt, padding, last position
    again, _ = kd_loss(student, scrambled, batch["targets"], mask, w_kl=1.0, w_rkl=0.5, w_ce=0.3)
    assert torch.equal(base, again)
    base.backward()
    assert student.grad[~mask].abs().max() == 0  # no gradient flows from outside the responses
    changed = teacher.clone()
    changed[mask.nonzero()[0][0], mask.nonzero()[0][1]] += 5.0
    different, _ = kd_loss(student, changed, batch["targets"], mask, w_kl=1.0)
    assert not torch.allclose(different, base)


def test_dpo_loss_and_sequence_logps():
    from mamballama_cli.training.losses import dpo_loss, sequence_logps

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 7, generator=g)
    y = torch.randint(0, 7, (3, 6), generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.4
    lp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(sequence_logps(logits, y, mask), (lp * mask).sum(-1))
    pc, pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), \
        torch.tensor([-2.0, -2.0])
    total, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margin = (pc - rc) - (pr - rr)
    torch.testing.assert_close(total, -F.logsigmoid(0.5 * margin).sum())
    assert m["accuracy"] == 1.0 and torch.isclose(m["margin"], margin.sum())


def test_state_round_trips_without_pickle(tmp_path):
    from mamballama_cli.training.checkpoint import load_state, rng_state, save_state, set_rng_state

    obj = {"state": {"a.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.98), "params": ["a.weight"], "foreach": None}],
           7: [torch.float32, "x"]}
    save_state(tmp_path / "s", obj)
    back = load_state(tmp_path / "s")
    assert back["param_groups"] == obj["param_groups"] and back[7] == obj[7]
    assert torch.equal(back["state"]["a.weight"]["exp_avg"], obj["state"]["a.weight"]["exp_avg"])
    save_state(tmp_path / "rng", rng_state())
    expected = torch.rand(3)
    set_rng_state(load_state(tmp_path / "rng"))
    assert torch.equal(torch.rand(3), expected)


# --- distill ----------------------------------------------------------------------------------------------------
COMMON = ["--seq-len", "128", "--micro-batch-size", "4", "--warmup", "0", "--log-every", "100"]


def test_distill_halves_held_out_kl_and_writes_a_loadable_run(models, tmp_path, capsys):
    out = tmp_path / "run"
    s = train(capsys, "distill", models["hybrid"], out, "--data", TRAIN, "--eval-data", EVAL,
              "--template", "distill-e2e", "--steps", "12", "--lr", "3e-3", *COMMON)
    first, last = s["evals"][0]["eval_kl"], s["evals"][-1]["eval_kl"]
    assert last <= 0.5 * first, (first, last)
    # The run directory: final model, metrics, resolved config; checkpoints without any pickle.
    assert {"config.json", "model.safetensors", "metrics.jsonl", "run_config.yaml", "training_summary.json",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    recs = metrics(out)
    assert [r["step"] for r in recs if "eval_kl" not in r] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 and r["count"] > 0 for r in recs if "eval_kl" not in r)
    import yaml

    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert cfg["command"] == "distill" and cfg["lr"] == 3e-3 and cfg["w_kl"] == 1.0 and cfg["betas"] == [0.9, 0.98]
    (ckpt,) = [p for p in (out / "checkpoints").iterdir()]
    suffixes = {p.suffix for p in ckpt.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".yaml", ".jinja"}, suffixes
    assert (ckpt / "optimizer.safetensors").is_file() and (ckpt / "rng" / "rank0.safetensors").is_file()
    import mamballama_cli  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MamballamaForCausalLM" and model.config.attn_layers == [1, 3]
    assert model.config.distill_max_length == 128  # eval places retrieval lengths at multiples of it
    r = run_cli(["generate", out, "--chat", "--prompt", "hi", "-n", "4"], capsys)
    assert r.code == 0, r.err


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(models, tmp_path, capsys):
    args = ["--data", TRAIN, "--steps", "6", "--lr", "2e-3", "--w-ce", "0.5", "--seed", "1",
            "--gradient-accumulation-steps", "2", "--seq-len", "128", "--micro-batch-size", "2", "--warmup", "0.2"]
    train(capsys, "distill", models["hybrid"], tmp_path / "a", *args)
    s = train(capsys, "distill", models["hybrid"], tmp_path / "b", *args, "--max-steps", "3")
    assert s["stopped_early"] and s["steps"] == 3 and not (tmp_path / "b" / "model.safetensors").exists()
    s = train(capsys, "distill", models["hybrid"], tmp_path / "b", *args, "--resume")
    assert s["steps"] == 6 and not s["stopped_early"]
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    # The same global batch split as 4 x 1 instead of 2 x 2 gives the same curve: the loss is normalised over
    # the tokens of the whole accumulated batch, not per micro-batch.
    args_c = list(args)
    args_c[args_c.index("--gradient-accumulation-steps") + 1] = "1"
    args_c[args_c.index("--micro-batch-size") + 1] = "4"
    train(capsys, "distill", models["hybrid"], tmp_path / "c", *args_c)
    c = losses(tmp_path / "c")
    assert max(abs(x - y) for x, y in zip(a, c)) < 1e-5, (a, c)
    # Resuming with a different config is refused, naming what changed.
    r = run_cli(["distill", models["hybrid"], "--output", tmp_path / "b", "--template", "none", *args, "--resume", "--lr", "1e-3"], capsys)
    assert r.code != 0 and "different config" in r.err and "lr" in r.err


def test_progressive_stages_replace_attention_and_freeze_all_but_mixers(models, tmp_path, capsys):
    """distill-paper from the teacher itself: 50% -> 75% Mamba (mixers only), then end-to-end (all)."""
    from safetensors.torch import load_file

    from mamballama_cli.convert.converter import convert_model

    out = tmp_path / "run"
    args = ["--template", "distill-paper", "--data", TRAIN, "--steps", "1", "--lr", "1e-2", "--warmup", "0",
            "--seq-len", "96", "--micro-batch-size", "2", "--gradient-accumulation-steps", "1",
            "--keep-checkpoints", "10"]
    s = train(capsys, "distill", models["teacher"], out, *args, "--max-steps", "2")
    assert s["stopped_early"] and s["steps"] == 2
    # Resuming at a stage boundary: same teacher (the input model), next stage from the checkpoint.
    s = train(capsys, "distill", models["teacher"], out, *args, "--resume")
    assert s["steps"] == 4 and not s["stopped_early"]
    teacher = load_file(str(models["teacher"] / "model.safetensors"))
    ckpts = sorted((out / "checkpoints").iterdir())
    layouts = [json.loads((c / "config.json").read_text())["attn_layers"] for c in ckpts]
    assert layouts == [[1, 3], [3], [3], [3]]  # 4 layers: ratio 0.125 keeps the same layer as 0.25
    after = [load_file(str(c / "model.safetensors")) for c in ckpts]
    frozen = [k for k in teacher if "mlp" in k or "norm" in k or "embed" in k or "lm_head" in k or "layers.3." in k]
    for k in frozen:  # stages 1-3: everything but the Mamba mixers is the teacher's, untouched
        for sd in after[:3]:
            assert torch.equal(sd[k], teacher[k]), k
    fresh, _ = convert_model(AutoModelForCausalLM.from_pretrained(models["teacher"]), [1, 3], dtype=torch.float32,
                             seed=0 + 1000)
    init = fresh.state_dict()
    # One Adam step of lr 1e-2 moves each mixer weight by about 1e-2 from its conversion-time value.
    moved = (after[0]["model.layers.0.mamba.in_proj.weight"] - init["model.layers.0.mamba.in_proj.weight"]).abs()
    assert 1e-3 < moved.max() < 5e-2
    # Stage 2 turned layer 1 into Mamba; the end-to-end stage trains everything.
    assert "model.layers.1.mamba.in_proj.weight" in after[1]
    assert "model.layers.1.self_attn.q_proj.weight" not in after[1]
    assert not torch.equal(after[3]["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])
    # The converted student records its teacher, so a later `distill RUN` finds it without --teacher.
    assert json.loads((out / "config.json").read_text())["teacher"]["name_or_path"] == str(models["teacher"])
    stages = {r["stage"] for r in metrics(out)}
    assert stages == {"mamba-50", "mamba-75", "mamba-87.5", "end-to-end"}


def test_layerwise_alignment_brings_every_mamba_layer_towards_its_teacher_layer(models, tmp_path, capsys):
    """--w-hidden alone: only the mixers train, no logits; the relative per-layer error falls; then KD follows."""

    from mamballama_cli.training import align

    out = tmp_path / "run"
    args = ["--data", TRAIN, "--eval-data", EVAL, "--steps", "10", "--lr", "3e-3", "--w-hidden", "1", "--w-kl", "0",
            "--trainable", "mixers", *COMMON]
    train(capsys, "distill", models["hybrid"], out, *args)
    recs = [r for r in metrics(out) if "hidden" in r]
    assert len(recs) == 10 and all("kl" not in r for r in recs)  # alignment only: the logits were never computed
    first, last = recs[0]["hidden"], recs[-1]["hidden"]
    assert last < 0.7 * first, (first, last)
    # The same quantity, recomputed outside the trainer on the held-out data, also fell for every layer.
    import mamballama_cli  # noqa: F401

    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
    before = AutoModelForCausalLM.from_pretrained(models["hybrid"]).eval()
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, teacher.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 40, dtype=torch.bool)

    def per_layer(student):
        errs = []
        for i in align.mamba_layer_indices(student):
            handles, store = align.capture_layers(teacher, [i])
            with torch.no_grad():
                teacher(ids)
                for h in handles:
                    h.remove()
                errs.append(float(align.alignment_loss(student, store, valid)[0]) / 80)
        return errs

    b, a = per_layer(before), per_layer(after)
    assert all(x < y for x, y in zip(a, b)), (b, a)
    sd_before, sd_after = before.state_dict(), after.state_dict()
    for k in sd_before:  # everything but the mixers is untouched
        assert torch.equal(sd_before[k], sd_after[k]) == (".mamba." not in k), k
    # A stage with every weight at 0 is refused; so is a negative weight.
    r = run_cli(["distill", models["hybrid"], "--output", tmp_path / "z", "--template", "none", "--data", TRAIN, "--w-kl", "0"], capsys)
    assert r.code == 2 and "every loss weight is 0" in r.err and "--w-hidden" in r.err
    r = run_cli(["distill", models["hybrid"], "--output", tmp_path / "z", "--template", "none", "--data", TRAIN, "--w-hidden", "-1"], capsys)
    assert r.code == 2 and "--w-hidden -1.0 must not be negative" in r.err


def test_distill_align_template_aligns_then_distils(models, tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, "distill", models["hybrid"], out, "--template", "distill-align", "--data", TRAIN, "--steps", "3",
          "--lr", "3e-3", *COMMON)
    recs = [r for r in metrics(out) if "stage" in r and "eval_kl" not in r]
    assert [r["stage"] for r in recs] == ["align"] * 3 + ["end-to-end"] * 3
    assert all("hidden" in r and "kl" not in r for r in recs[:3])
    assert all("kl" in r and "hidden" not in r for r in recs[3:])


# --- sft, dpo, label ------------------------------------------------------------------------------------------------
def test_sft_lowers_cross_entropy_with_packing_on_a_transformer(models, tmp_path, capsys):
    s = train(capsys, "sft", models["teacher"], tmp_path / "sft", "--data", TRAIN, "--eval-data", EVAL, "--steps", "8",
              "--lr", "3e-3", "--seq-len", "256", "--micro-batch-size", "2", "--warmup", "0",
              "--gradient-checkpointing")
    assert s["packing"].startswith("on")
    first, last = s["evals"][0]["eval_ce"], s["evals"][-1]["eval_ce"]
    assert last < 0.9 * first, (first, last)


def test_dpo_widens_the_margin_on_its_pairs(models, tmp_path, capsys):
    s = train(capsys, "dpo", models["hybrid"], tmp_path / "dpo", "--data", PAIRS, "--eval-data", PAIRS, "--steps", "5",
              "--lr", "2e-3", "--beta", "0.1", "--warmup", "0", "--micro-batch-size", "4")
    first, last = s["evals"][0], s["evals"][-1]
    assert abs(first["eval_margin"]) < 1e-4  # the policy starts as its own reference
    assert last["eval_margin"] > 1.0 and last["eval_accuracy"] > 0.8
    assert [r for r in metrics(tmp_path / "dpo") if "loss" in r][-1]["loss"] < 0.69


def test_label_writes_resumable_pseudo_labels(models, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    args = ["label", models["teacher"], "--prompts", PROMPTS, "--output", out, "-n", "6", "--batch-size", "4"]
    r = run_cli(args, capsys)
    assert r.code == 0, r.err
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    recs = [json.loads(x) for x in lines]
    assert all(r["messages"][-1]["role"] == "assistant" for r in recs)
    # A crash after two answers, mid-way through the third line.
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    r = run_cli(args, capsys)
    assert r.code != 0 and "--resume" in r.err
    r = run_cli(args + ["--resume"], capsys)
    assert r.code == 0, r.err
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert out.read_text().splitlines()[:2] == lines[:2]
    assert sorted(x["id"] for x in again) == list(range(6))
    assert {x["id"]: x["messages"] for x in again} == {x["id"]: x["messages"] for x in recs}  # greedy: same answers
    r = run_cli(args + ["--resume", "--system", "Be terse."], capsys)
    assert r.code != 0 and "different prompt" in r.err
    # The labels are training data as they are.
    s = train(capsys, "distill", models["hybrid"], tmp_path / "run", "--data", out, "--steps", "1", *COMMON)
    assert s["steps"] == 1


def test_label_reads_stdin_and_writes_stdout_for_pipelines(models, tmp_path, capsys, monkeypatch):
    """`... | mamballama label T --prompts - --output - | ...`: JSONL records or one prompt per line on stdin, one
    record per prompt on stdout (nothing else there), the answers a file run gives."""
    file_out = tmp_path / "labels.jsonl"
    base = ["label", models["teacher"], "-n", "5", "--batch-size", "2"]
    assert run_cli([*base, "--prompts", PROMPTS, "--output", file_out], capsys).code == 0
    expected = [json.loads(x)["messages"] for x in file_out.read_text().splitlines()]

    r = run_cli([*base, "--prompts", "-", "--output", "-"], capsys, stdin=Path(PROMPTS).read_text(),
                monkeypatch=monkeypatch)
    assert r.code == 0, r.err
    assert [json.loads(x)["messages"] for x in r.out.splitlines()] == expected
    # plain lines: each a user turn
    users = [m[-2]["content"] for m in expected if len(m) == 2]
    r = run_cli([*base, "--prompts", "-", "--output", "-"], capsys, stdin="\n".join(users) + "\n\n",
                monkeypatch=monkeypatch)
    assert r.code == 0, r.err
    assert [json.loads(x)["messages"] for x in r.out.splitlines()] == [m for m in expected if len(m) == 2]
    # what a pipeline cannot do is said in one line
    for args, stdin, words in (([], "", "stdin holds no prompt"), (["--resume"], "hi\n", "nothing to resume"),
                               (["--json"], "hi\n", "drop one"), ([], '{"prompt": 3}\n', "stdin line 1")):
        r = run_cli([*base, "--prompts", "-", "--output", "-", *args], capsys, stdin=stdin, monkeypatch=monkeypatch)
        assert r.code != 0 and all(w in r.err for w in words.split(" | ")), r.err
        assert len(r.err.strip().splitlines()) == 1 and r.out == ""


def test_a_crash_leaves_the_last_good_checkpoint_resumable(models, tmp_path, capsys, monkeypatch):
    """Ctrl-C while a checkpoint is written, then an exception mid-step: each time --resume picks the last
    complete checkpoint and the loss curve ends up the uninterrupted one."""
    from mamballama_cli.training import checkpoint as ck
    from mamballama_cli.training import trainer

    args = ["--data", TRAIN, "--steps", "5", "--lr", "2e-3", "--seq-len", "96", "--micro-batch-size", "2",
            "--warmup", "0", "--save-every", "2", "--keep-checkpoints", "5"]
    train(capsys, "distill", models["hybrid"], tmp_path / "a", *args)
    out = tmp_path / "b"
    real_commit, real_forward = ck.commit, trainer.forward_logits

    def torn_commit(run_dir, step, keep):
        if step == 4:
            raise KeyboardInterrupt  # the checkpoint of step 4 dies before its rename
        return real_commit(run_dir, step, keep)

    monkeypatch.setattr(ck, "commit", torn_commit)
    r = run_cli(["distill", models["hybrid"], "--output", out, "--template", "none", *args], capsys)
    assert r.code != 0
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-00000002"]
    assert list((out / "checkpoints").glob(".step-00000004.partial"))  # left behind, never picked
    monkeypatch.setattr(ck, "commit", real_commit)
    calls = []

    def crashing_forward(model, inputs):  # teacher + student per step: call 5 is the teacher of step 5
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_forward(model, inputs)

    monkeypatch.setattr(trainer, "forward_logits", crashing_forward)
    r = run_cli(["distill", models["hybrid"], "--output", out, "--template", "none", *args, "--resume"], capsys)
    assert r.code != 0 and "simulated crash" in r.err
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    monkeypatch.setattr(trainer, "forward_logits", real_forward)
    s = train(capsys, "distill", models["hybrid"], out, *args, "--resume")
    assert s["steps"] == 5 and not list((out / "checkpoints").glob(".*partial"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    a, b = losses(tmp_path / "a"), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


def test_distill_says_what_the_recipe_sets_and_shows_micro_batches_inside_a_long_step(models, tmp_path, capsys,
                                                                                        monkeypatch):
    """A 2-record file with accumulation 8 is epoch 16 after 2 steps: the first lines say so; a step that runs
    long shows its micro-batches (here every step counts as long)."""
    from mamballama_cli.training.report import Reporter

    monkeypatch.setattr(Reporter, "MICRO_AFTER_S", 0.0)
    monkeypatch.setattr(Reporter, "MICRO_EVERY_S", 0.0)
    data = tmp_path / "two.jsonl"
    data.write_text("".join(line + "\n" for line in Path(TRAIN).read_text().splitlines()[:2]))
    r = run_cli(["distill", models["hybrid"], "--output", tmp_path / "run", "--template", "none", "--data", data,
                 "--steps", "2", "--micro-batch-size", "1", "--gradient-accumulation-steps", "8", "--lr", "1e-4",
                 "--seq-len", "128"], capsys)
    assert r.code == 0, r.err
    recipe = [x for x in r.err.splitlines() if x.startswith("recipe:")]
    assert recipe == ["recipe: global batch 8 over 2 row(s); stages: train 2 step(s) = epoch 8, lr 0.0001, "
                      "trainable all"], r.err
    assert "step 1/2: micro-batch 7/8" in r.err and "step 2/2: micro-batch 1/8" in r.err, r.err
    assert "micro-batch 8/8" not in r.err  # the step's own line follows at once


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``folder``: {tag: {step: value}}. The files are TFRecords
    (length, its CRC, an Event protobuf, its CRC), read here with tensorboardX's protobuf classes."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_report_to_tensorboard_logs_every_step_and_evaluation_as_metrics_jsonl_has_them(models, tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "sft"
    s = train(capsys, "sft", models["teacher"], out, "--data", TRAIN, "--eval-data", EVAL, "--steps", "4",
              "--eval-every", "2", "--lr", "1e-3", "--seq-len", "128", "--micro-batch-size", "2",
              "--report-to", "tensorboard")
    scalars = _tensorboard_scalars(out / "trackers")
    recs = metrics(out)
    steps = [r for r in recs if "eval_ce" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)
    assert scalars["lr"] == pytest.approx({r["step"]: r["lr"] for r in steps}, rel=1e-6)
    evals = {r["step"]: r["eval_ce"] for r in recs if "eval_ce" in r}
    assert len(evals) == len(s["evals"]) >= 2 and scalars["eval_ce"] == pytest.approx(evals, rel=1e-6)
    assert "stage" not in scalars  # a name is not a number: it stays in metrics.jsonl
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"  # and the run's curves, drawn at its end
