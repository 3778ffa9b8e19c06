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
    _propose,
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
    matches = torch.full((4,), -1)
    got = lookup_propose(torch.tensor(ctx), torch.tensor([11, 11, 11, 11]), 5, match_out=matches)
    assert got.tolist() == [[8, 9, 6, 7, 1], [3, 4, 9, 9, 9], [5, 4, 5, 4, 5], [0, 0, 0, 0, 0]]
    assert matches.tolist() == [3, 1, 3, 0]  # the longest match's length, 0 for none
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
        matches = torch.full((b,), -1)
        got = lookup_propose(torch.tensor(rows), torch.tensor(lengths), k, max_ngram, min_ngram,
                             match_out=matches).tolist()
        want = [propose_host(r[:n], k, max_ngram, min_ngram) for r, n in zip(rows, lengths)]
        assert got == want, (trial, lengths, k)
        host = [_propose(r[:n], k, max_ngram, min_ngram, None, 2)[2] for r, n in zip(rows, lengths)]
        assert matches.tolist() == host, (trial, lengths)


def test_lookup_values_are_checked():
    assert parse_lookup(None) == LookupDraft() and parse_lookup("5").max_ngram == 5
    for bad in ("x", "0", "17"):
        with pytest.raises(UsageError, match="lookup:"):
            parse_lookup(bad)


def test_the_simulation_reports_each_rounds_match_and_gates_rounds_without_support():
    """simulate_lookup's ``matches`` (the context's match length a round started from) and ``gate`` (rounds whose
    match is shorter decode one token: count 0, ``steps`` True), worked by hand. The first new token (7) comes
    from the prefill; then [5, 6, 7] matches 3 tokens and proposes 8, 5, 6 (8 right); after 9 nothing matches
    until [1] (1 token) proposes 2, 3, 1 (2 and 3 right). Gated at 2, that round decodes 1 alone; then [1, 2]
    matches 2 tokens and proposes 3 (right) before the text ends."""
    prompt, tokens = [5, 6, 7, 8, 5, 6], [7, 8, 9, 1, 2, 3, 1, 2, 3, 4]
    matches = []
    assert simulate_lookup(prompt, tokens, 3, LookupDraft(), matches=matches) == [1, 0, 0, 0, 0, 2]
    assert matches == [3, 0, 0, 0, 0, 1]
    matches, steps = [], []
    counts = simulate_lookup(prompt, tokens, 3, LookupDraft(), matches=matches, gate=2, steps=steps)
    assert counts == [1, 0, 0, 0, 0, 0, 1] and matches == [3, 0, 0, 0, 0, 1, 2]
    assert steps == [False, True, True, True, True, True, False]
    assert sum(counts) + len(counts) == len(tokens) - 1  # every token after the prefill's, each once
    assert simulate_lookup(prompt, tokens, 3, LookupDraft(), gate=0) == [1, 0, 0, 0, 0, 2]  # 0: never gated


@pytest.mark.parametrize("gate", [1, 2, 3])
def test_gated_lookup_rounds_give_each_rows_greedy_tokens_and_speculate_where_the_simulation_does(gate):
    """``lookup:3:gate=M``: a round speculates only where some live row's context match is at least M tokens, and
    otherwise decodes one token. Every row's greedy tokens, in a batch (the rows share each round's kind); alone,
    a row's verify calls accept exactly what the simulation's gated rounds do, and its one-token rounds are the
    simulation's."""
    target = _repeating_target()
    prompts = torch.randint(1, 8, (3, 7), generator=torch.Generator().manual_seed(3))
    n, k = 40, 4
    further = [greedy_reference(target, prompts[r: r + 1], n + k + 1)[0] for r in range(3)]
    rounds = LookupRounds(target, LookupDraft(gate=gate), 3, 7 + n + 2 * (k + 1), k, capture=False)
    got, stats = rounds.generate(prompts, n, sync_every=2)
    assert got == [f[:n] for f in further]
    assert stats["rounds"] >= stats["step_rounds"] and (stats["step_row_rounds"] > 0 or gate == 1)
    plain, _ = LookupRounds(target, LookupDraft(), 3, 7 + n + 2 * (k + 1), k, capture=False).generate(prompts, n)
    assert plain == got
    for r in range(3):
        one = LookupRounds(target, LookupDraft(gate=gate), 1, 7 + n + 2 * (k + 1), k, capture=False)
        row, st = one.generate(prompts[r: r + 1], n)
        steps = []
        counts = simulate_lookup(prompts[r].tolist(), further[r], k, LookupDraft(), n, gate=gate, steps=steps)
        calls = [c for c, s in zip(counts, steps) if not s]
        assert row == [further[r][:n]] and st["step_row_rounds"] == sum(steps), (r, st)
        assert st["accepted"] == sum(calls) and st["row_rounds"] == len(calls), (r, st)
        assert st["accepted_hist"] == [calls.count(i) for i in range(k + 1)]


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


@pytest.mark.parametrize("gate,prompt", [(0, [3, 9, 3, 9, 3]), (3, [1, 2, 3, 4, 5])])
def test_sampled_lookup_rounds_follow_the_target_distribution(gate, prompt):
    """Rejection sampling with a one-hot q is lossless: the second new token's empirical distribution matches the
    target's exactly computed marginal. A prompt the lookup proposes from, right or wrong; and, gated at 3-token
    matches, one it has nothing for, so the rounds are mostly one-token rounds, which pick as plain sampling does."""
    target = tiny_hybrid(seed=2, vocab=24)[0]
    prompt = torch.tensor([prompt])
    cfg = SamplingConfig(temperature=1.0)
    B = 1500
    rounds = LookupRounds(target, LookupDraft(gate=gate), B, 5 + 3 + 2 * 3, 2, sampling=cfg, capture=False)
    torch.manual_seed(0)
    got, stats = rounds.generate(prompt.expand(B, -1), 3)
    assert stats["accepted"] > 0 if not gate else stats["step_row_rounds"] > B
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
    gated = run_cli(["generate", target, "--prompt", prompt, "-n", "24", "--speculative", "--draft",
                     "lookup:2:gate=1", "-k", "3", "--stats-json", stats_file], capsys)
    assert gated.code == 0, gated.err
    gstats = json.loads(stats_file.read_text())
    assert gated.out == plain.out and gstats["draft"] == "lookup:2:gate=1" and gstats["step_row_rounds"] >= 0
    assert f"{gstats['rounds'] - gstats['step_rounds']} verify, {gstats['step_rounds']} one-token" in gated.err
    for spec, word in (("lookup:2:gate=3", "gate=3"), ("lookup:gate=x", "gate=x")):
        bad = run_cli(["generate", target, "--prompt", prompt, "--speculative", "--draft", spec], capsys)
        assert bad.code != 0 and word in bad.err and len(bad.err.strip().splitlines()) == 1, bad.err


@pytest.mark.parametrize("spec", ["lookup", "lookup:3:gate=1"])
def test_spec_eval_measures_the_lookup_draft(pair, tmp_path, spec):  # noqa: F811
    """benchmarks/spec_eval.py with --draft lookup: plain and captured round (no host loop), the simulated counts
    from the plain tokens, and a round's parts with the lookup's own time in place of a draft step. Gated, the
    one-token rounds are counted apart, as many as the simulation's (gated at 1-token matches: this tiny model's
    text has few longer ones)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = write_heldout_text(tmp_path / "data")
    out = tmp_path / "spec.json"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "spec_eval.py"), str(pair / "target"), "--draft",
                        spec, "-k", "3", "--data", str(data), "--prompts", "3", "--max-new-tokens", "10",
                        "--text-window", "24", "--device", "cpu", "--dtype", "float32", "--parts-iters", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["draft"] == spec and set(res["engines"]) == {"plain", "round"} and "host loop is skipped" in p.stderr
    rnd = res["engines"]["round"]
    assert rnd["matches_plain"] == 3  # float32 on CPU: the same tokens as plain decoding
    # the measured rounds accepted what the plain-Python proposals allow over the plain tokens, bar each prompt's
    # last round, which sees past them (so at least that)
    sim = rnd["simulated"]
    assert sum(sim["accepted_hist"]) == rnd["calls"] and rnd["accepted"] >= sum(
        i * c for i, c in enumerate(sim["accepted_hist"]))
    steps = rnd.get("step_calls", 0)
    assert steps == sim.get("step_calls", 0) and (steps > 0) == (spec != "lookup")
    assert rnd["calls"] > 0 and rnd["tokens_per_call"] >= 1.0
    assert ("step_round_ms_replayed" in res["parts"]) == (spec != "lookup")  # the one-token round timed apart
    assert res["parts"]["lookup_ms"] > 0 and res["parts"]["draft_step_ms"] == pytest.approx(
        res["parts"]["lookup_ms"] / 3, abs=1e-4)  # both stored to 4 decimals


def test_lookup_sim_models_gated_rounds_from_the_models_own_tokens(pair, tmp_path):  # noqa: F811
    """benchmarks/lookup_sim.py decodes the held-out continuations once (kept in --tokens), then models the lookup
    draft from them: rows by K and gate, each with its rounds split by the context match they started from. The
    ungated row's speedup is tokens per call over the round's cost; a gated row counts its one-token rounds at
    the step's cost, and decodes the same tokens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = write_heldout_text(tmp_path / "data")
    out, toks = tmp_path / "sim.json", tmp_path / "greedy.jsonl"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "lookup_sim.py"), str(pair / "target"), "--data", str(data),
           "--prompts", "3", "--max-new-tokens", "24", "--text-window", "24", "--ks", "3", "--ngrams", "3",
           "--tokens", str(toks), "--gate", "0,2", "--round-cost", "1.5", "--step-cost", "1.1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["gate"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {0, 2} and len(toks.read_text().splitlines()) == 3
    plain, gated = rows[0], rows[2]
    assert plain["step_rounds"] == 0 and plain["modelled_speedup"] == pytest.approx(plain["all"] / 1.5, abs=2e-3)
    by = plain["by_match"]  # every round started from a match of 0..3 tokens; all the rounds, each once
    assert set(map(int, by)) <= {0, 1, 2, 3} and sum(n for n, _ in by.values()) > 0
    assert 0 < gated["step_rounds"] < 1  # some rounds had no 2-token match
    tokens = [sum(n * tpc for n, tpc in r["by_match"].values()) for r in (plain, gated)]
    assert tokens[0] == pytest.approx(tokens[1], abs=1.0)  # the same tokens, decoded in other rounds
    rounds, sr = sum(n for n, _ in gated["by_match"].values()), gated["step_rounds"]
    assert rounds >= sum(n for n, _ in by.values())  # a gated round decodes one token: as many rounds or more
    assert gated["modelled_speedup"] == pytest.approx(tokens[1] / (rounds * (sr * 1.1 + (1 - sr) * 1.5)), rel=1e-2)
    bad = subprocess.run(cmd[:-2] + ["--gate", "2,x"], capture_output=True, text=True, timeout=600, check=False,
                         env=env)
    assert bad.returncode != 0 and "--gate '2,x'" in bad.stderr


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


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_captured_gated_lookup_rounds_equal_the_uncaptured_ones_on_cuda(batch):
    """``lookup:3:gate=2`` on CUDA: the verify round and the one-token round, each its own captured graph, the host
    picking one every round; the same tokens and the same counts as the rounds run eagerly, and each row's greedy
    tokens."""
    target = _repeating_target().cuda()
    prompts = torch.randint(1, 8, (batch, 7), generator=torch.Generator().manual_seed(3)).cuda()
    n, k = 30, 4
    got, stats = {}, {}
    for capture in (False, True):
        rounds = LookupRounds(target, LookupDraft(gate=2), batch, 7 + n + 2 * (k + 1), k, capture=capture)
        got[capture], stats[capture] = rounds.generate(prompts, n, sync_every=2)
        assert (rounds.step_graph is not None) == capture
    assert got[True] == got[False] == [greedy_reference(target, prompts[r: r + 1], n)[0] for r in range(batch)]
    for key in ("accepted", "row_rounds", "accepted_hist", "step_row_rounds"):
        assert stats[True][key] == stats[False][key], key
    assert stats[True]["step_row_rounds"] > 0
