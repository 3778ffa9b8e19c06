"""The calibrated start and the per-layer report of `convert`, and `--attn-layers auto`, on tiny models (issue 14)."""

import json
from pathlib import Path

import pytest
import torch

from clihelp import run_cli
from helpers import rel_err, save_teacher, tiny_hybrid

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_least_squares_gains_are_the_best_per_channel_fit():
    """fit_gains solves the normal equations: no other per-channel gain vector fits the target better."""
    from mamballama_cli.convert.calibrate import fit_gains

    student, _ = tiny_hybrid()
    mixer = student.model.layers[0].mamba
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 40, mixer.out_proj.in_features, generator=g)
    a = torch.randn(3, 40, mixer.out_proj.out_features, generator=g)
    W = mixer.out_proj.weight.detach().double()

    def err(gains):
        return float(((u.double() * gains) @ W.T - a.double()).pow(2).sum())

    best = fit_gains(mixer, u, a, ridge=0.0)
    assert err(best) <= err(torch.zeros_like(best)) and err(best) <= err(torch.ones_like(best))
    for _ in range(5):
        assert err(best) <= err(best + 0.01 * torch.randn(best.shape, generator=g, dtype=best.dtype)) + 1e-9


def test_calibrated_layers_are_never_further_from_attention_than_a_dropped_layer():
    from mamballama_cli.convert.calibrate import INITS, calibrate_hybrid

    student, teacher = tiny_hybrid(attn_layers=(3,))
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(1))
    records = calibrate_hybrid(student, teacher, ids, INITS["calibrated"])
    assert [r["layer"] for r in records] == [0, 1, 2]
    for r in records:
        assert r["final"]["rel_error"] <= 1.0 + 1e-6  # zero gains are a candidate of the fit
        assert r["final"]["rel_error"] < r["mapped"]["rel_error"]
        mixer = student.model.layers[r["layer"]].mamba
        assert float(mixer.D.detach().abs().max()) == 0.0
        w = mixer.conv1d.weight.detach()[:, 0]
        assert torch.equal(w[:, -1], torch.ones_like(w[:, -1])) and float(w[:, :-1].abs().max()) == 0.0
        z = mixer.in_proj.weight[mixer.in_proj_slices()["z"]]
        head = z[: mixer.headdim]
        assert torch.equal(head, head[:1].expand_as(head))  # one gate row per head: the open gate


def test_convert_reports_every_layer_and_the_step0_perplexities(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "t", n_heads=4, n_kv=2)
    r = run_cli(["convert", teacher, "--ratio", "0.5", "--output", tmp_path / "h", "--calibration-seqs", "2",
                 "--calibration-len", "64", "--json"], capsys)
    assert r.code == 0, r.err
    s = json.loads(r.out)
    cal = s["calibration"]
    assert cal["measured"] and cal["init"]["conv"] == "identity" and cal["text"]["sequences"] == 2
    assert [x["layer"] for x in cal["layers"]] == s["mamba_layers"]
    assert set(cal["step0_perplexity"]) == {"teacher", "hybrid", "mamba_layers_dropped"}
    assert json.loads((tmp_path / "h" / "convert_summary.json").read_text())["calibration"]["layers"]
    # the paper's start: measured too, but its parts stay fresh (random conv, D = 1)
    r = run_cli(["convert", teacher, "--ratio", "0.5", "--init", "paper", "--output", tmp_path / "p",
                 "--calibration-seqs", "2", "--calibration-len", "64", "--json"], capsys)
    assert r.code == 0, r.err
    p = json.loads(r.out)["calibration"]
    assert p["init"]["D"] == 1.0 and not p["init"]["gains"]
    assert all(x["final"] == x["structured"] for x in p["layers"])


def test_convert_no_gate_writes_a_hybrid_without_z_rows_that_auto_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    teacher = save_teacher(tmp_path / "t", n_heads=4, n_kv=2, layers=6)
    r = run_cli(["convert", teacher, "--attn-layers", "auto", "--ratio", "0.5", "--no-gate", "--output",
                 tmp_path / "h", "--calibration-seqs", "2", "--calibration-len", "64", "--json"], capsys)
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert "gate_positive_fraction" not in str(s["calibration"]["layers"])  # no gate to open
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert model.config.mamba_gate is False and len(model.config.attn_layers) == 3
    for i in model.config.mamba_layers:
        m = model.model.layers[i].mamba
        assert m.in_proj.weight.shape[0] == m.conv_dim + m.n_heads
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 16)
    # it distils like any hybrid: held-out KL to the teacher falls
    data = Path(__file__).parent / "data"
    r = run_cli(["distill", tmp_path / "h", "--teacher", teacher, "--output", tmp_path / "run", "--template", "none",
                 "--data", data / "chat_train.jsonl", "--eval-data", data / "chat_eval.jsonl", "--steps", "8",
                 "--lr", "3e-3", "--seq-len", "128", "--micro-batch-size", "4", "--warmup", "0", "--json"], capsys)
    assert r.code == 0, r.err
    evals = json.loads(r.out)["evals"]
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").config.mamba_gate is False
    for args, needle in ((["--mixer", "mamba1"], "--mixer mamba1"), (["--draft-layers", "0,2"], "--draft-layers")):
        r = run_cli(["convert", teacher, "--no-gate", *args, "--output", tmp_path / "o"], capsys)
        assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and needle in r.err and "--no-gate" in r.err
        assert not (tmp_path / "o").exists()


def test_attn_layers_auto_keeps_as_many_layers_as_even_spacing(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "t", n_heads=4, n_kv=2, layers=6)
    from mamballama_cli.convert import combine_scores

    for score in ("kl", "residual", "recall", "kl+recall"):
        r = run_cli(["convert", teacher, "--attn-layers", "auto", "--ratio", "0.5", "--placement-score", score,
                     "--output", tmp_path / score, "--calibration-seqs", "2", "--calibration-len", "64", "--json"],
                    capsys)
        assert r.code == 0, r.err
        s = json.loads(r.out)
        pl = s["calibration"]["placement"]
        assert len(s["attn_layers"]) == 3 and pl["attn_layers"] == s["attn_layers"] and pl["score"] == score
        parts = {name: {int(k): v for k, v in (pl[key] or {}).items()} for name, key in
                 (("kl", "kl_one_layer_converted"), ("recall", "recall_nll_increase_one_layer_converted"),
                  ("residual", "calibrated_rel_error"))}
        assert bool(parts["kl"]) == ("kl" in score) and bool(parts["recall"]) == ("recall" in score)
        if "recall" in score:
            assert pl["recall_nll_teacher"] > 0 and all(v >= 0 for v in parts["recall"].values())
        scores = combine_scores(score, parts["kl"], parts["recall"], parts["residual"])
        assert sorted(scores) == list(range(6))
        kept = sorted(scores, key=lambda i: -scores[i])[:3]
        assert sorted(kept) == s["attn_layers"]  # the layers whose conversion hurts most keep attention


def test_kl_plus_recall_scales_each_part_by_its_mean():
    from mamballama_cli.convert import combine_scores

    kl = {0: 1.0, 1: 3.0, 2: 2.0}  # mean 2
    recall = {0: 9.0, 1: 0.0, 2: 0.0}  # mean 3
    both = combine_scores("kl+recall", kl, recall, {})
    assert both == pytest.approx({0: 0.5 + 3.0, 1: 1.5, 2: 1.0})
    assert combine_scores("kl+recall", kl, {0: 0.0, 1: 0.0, 2: 0.0}, {}) == pytest.approx({0: 0.5, 1: 1.5, 2: 1.0})
    assert combine_scores("recall", kl, recall, {}) == recall and combine_scores("kl", kl, recall, {}) == kl


def test_recall_probes_state_the_code_before_asking_for_it():
    from helpers import tiny_tokenizer

    from mamballama_cli.convert.calibrate import builtin_documents, recall_probes

    tok = tiny_tokenizer()
    probes = recall_probes(tok, builtin_documents(heldout=False)[:3], n=4, length=96, seed=3)
    assert len(probes) == 4
    codes = set()
    for ids, k in probes:
        assert ids.shape == (1, 96) and k > 0
        answer = ids[0, -k:].tolist()
        body = ids[0, :-k].tolist()
        # the answer's tokens occur earlier in the probe, inside the stated fact
        assert any(body[i:i + k] == answer for i in range(len(body) - k)), "the code is never stated"
        codes.add(tok.decode(answer).replace(" ", ""))
    assert len(codes) > 1  # a fresh code per probe
    from mamballama_cli.errors import UsageError

    with pytest.raises(UsageError, match="calibration-len"):
        recall_probes(tok, builtin_documents(heldout=False)[:1], n=1, length=20)


def test_bad_calibration_options_are_one_line_errors(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "t", n_heads=4, n_kv=2)
    for args, needle in ((["--attn-layers", "auto"], "--ratio"), (["--init", "bogus"], "--init"),
                         (["--init", "conv=sideways"], "conv"), (["--placement-score", "x"], "placement"),
                         (["--calibration-len", "4"], "calibration")):
        r = run_cli(["convert", teacher, "--output", tmp_path / "o", *args], capsys)
        assert r.code != 0 and len(r.err.strip().splitlines()) == 1 and needle in r.err, (args, r.err)
        assert not (tmp_path / "o").exists()


def test_no_gate_starts_as_the_open_gate_wherever_that_gate_is_positive():
    """A mixer without the gate (--no-gate), holding the gated one's other parameters, equals the gated one with
    the open gate on every token whose gate is positive, and is its negative where the gate is negative: the
    per-head norm keeps only the sign of a gate that is one number per token. Up to the norm's eps, which is set
    to 0 here: with eps, norm(s y) = y / sqrt(mean(y^2) + eps / s^2), and this tiny random model's heads have
    mean(y^2) near eps. On the default teacher the gate is positive on at least 99.6% of the calibration tokens
    of every layer (docs/results/*/convert-*.json, gate_positive_fraction)."""
    import torch.nn.functional as F

    from mamballama_cli.convert.calibrate import calibrate_hybrid, init_spec
    from mamballama_cli.models.step import OpTable, Step

    ids = torch.randint(3, 96, (4, 64), generator=torch.Generator().manual_seed(1))
    spec = init_spec("gains=false")  # the calibrated start without the fit, which the flipped tokens would move
    gated, teacher = tiny_hybrid(attn_layers=(3,))
    free, _ = tiny_hybrid(attn_layers=(3,), overrides={"mamba_gate": False})
    calibrate_hybrid(gated, teacher, ids, spec)
    mixed = 0
    for i in (0, 1, 2):
        g, f = gated.model.layers[i].mamba, free.model.layers[i].mamba
        assert f.in_proj.out_features == g.in_proj.out_features - g.d_inner and f.d_z == 0
        g.eps = f.eps = 0.0
        with torch.no_grad():  # every parameter of the gated mixer but the gate's rows
            for name, p in f.named_parameters():
                q = g.get_parameter(name)
                p.copy_(q[g.d_inner:] if name == "in_proj.weight" else q)
        x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(i))
        x = gated.model.layers[i].input_layernorm(x)
        with torch.no_grad():
            yg, yf = g(x), f(x)
            gate = F.silu(g.in_proj(x)[..., 0])  # every gate row of the open gate is the same row
            one = OpTable("cpu")
            stepped = f.step(x[:, 0], f.allocate_state(2, torch.float32, "cpu"), Step(one))[:, None]
        pos, neg = gate > 0.5, gate < -0.05
        mixed += int(neg.any())
        assert rel_err(yg[pos], yf[pos]) < 1e-4 and rel_err(yg[neg], -yf[neg]) < 1e-4
        assert rel_err(stepped, yf[:, :1]) < 1e-5
    assert mixed  # the tiny teacher has tokens of both signs, so both branches are checked
