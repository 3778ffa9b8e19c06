"""Feature drafts (issue 18): `convert TARGET --feature-draft` and `distill --template distill-feature-draft`."""

import json
from pathlib import Path

import pytest
import torch

from clihelp import one_line_error, run_cli
from helpers import save_teacher, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DATA = Path(__file__).parent / "data"
TRAIN, EVAL = str(DATA / "chat_train.jsonl"), str(DATA / "chat_eval.jsonl")
LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
         "post_attention_layernorm.weight")


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """A tiny Llama (tied head) and a hybrid converted from another one with attention in layers 0 and 2 only (so
    its last attention layer is not its last layer), both saved with a tokenizer."""
    from mamballama_cli.convert.converter import convert_model

    root = tmp_path_factory.mktemp("targets")
    llama = save_teacher(root / "llama", model=tiny_llama(seed=1, tie=True))
    teacher = tiny_llama(seed=2)
    hybrid, _ = convert_model(teacher, [0, 2], dtype=torch.float32, seed=0)
    hybrid.save_pretrained(root / "hybrid")
    tiny_tokenizer().save_pretrained(root / "hybrid")
    return {"llama": llama, "hybrid": root / "hybrid", "root": root}


@pytest.fixture(scope="module")
def draft_dir(targets):
    """The tiny Llama's feature draft, through the real convert path."""
    from mamballama_cli.convert import ConvertConfig, run_convert

    out = targets["root"] / "fdraft"
    run_convert(ConvertConfig(teacher=str(targets["llama"]), output=str(out), feature_draft=True))
    return out


# --- (a) convert -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,source_layer", [("llama", 3), ("hybrid", 2)])
def test_convert_builds_a_one_layer_feature_draft_from_the_targets_weights(targets, tmp_path, capsys, which,
                                                                           source_layer):
    import mamballama_cli  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    from mamballama_cli.models.feature_draft import is_feature_draft
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    out = tmp_path / "fd"
    r = run_cli(["convert", targets[which], "--feature-draft", "--output", out, "--json"], capsys)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["kind"] == "feature-draft" and summary["source_layer"] == source_layer
    assert summary["num_layers"] == 1 and summary["fc_init"] == "identity-mean"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "convert_summary.json"} <= files

    draft = AutoModelForCausalLM.from_pretrained(out)
    target = AutoModelForCausalLM.from_pretrained(targets[which])
    assert type(draft) is MamballamaForCausalLM and is_feature_draft(draft)
    c = draft.config
    assert c.num_hidden_layers == 1 and c.attn_layers == [0] and not c.tie_word_embeddings
    assert c.teacher["name_or_path"] == str(targets[which]) and c.teacher["model_type"] == target.config.model_type
    assert c.draft_of["layer"] == source_layer and c.draft_of["kind"] == "feature"
    assert isinstance(draft.model.fc, torch.nn.Linear)
    tsd, dsd = target.state_dict(), draft.state_dict()
    assert torch.equal(dsd["model.embed_tokens.weight"], tsd["model.embed_tokens.weight"])
    assert torch.equal(dsd["lm_head.weight"], target.lm_head.weight)  # the llama ties it: a copy, untied here
    assert torch.equal(dsd["model.norm.weight"], tsd["model.norm.weight"])
    for name in LAYER:
        assert torch.equal(dsd[f"model.layers.0.{name}"], tsd[f"model.layers.{source_layer}.{name}"]), name
    h = c.hidden_size
    assert torch.equal(draft.model.fc.weight, torch.cat([torch.eye(h), torch.eye(h)], 1) / 2)


@pytest.mark.parametrize("args,needle", [(["--draft-layers", "0"], "--draft-layers"), (["--ratio", "0.5"], "--ratio"),
                                         (["--attn-layers", "1"], "--attn-layers"), (["--mixer", "mamba1"], "--mixer")])
def test_feature_draft_refuses_the_options_of_hybrids_and_cut_drafts(targets, tmp_path, capsys, args, needle):
    out = tmp_path / "o"
    r = run_cli(["convert", targets["llama"], "--feature-draft", *args, "--output", out], capsys)
    one_line_error(r, "--feature-draft", needle, code=2)
    assert not out.exists()


def test_feature_draft_of_a_hybrid_without_attention_is_refused(tmp_path, capsys):
    from mamballama_cli.convert.converter import convert_model

    hybrid, _ = convert_model(tiny_llama(seed=3), [], dtype=torch.float32, seed=0)
    hybrid.save_pretrained(tmp_path / "allmamba")
    r = run_cli(["convert", tmp_path / "allmamba", "--feature-draft", "--output", tmp_path / "o"], capsys)
    one_line_error(r, "no attention layer", code=2)
    assert not (tmp_path / "o").exists()


def test_generate_decodes_a_llama_target_with_its_converted_feature_draft_losslessly(draft_dir, targets, capsys,
                                                                                       tmp_path):
    """The converted (untrained) draft through `generate --speculative`: the feature rounds (the Llama target run as
    an all-attention hybrid) print the plain greedy text."""
    plain = run_cli(["generate", targets["llama"], "--prompt", "hello world", "-n", "16"], capsys)
    stats = tmp_path / "s.json"
    r = run_cli(["generate", targets["llama"], "--prompt", "hello world", "-n", "16", "--speculative", "--draft",
                 draft_dir, "-k", "3", "--stats-json", stats], capsys)
    assert r.code == 0, r.err
    assert r.out == plain.out
    assert json.loads(stats.read_text())["round_kind"] == "FeatureRounds"


# --- (b) the draft's forward -------------------------------------------------------------------------------------
def test_draft_forward_on_the_targets_features_is_causal_and_equals_the_hooked_forward():
    from mamballama_cli.convert.feature_draft import build_feature_draft
    from mamballama_cli.models.feature_draft import draft_forward, features_in, target_features

    target = tiny_llama(seed=4)
    draft, _ = build_feature_draft(target, {"name_or_path": "t", "kind": "dir"}, dtype=torch.float32)
    with torch.no_grad():  # a trained-looking fc, so that both halves matter
        draft.model.fc.weight.add_(0.05 * torch.randn(draft.model.fc.weight.shape,
                                                      generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1 - 3) % 93 + 3
    with torch.no_grad():
        _, f = target_features(target, ids)
        _, f2 = target_features(target, changed)
        logits, g = draft_forward(draft, ids[:, 1:], f[:, :-1])
        logits2, g2 = draft_forward(draft, changed[:, 1:], f2[:, :-1])
        with features_in(draft, f[:, :-1]):
            hooked = draft(input_ids=ids[:, 1:], output_hidden_states=True)
    assert torch.equal(f[:, :7], f2[:, :7]) and not torch.allclose(f[:, 7], f2[:, 7])  # the target is causal
    # draft position j reads token j + 1 and the target's feature j: token 7 first enters at position 6
    torch.testing.assert_close(logits[:, :6], logits2[:, :6], rtol=0, atol=1e-6)
    torch.testing.assert_close(g[:, :6], g2[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 6], logits2[:, 6])
    # the same features one position later (token 7 unchanged, feature 7 changed) reach position 7
    with torch.no_grad():
        f3 = f.clone()
        f3[:, 7] += 1.0
        logits3, _ = draft_forward(draft, ids[:, 1:], f3[:, :-1])
    torch.testing.assert_close(logits3[:, :7], logits[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(logits3[:, 7], logits[:, 7])
    # the training path (the draft's own forward with a hook on its embedding) computes the same
    torch.testing.assert_close(hooked.logits, logits)
    torch.testing.assert_close(hooked.hidden_states[-1], g)
    assert not draft.model.embed_tokens._forward_hooks  # the hook is gone afterwards


def test_chain_mask_is_what_each_drafting_step_sees():
    """Pass k at position j: pass 0's keys up to j - k (the verify call's window), then one key of each later pass,
    at j - k + m (the chain of its own steps); the first pass is plain causal."""
    from mamballama_cli.models.feature_draft import chain_mask

    assert torch.equal(chain_mask(4, 0, "cpu"), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    m = chain_mask(4, 2, "cpu").int()
    assert m.tolist() == [[0, 0, 0, 0,  0, 0, 0, 0,  1, 0, 0, 0],   # j = 0: its own key only (left out of the loss)
                          [0, 0, 0, 0,  1, 0, 0, 0,  0, 1, 0, 0],   # j = 1: no window key yet
                          [1, 0, 0, 0,  0, 1, 0, 0,  0, 0, 1, 0],   # j = 2: window up to 0, steps at 1 and 2
                          [1, 1, 0, 0,  0, 0, 1, 0,  0, 0, 0, 1]]   # j = 3: window up to 1, steps at 2 and 3


# --- (d) alignment: the draft is trained towards the target one position on --------------------------------------
def test_feature_draft_loss_compares_the_draft_with_the_target_one_position_on():
    from mamballama_cli.training.losses import feature_draft_loss, kd_loss

    g = torch.Generator().manual_seed(0)
    b, T, V, H = 2, 7, 11, 5
    t_logits, f = torch.randn(b, T, V, generator=g), torch.randn(b, T, H, generator=g)
    targets = torch.randint(0, V, (b, T), generator=g)
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[:, -1] = False
    mask[1, 4:] = False
    valid = torch.ones(b, T, dtype=torch.bool)
    valid[1, 5:] = False
    kw = dict(w_kl=1.0, w_ce=0.5, temperature=2.0, w_feature=3.0)
    # a perfect draft reproduces the target one position on: nothing to learn but the CE of the targets
    total, m = feature_draft_loss(t_logits[:, 1:], f[:, 1:], t_logits, f, targets, mask, valid, **kw)
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-5) and float(m["feature"]) == 0.0
    ce = kd_loss(t_logits[:, 1:], None, targets[:, 1:], mask[:, 1:], w_kl=0.0, w_ce=1.0)[1]["ce"]
    torch.testing.assert_close(total, 0.5 * ce)
    # the unshifted target (what the draft's inputs already tell it) is far from it
    _, m2 = feature_draft_loss(t_logits[:, :-1], f[:, :-1], t_logits, f, targets, mask, valid, **kw)
    assert float(m2["kl"]) > 1.0 and float(m2["feature"]) > 0.5
    # the feature term: smooth L1 per real position, averaged, counted per loss position
    d_f = f[:, 1:] + 0.3
    _, m3 = feature_draft_loss(t_logits[:, 1:], d_f, t_logits, f, targets, mask, valid, **kw)
    per_position = torch.nn.functional.smooth_l1_loss(d_f, f[:, 1:], reduction="none").mean(-1)
    v = valid[:, 1:]
    expected = per_position[v].mean() * mask[:, 1:].sum()
    torch.testing.assert_close(m3["feature"], expected)


def test_the_recipes_loss_is_the_shifted_kl_to_the_target(draft_dir, targets):
    """FeatureDraftRecipe.loss on a real tiny target and draft equals the KL written out position by position:
    draft position j (reading token j + 1 and the target's feature j) against the target's position j + 1."""
    import contextlib
    import dataclasses
    from types import SimpleNamespace

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from mamballama_cli.models.feature_draft import draft_forward, target_features
    from mamballama_cli.training.data import Item
    from mamballama_cli.training.recipes import FEATURE_DRAFT, Job, eval_stage, recipe_for

    target = AutoModelForCausalLM.from_pretrained(targets["llama"]).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir)
    assert recipe_for("distill").for_model(draft) is FEATURE_DRAFT
    assert recipe_for("distill").for_model(target) is recipe_for("distill")
    acc = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, unwrap_model=lambda m: m)
    items = [Item([1, 5, 6, 7, 8, 9, 10, 2], [False, False, True, True, True, True, True, True]),
             Item([1, 9, 11, 12, 2], [False, False, False, True, True])]
    job = Job(FEATURE_DRAFT, frozen=target, items=items, pad_id=0)
    st = eval_stage(True)
    _, m = FEATURE_DRAFT.loss(job, acc, draft, items, st, None, 1.0, None)

    def drafting_step(ids, f, j, k):
        """What the draft's (k+1)-th drafting step at draft position j computes, as decoding runs it: its forward
        over the true pairs up to j - k (a verify call's window), then k steps, each on the next true token (the
        proposals before were accepted) and the feature the step before predicted. Its logits at j."""
        toks, feats = ids[:, 1 : j - k + 2], f[:, : j - k + 1]
        logits, h = draft_forward(draft, toks, feats)
        for m in range(1, k + 1):
            toks = torch.cat([toks, ids[:, j - k + m + 1 : j - k + m + 2]], dim=1)
            feats = torch.cat([feats, h[:, -1:]], dim=1)
            logits, h = draft_forward(draft, toks, feats)
        return logits[0, -1]

    def written_out_kl(k: int) -> tuple[float, int]:
        """Pass k's KL (k = 0: teacher-forced), position by position from decoding's own steps, and the positions
        where its top token is the target's; pass k covers the draft positions j >= k."""
        total, agree = 0.0, 0
        with torch.no_grad():
            for it in items:
                ids = torch.tensor([it.ids])
                t_logits, f = target_features(target, ids)
                for j in range(k, len(it) - 2):
                    if it.mask[j + 2]:  # draft position j predicts token j + 2
                        lt = F.log_softmax(t_logits[0, j + 1], -1)
                        ld = F.log_softmax(drafting_step(ids, f, j, k), -1)
                        total += float((lt.exp() * (lt - ld)).sum())
                        agree += int(lt.argmax() == ld.argmax())
        return total, agree

    expected, agree = written_out_kl(0)
    assert float(m["agree"]) == agree
    assert float(m["kl"]) == pytest.approx(expected, rel=1e-4)
    assert FEATURE_DRAFT.count(items, [0, 1], "responses") == 6 + 2

    # unroll 3: pass k is the (k+1)-th drafting step, exactly (chained_passes: its attention sees the window's
    # keys up to j - k and its own chain's after them; its features are the pass before's predictions)
    _, m3 = FEATURE_DRAFT.loss(job, acc, draft, items, dataclasses.replace(st, unroll=3), None, 1.0, None)
    (kl1, agree1), (kl2, agree2) = written_out_kl(1), written_out_kl(2)
    assert float(m3["agree"]) == agree and float(m3["agree_unrolled"]) == agree1 + agree2
    assert FEATURE_DRAFT.eval_unit(True).unroll == 2  # held out: the first and the second proposal
    assert float(m3["kl"]) == pytest.approx(expected, rel=1e-4)  # the first pass as before
    assert float(m3["kl_unrolled"]) == pytest.approx(kl1 + kl2, rel=1e-4) and abs(kl1 - expected) > 1e-3
    assert float(m3["loss"]) > float(m["loss"])
    # unroll_decay d: pass k's loss counts d ** k, the metrics stay unweighted. With KL the only term, the loss is
    # the first pass's KL plus d * kl1 + d^2 * kl2
    kl_only = dataclasses.replace(st, w_ce=0.0, unroll=3)
    for decay in (1.0, 0.5):
        _, md = FEATURE_DRAFT.loss(job, acc, draft, items, dataclasses.replace(kl_only, unroll_decay=decay), None,
                                   1.0, None)
        assert float(md["kl_unrolled"]) == pytest.approx(kl1 + kl2, rel=1e-4)
        assert float(md["loss"]) == pytest.approx(expected + decay * kl1 + decay**2 * kl2, rel=1e-4)
    assert all(m.chained is None for m in draft.modules() if hasattr(m, "chained"))  # the context is gone


# --- (c) distill through the CLI ---------------------------------------------------------------------------------
def test_distill_trains_a_feature_draft_with_the_template(draft_dir, targets, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mamballama_cli.models.feature_draft import is_feature_draft

    data = tmp_path / "small.jsonl"  # a few records, seen again and again
    lines = Path(TRAIN).read_text().splitlines()[:4]
    data.write_text("\n".join(lines * 4) + "\n")
    out = tmp_path / "run"
    r = run_cli(["distill", draft_dir, "--teacher", targets["llama"], "--template", "distill-feature-draft",
                 "--data", data, "--eval-data", EVAL, "--steps", "20", "--lr", "3e-3", "--warmup", "0",
                 "--seq-len", "96", "--micro-batch-size", "4", "--gradient-accumulation-steps", "1",
                 "--output", out, "--json"], capsys)
    assert r.code == 0, r.err[-3000:]
    summary = json.loads(r.out)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x and "eval_kl" not in x]
    assert len(steps) == 20 and all("feature" in x and "kl" in x and "kl_unrolled" in x for x in steps)
    assert "feature" in summary["last"]
    for x in steps:  # loss = w_kl * kl + w_feature * feature over the template's 3 passes (weights 1 and 1)
        assert x["loss"] > x["kl"] + x["feature"] + x["kl_unrolled"]
    first, last = sum(x["loss"] for x in steps[:3]) / 3, sum(x["loss"] for x in steps[-3:]) / 3
    assert last < 0.7 * first, [x["loss"] for x in steps]
    evals = summary["evals"]
    assert "eval_feature" in evals[0] and evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    for ev in evals:  # greedy agreement at the first and the second proposal, as shares of the positions
        assert 0 <= ev["eval_agree"] <= 1 and 0 <= ev["eval_agree_unrolled"] <= 1
    assert all(0 <= x["agree"] <= 1 and 0 <= x["agree_unrolled"] <= 2 for x in steps)  # 2 later passes

    before, after = load_file(str(draft_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for frozen in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(before[frozen], after[frozen].to(before[frozen].dtype)), frozen
    for trained in ("model.fc.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert not torch.equal(before[trained], after[trained].to(before[trained].dtype)), trained
    final = AutoModelForCausalLM.from_pretrained(out)
    assert is_feature_draft(final) and final.config.num_hidden_layers == 1
    assert final.config.teacher["name_or_path"] == str(targets["llama"])


def test_distill_takes_the_target_the_feature_draft_records(draft_dir, tmp_path, capsys):
    """No --teacher: the draft's config names its target; the default recipe's alignment stage is refused."""
    r = run_cli(["distill", draft_dir, "--data", TRAIN, "--output", tmp_path / "run", "--seq-len", "96"], capsys)
    one_line_error(r, "--w-hidden", "distill-feature-draft", code=2)


def test_w_feature_and_unroll_need_a_feature_draft(models, tmp_path, capsys):
    """Each option of feature-draft training is refused for a hybrid student, and a bad value is refused, with
    one line naming the option."""
    for extra, needles in ((["--unroll", "2", "--seq-len", "96"], ("--unroll 2", "--feature-draft")),
                           (["--unroll", "0"], ("--unroll 0 must be a whole number, at least 1",)),
                           (["--w-feature", "1", "--seq-len", "96"], ("--w-feature", "--feature-draft")),
                           (["--w-feature", "-1"], ("--w-feature -1.0 must not be negative",)),
                           (["--unroll-decay", "0.5", "--seq-len", "96"], ("--unroll-decay 0.5", "--feature-draft")),
                           (["--unroll-decay", "1.5"], ("--unroll-decay 1.5 is outside (0, 1]",))):
        r = run_cli(["distill", models["hybrid"], "--template", "none", "--data", TRAIN, *extra,
                     "--output", tmp_path / "run"], capsys)
        one_line_error(r, *needles, code=2)
