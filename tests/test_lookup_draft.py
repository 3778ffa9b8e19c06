"""The lookup draft (generation/lookup.py): proposals copied from the context, in captured rounds run eagerly."""

import json
import random

import pytest
import torch
from clihelp import run_cli
from helpers import NEEDS_TRITON, interpreted_check, tiny_hybrid, write_heldout_text
from test_speculative import greedy_reference
from test_speculative_cli import pair  # noqa: F401  (module fixture: a converted target and a cut draft)

from mamballama_cli.errors import UsageError
from mamballama_cli.generation.lookup import (
    LookupDraft,
    LookupRounds,
    parse_lookup,
    propose_host,
    simulate_lookup,
)
from mamballama_cli.generation.sampling import SamplingConfig, probabilities
from mamballama_cli.generation.speculative import speculative_generate
from mamballama_cli.ops.lookup import lookup_propose

pytestmark = pytest.mark.usefixtures("one_thread")


def test_proposals_follow_the_latest_longest_match():
    #        0  1  2  3  4  5  6  7  8  9
    ctx = [[5, 6, 7, 8, 9, 6, 7, 1, 5, 6, 7],  # suffix 5 6 7: the 3-gram at 0..2 wins over the later 2-gram 6 7
           [1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 2],  # only the 1-gram "2" matches, at 1: propose 3 4 9 ...
           [4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4],  # a loop of period 2: the latest 3-gram match ends 2 before the end
           [7, 8, 9, 1, 2, 3, 4, 5, 6, 3, 0]]  # "0" never occurred: the last token again
    got = lookup_propose(torch.tensor(ctx), torch.tensor([11, 11, 11, 11]), 5)
    assert got.tolist() == [[8, 9, 6, 7, 1], [3, 4, 9, 9, 9], [5, 4, 5, 4, 5], [0, 0, 0, 0, 0]]
    assert [propose_host(c, 5) for c in ctx] == got.tolist()
    # a shorter real length: only the first 4 tokens of row 0 count ("8" never occurred before: the last token)
    short = lookup_propose(torch.tensor(ctx), torch.tensor([4, 11, 11, 11]), 3)
    assert short[0].tolist() == [8, 8, 8] == propose_host(ctx[0][:4], 3)
    # the period rule: a match right before the last token repeats with period 1
    assert propose_host([3, 3], 4) == [3, 3, 3, 3] == lookup_propose(torch.tensor([[3, 3, 0]]), torch.tensor([2]),
                                                                     4)[0].tolist()


@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 1), (1, 1), (4, 2)])
def test_device_proposals_equal_the_host_reference(max_ngram, min_ngram):
    rng = random.Random(max_ngram * 10 + min_ngram)
    for trial in range(40):
        b, L = 4, 48
        vocab = rng.choice([3, 5, 12])  # small vocabularies: many matches, of every length
        rows = [[rng.randrange(vocab) for _ in range(L)] for _ in range(b)]
        lengths = [rng.randrange(1, L + 1) for _ in range(b)]
        k = rng.randrange(1, 9)
        got = lookup_propose(torch.tensor(rows), torch.tensor(lengths), k, max_ngram, min_ngram).tolist()
        want = [propose_host(r[:n], k, max_ngram, min_ngram) for r, n in zip(rows, lengths)]
        assert got == want, (trial, lengths, k)


def test_lookup_values_are_checked():
    assert parse_lookup(None) == LookupDraft() and parse_lookup("5").max_ngram == 5
    for bad in ("x", "0", "17"):
        with pytest.raises(UsageError, match="lookup:"):
            parse_lookup(bad)


def _repeating_target():
    """A tiny hybrid over 8 tokens: its greedy text repeats itself, as small models' greedy text does (prompts
    avoid token 0, which greedy_reference's generate() takes for padding)."""
    return tiny_hybrid(seed=5, vocab=8)[0]


@pytest.mark.parametrize("k", [1, 4])
def test_lookup_rounds_give_each_rows_greedy_tokens_and_accept_what_the_host_reference_predicts(k):
    target = _repeating_target()
    prompts = torch.randint(1, 8, (3, 7), generator=torch.Generator().manual_seed(3))
    n = 40
    further = [greedy_reference(target, prompts[r: r + 1], n + k + 1)[0] for r in range(3)]  # the last round's
    wants = [f[:n] for f in further]  # verify call sees past n
    rounds = LookupRounds(target, LookupDraft(), 3, 7 + n + 2 * (k + 1), k, capture=False)
    got, stats = rounds.generate(prompts, n, sync_every=2)
    assert got == wants
    # every round accepted exactly what the proposals of the plain-Python reference allow over these tokens
    counts = [simulate_lookup(prompts[r].tolist(), further[r], k, LookupDraft(), n) for r in range(3)]
    assert stats["accepted"] == sum(map(sum, counts)) and stats["row_rounds"] == sum(map(len, counts))
    assert stats["tokens_per_call"] > 1.5  # the text repeats: the lookup is right often
    assert len({sum(c) / len(c) for c in counts}) > 1  # rows accepted different amounts
    if k > 1:
        assert stats["accepted_hist"][k] > 0 and stats["accepted_hist"][0] > 0
    again, _ = rounds.generate(prompts, n)  # fixed buffers, reused as a captured graph would
    assert again == got


def test_lookup_rounds_stop_each_row_at_its_stop_token():
    target = _repeating_target()
    prompts = torch.randint(1, 8, (2, 6), generator=torch.Generator().manual_seed(5))
    wants = [greedy_reference(target, prompts[r: r + 1], 30)[0] for r in range(2)]
    stop = wants[0][9]
    rounds = LookupRounds(target, LookupDraft(max_ngram=2), 2, 6 + 30 + 12, 4, stop_tokens=[stop], capture=False)
    got, _ = rounds.generate(prompts, 30)
    assert got == [w[: w.index(stop) + 1] if stop in w else w for w in wants]


def test_sampled_lookup_rounds_follow_the_target_distribution():
    """Rejection sampling with a one-hot q is lossless: the second new token's empirical distribution matches the
    target's exactly computed marginal."""
    target = tiny_hybrid(seed=2, vocab=24)[0]
    prompt = torch.tensor([[3, 9, 3, 9, 3]])  # a prompt the lookup proposes from, right or wrong
    cfg = SamplingConfig(temperature=1.0)
    B = 1500
    rounds = LookupRounds(target, LookupDraft(), B, 5 + 3 + 2 * 3, 2, sampling=cfg, capture=False)
    torch.manual_seed(0)
    got, stats = rounds.generate(prompt.expand(B, -1), 3)
    assert stats["accepted"] > 0
    second = torch.tensor([g[1] for g in got])
    with torch.no_grad():
        p1 = probabilities(target(prompt).logits[:, -1], cfg)[0]
        ids = torch.cat([prompt.expand(24, -1), torch.arange(24)[:, None]], 1)
        marginal = (p1[:, None] * probabilities(target(ids).logits[:, -1], cfg)).sum(0)
    emp = torch.bincount(second, minlength=24).float() / B
    assert 0.5 * (emp - marginal).abs().sum() < 0.08


def test_speculative_generate_takes_the_lookup_draft_in_rounds():
    target = _repeating_target()
    prompt = torch.randint(1, 8, (1, 8), generator=torch.Generator().manual_seed(1))
    res = speculative_generate(target, LookupDraft(), prompt, k=3, max_new_tokens=20)
    assert res.tokens[0] == greedy_reference(target, prompt, 20)[0]
    assert res.extra["round_kind"] == "LookupRounds" and res.stats.draft_calls == 0
    with pytest.raises(UsageError, match="adaptive"):
        speculative_generate(target, LookupDraft(), prompt, k=3, max_new_tokens=4, adaptive=True)


def test_generate_with_the_lookup_draft_through_the_cli(pair, tmp_path, capsys):  # noqa: F811
    target = pair / "target"
    prompt = "one two one two one two one two"
    plain = run_cli(["generate", target, "--prompt", prompt, "-n", "24"], capsys)
    assert plain.code == 0, plain.err
    stats_file = tmp_path / "s.json"
    r = run_cli(["generate", target, "--prompt", prompt, "-n", "24", "--speculative", "--draft", "lookup:2",
                 "-k", "3", "--stats-json", stats_file], capsys)
    assert r.code == 0, r.err
    assert r.out == plain.out  # lossless at temperature 0
    stats = json.loads(stats_file.read_text())
    assert stats["draft"] == "lookup:2" and stats["round_kind"] == "LookupRounds"
    assert stats["matches_plain_greedy"] is True and stats["draft_calls"] == 0
    bad = run_cli(["generate", target, "--prompt", prompt, "--speculative", "--draft", "lookup:many"], capsys)
    assert bad.code != 0 and "lookup:many" in bad.err and len(bad.err.strip().splitlines()) == 1


def test_spec_eval_measures_the_lookup_draft(pair, tmp_path):  # noqa: F811
    """benchmarks/spec_eval.py with --draft lookup: plain and captured round (no host loop), the simulated counts
    from the plain tokens, and a round's parts with the lookup's own time in place of a draft step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = write_heldout_text(tmp_path / "data")
    out = tmp_path / "spec.json"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "spec_eval.py"), str(pair / "target"), "--draft",
                        "lookup", "-k", "3", "--data", str(data), "--prompts", "3", "--max-new-tokens", "10",
                        "--text-window", "24", "--device", "cpu", "--dtype", "float32", "--parts-iters", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["draft"] == "lookup" and set(res["engines"]) == {"plain", "round"} and "host loop is skipped" in p.stderr
    rnd = res["engines"]["round"]
    assert rnd["matches_plain"] == 3  # float32 on CPU: the same tokens as plain decoding
    # the measured rounds accepted what the plain-Python proposals allow over the plain tokens, bar each prompt's
    # last round, which sees past them (so at least that)
    sim = rnd["simulated"]
    assert sum(sim["accepted_hist"]) == rnd["calls"] and rnd["accepted"] >= sum(
        i * c for i, c in enumerate(sim["accepted_hist"]))
    assert res["parts"]["lookup_ms"] > 0 and res["parts"]["draft_step_ms"] == pytest.approx(
        res["parts"]["lookup_ms"] / 3, rel=1e-3)


def test_the_op_reference_reads_prompt_and_history_in_place_of_a_context():
    """lookup_draft (ops/lookup.py) over [prompt | new tokens] kept apart, as a round keeps them."""
    from mamballama_cli.ops.lookup import lookup_draft_ref

    rng = random.Random(1)
    L = 30
    for plen in (1, 4, 17):
        prompt = torch.tensor([[rng.randrange(4) for _ in range(L)] for _ in range(3)])
        hist = torch.tensor([[rng.randrange(4) for _ in range(L)] for _ in range(3)])
        hist_len = torch.tensor([0, 5, L - plen])
        got = lookup_draft_ref(prompt, torch.tensor(plen), hist, hist_len, 6)
        want = [propose_host(prompt[r, :plen].tolist() + hist[r, :int(hist_len[r])].tolist(), 6) for r in range(3)]
        assert got.tolist() == want, plen


@NEEDS_TRITON
def test_lookup_kernel_equals_the_reference_under_the_interpreter():
    """ops/triton_lookup.py: one program per row, blocks of end positions; equal to the reference on random rows
    (matches of every length, loops, no match, contexts of one token and of more than one block)."""
    assert interpreted_check("mamballama_cli.ops.triton_lookup", "lookup_draft_check", "lookup_draft_triton") == [0, 0]


@pytest.mark.gpu
def test_lookup_kernel_equals_the_reference_on_cuda_and_is_chosen():
    from mamballama_cli import ops
    from mamballama_cli.ops.triton_lookup import lookup_draft_check, lookup_draft_triton

    assert lookup_draft_check(lookup_draft_triton) == 0 and lookup_draft_check(lookup_draft_triton, seed=3) == 0
    assert ops.dispatch("lookup_draft", torch.device("cuda"))[0] == "mamballama-triton"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_captured_lookup_rounds_equal_the_uncaptured_ones_on_cuda(batch):
    target = _repeating_target().cuda()
    prompts = torch.randint(1, 8, (batch, 7), generator=torch.Generator().manual_seed(3)).cuda()
    n, k = 30, 4
    got = {}
    for capture in (False, True):
        rounds = LookupRounds(target, LookupDraft(), batch, 7 + n + 2 * (k + 1), k, capture=capture)
        got[capture], stats = rounds.generate(prompts, n, sync_every=2)
        assert stats["tokens_per_call"] > 1.2, capture
    assert got[True] == got[False] == [greedy_reference(target, prompts[r: r + 1], n)[0] for r in range(batch)]
    # the proposals on the device equal the plain-Python twin's, on a long random context
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 6, (4, 700), generator=g)
    lengths = torch.tensor([700, 513, 64, 3])
    want = [propose_host(r[:n].tolist(), 8) for r, n in zip(ctx, lengths)]
    assert lookup_propose(ctx.cuda(), lengths.cuda(), 8).tolist() == want
