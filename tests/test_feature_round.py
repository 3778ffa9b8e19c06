"""Captured rounds with a feature draft (generation/feature_round.py), run eagerly: the computation a CUDA graph
records. The target's greedy tokens come out for every row whatever the draft proposes, and every proposal is the
one the draft's own forward gives on the true pairs (token, the target's feature one position back) followed by
its own tokens and predicted features: the per-row window, gather and positions are checked against that oracle."""

import copy

import pytest
import torch

from helpers import tiny_hybrid
from mamballama_cli.errors import UsageError
from mamballama_cli.generation.captured_round import acceptance_by_position
from mamballama_cli.generation.feature_round import FeatureRounds
from mamballama_cli.generation.sampling import SamplingConfig
from mamballama_cli.models.configuration import MamballamaConfig
from mamballama_cli.models.feature_draft import draft_forward, target_features
from mamballama_cli.models.modeling import MamballamaForCausalLM
from test_speculative import greedy_reference
from test_speculative_cli import pair  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def bigram_heavy(seed=1, scale=0.02):
    """A tiny hybrid whose mixers and MLPs are scaled down (by ``scale``): its next token depends mostly on the
    current one, so a one-layer draft can agree with it often, and by different counts per row. (At 0.15 the
    residual branches still outweighed the embedding: its greedy token was the bare bigram's 9% of the time, and a
    draft of :func:`feature_draft_of` was almost never accepted; at 0.02, 72%.)"""
    target, _ = tiny_hybrid(seed=seed)
    with torch.no_grad():
        for layer in target.model.layers:
            mixer = layer.self_attn if layer.is_attention else layer.mamba
            (mixer.o_proj if layer.is_attention else mixer.out_proj).weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return target.eval()


def feature_draft_of(target, feature_mix=0.04, seed=3, layer_scale=0.05):
    """One attention layer that starts from the target's embedding, final norm and head; fc passes the token's
    embedding through plus a little of the target's feature (``feature_mix``: the feature is normed, about ten
    times the embedding's size, so 0.04 is already a fair share of the input), the layer adds a little
    (``layer_scale``): a draft that is right often (about 0.5 to 0.7 of its proposals accepted on the prompts
    below) and reads the features."""
    c = target.config.to_dict()
    for key in ("attn_layers", "num_hidden_layers", "feature_draft", "architectures", "model_type",
                "transformers_version"):
        c.pop(key, None)
    cfg = MamballamaConfig(**c, num_hidden_layers=1, attn_layers=[0], feature_draft=True)
    torch.manual_seed(seed)
    draft = MamballamaForCausalLM(cfg)
    h = cfg.hidden_size
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
        draft.model.norm.weight.copy_(target.model.norm.weight)
        gen = torch.Generator().manual_seed(seed)
        draft.model.fc.weight.copy_(torch.cat([torch.eye(h), feature_mix * torch.randn(h, h, generator=gen) / h**0.5],
                                              dim=1))
        layer = draft.model.layers[0]
        layer.self_attn.o_proj.weight.mul_(layer_scale)
        layer.mlp.down_proj.weight.mul_(layer_scale)
    return draft.eval()


def oracle_proposals(target, draft, seq: list[int], k: int) -> list[int]:
    """What the draft should propose after ``seq`` (its last token is the pending correction): its forward over the
    true pairs, then over its own tokens and predicted features."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        _, f = target_features(target, ids)
        toks, feats = ids[:, 1:], f[:, :-1]
        out = []
        for _ in range(k):
            logits, g = draft_forward(draft, toks, feats)
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            toks = torch.cat([toks, torch.tensor([[tok]])], dim=1)
            feats = torch.cat([feats, g[:, -1:]], dim=1)
    return out


@pytest.mark.parametrize("k", [2, 4])
def test_feature_rounds_give_each_rows_greedy_tokens_and_the_drafts_own_proposals(k):
    target = bigram_heavy()
    draft = feature_draft_of(target)
    prompts = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(9))
    n = 20
    rounds = FeatureRounds(target, draft, 3, 6 + n + 2 * (k + 1), k, capture=False)
    # the rounds one by one, as generate() runs them, each row's proposals checked against the oracle
    rounds.max_new.fill_(n)
    first, _ = rounds._pick(rounds._prefill(prompts))
    rounds.pending.copy_(torch.stack([prompts[:, -1], first], dim=1))
    rounds._record(first[:, None], torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    counts = set()
    checked = 0
    for _ in range(n):
        if bool(rounds.finished.all()):
            break
        live = (~rounds.finished).tolist()
        seqs = [prompts[r].tolist() + rounds.hist[r, : int(rounds.hist_len[r])].tolist() for r in range(3)]
        rounds._round()
        for r in range(3):
            if live[r]:
                assert rounds.drafts[r].tolist() == oracle_proposals(target, draft, seqs[r], k), (r, seqs[r])
                counts.add(int(rounds.acc[r]))
                checked += 1
    assert checked >= 6 and len(counts) >= 2, counts  # rows accepted different counts
    # generate(): each row's greedy tokens, an acceptance strictly between 0 and 1
    wants = [greedy_reference(target, prompts[r : r + 1], n)[0] for r in range(3)]
    got, stats = rounds.generate(prompts, n, sync_every=2)
    assert got == wants
    assert 0 < stats["acceptance_rate"] < 1 and 1 < stats["tokens_per_call"] <= k + 1
    # the histogram of accepted counts per live row-round agrees with the totals, and gives acceptance per position
    hist = stats["accepted_hist"]
    assert len(hist) == k + 1 and sum(hist) == stats["row_rounds"]
    assert sum(i * h for i, h in enumerate(hist)) == stats["accepted"]
    assert acceptance_by_position([2, 3, 5]) == [0.8, 0.625]  # 8 of 10 took the 1st, 5 of those 8 the 2nd
    assert acceptance_by_position([4, 0, 0]) == [0.0, None]  # no round reached the 2nd
    by_pos = acceptance_by_position(hist)
    assert len(by_pos) == k and 0 < by_pos[0] <= 1


def test_feature_rounds_read_the_features():
    """The same draft without the target's features (their half of fc zeroed) proposes other tokens: the window
    and the one-token steps do read the features they are handed."""
    target = bigram_heavy()
    draft = feature_draft_of(target, feature_mix=3.0)
    blind = copy.deepcopy(draft)
    with torch.no_grad():
        blind.model.fc.weight[:, target.config.hidden_size:].zero_()
    prompts = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    props = []
    for d in (draft, blind):
        rounds = FeatureRounds(target, d, 2, 40, 3, capture=False)
        rounds.generate(prompts, 12)
        props.append(rounds.drafts.clone())
    assert not torch.equal(props[0], props[1])


def test_sampled_feature_rounds_are_seeded_and_refuse_drafts_that_do_not_fit():
    target = bigram_heavy()
    draft = feature_draft_of(target)
    prompts = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    cfg = SamplingConfig(temperature=0.8)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        rounds = FeatureRounds(target, draft, 2, 40, 3, sampling=cfg, capture=False)
        runs.append(rounds.generate(prompts, 10)[0])
    assert runs[0] == runs[1] and all(len(r) == 10 for r in runs[0])
    with pytest.raises(UsageError, match="feature draft"):
        FeatureRounds(target, target, 2, 40, 3, capture=False)
    other, _ = tiny_hybrid(seed=1, vocab=48)
    with pytest.raises(UsageError, match="vocabulary"):
        FeatureRounds(other, draft, 2, 40, 3, capture=False)


@pytest.fixture(scope="module")
def feature_pair(pair):
    """The CLI tests' hybrid target (tests/test_speculative_cli.py) and a feature draft made from it, saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mamballama_cli  # noqa: F401  (registers the architecture with the Auto classes)

    target = AutoModelForCausalLM.from_pretrained(pair / "target", dtype=torch.float32)
    draft = feature_draft_of(target)
    draft.save_pretrained(pair / "fdraft")
    AutoTokenizer.from_pretrained(pair / "target").save_pretrained(pair / "fdraft")
    return pair


def test_generate_and_spec_eval_take_a_feature_draft(feature_pair, tmp_path, capsys):
    """`generate --speculative --draft FEATURE_DRAFT` runs the feature rounds (it needs no --round-graph) and prints
    the plain greedy text; benchmarks/spec_eval.py measures the pair (plain and captured round; a feature draft has
    no host loop) and times a draft step with its feature input."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from clihelp import run_cli
    from helpers import write_heldout_text

    target, draft = feature_pair / "target", feature_pair / "fdraft"
    plain = run_cli(["generate", target, "--prompt", "hello world", "-n", "24"], capsys)
    stats_file = tmp_path / "s.json"
    r = run_cli(["generate", target, "--prompt", "hello world", "-n", "24", "--speculative", "--draft", draft,
                 "-k", "3", "--stats-json", stats_file], capsys)
    assert r.code == 0, r.err
    assert r.out == plain.out
    stats = json.loads(stats_file.read_text())
    assert stats["captured_round"] is True and stats["round_kind"] == "FeatureRounds" and stats["rounds"] > 0
    data = write_heldout_text(tmp_path / "data")
    out = tmp_path / "spec.json"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "spec_eval.py"), str(target), "--draft", str(draft),
                        "-k", "2,3", "--data", str(data), "--prompts", "3", "--max-new-tokens", "6", "--text-window",
                        "24", "--device", "cpu", "--dtype", "float32", "--parts-iters", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())  # two windows in one process: one run each, one plain run for both
    assert res["k"] == res["done"] == [2, 3] and [run["k"] for run in res["runs"]] == [2, 3]
    assert "host loop is skipped" in p.stderr
    assert res["runs"][0]["engines"]["plain"] == res["runs"][1]["engines"]["plain"]
    assert res["gemv_kernel_shapes"] == res["fused_gemv_shapes"] == []  # the kernels' choices: none on CPU
    for run in res["runs"]:
        assert set(run["engines"]) == {"plain", "round"}
        rnd = run["engines"]["round"]
        assert rnd["matches_plain"] == 3 and run["parts"]["draft_step_ms"] > 0
        assert set(run["parts"]["verify_step_ms"]) == {"1", str(run["k"] + 1)}
        assert sum(rnd["accepted_hist"]) == rnd["calls"] and len(rnd["acceptance_by_position"]) == run["k"]
        assert rnd["drafted"] == run["k"] * rnd["calls"]
    bad = subprocess.run([sys.executable, str(root / "benchmarks" / "spec_eval.py"), str(target), "--draft",
                          str(draft), "-k", "2,0", "--data", str(data)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "-k '2,0'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_captured_feature_rounds_equal_the_uncaptured_ones_on_cuda(batch):
    target = bigram_heavy()
    draft = feature_draft_of(target).cuda()
    target = target.cuda()
    prompts = torch.randint(3, 96, (batch, 6), generator=torch.Generator().manual_seed(9)).cuda()
    n, k = 20, 3
    got = {}
    for capture in (False, True):
        rounds = FeatureRounds(target, draft, batch, 6 + n + 2 * (k + 1), k, capture=capture)
        got[capture], stats = rounds.generate(prompts, n, sync_every=2)
    wants = [greedy_reference(target, prompts[r : r + 1], n)[0] for r in range(batch)]
    assert got[True] == got[False] == wants
    assert 1.5 < stats["tokens_per_call"] < k + 1  # proposals are accepted, not all of them
