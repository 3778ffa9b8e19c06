"""The lookup draft's n-gram table (generation/ngram_table.py, `mamballama data ngrams`, `--draft lookup:N:TABLE`)."""

import collections
import json
import random

import numpy as np
import pytest
import torch
from clihelp import one_line_error, run_cli
from test_lookup_draft import _repeating_target
from test_speculative import greedy_reference
from test_speculative_cli import pair  # noqa: F401  (module fixture: a converted target and a cut draft)

from mamballama_cli.errors import UsageError
from mamballama_cli.generation import lookup as lk
from mamballama_cli.generation.ngram_table import NgramTable
from mamballama_cli.ops.lookup import lookup_draft_ref, lookup_propose

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force(seqs, min_count):
    """{context: successor} for pairs and single tokens: the most frequent, ties to the smallest token."""
    pairs, single = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for s in seqs:
        for i in range(1, len(s)):
            single[s[i - 1]][s[i]] += 1
            if i >= 2:
                pairs[(s[i - 2], s[i - 1])][s[i]] += 1
    def best(c):
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))

    return ({k: best(c)[0] for k, c in pairs.items() if best(c)[1] >= min_count},
            {k: best(c)[0] for k, c in single.items() if best(c)[1] >= min_count})


@pytest.mark.parametrize("vocab,min_count", [(9, 2), (300, 1)])
def test_the_table_keeps_the_most_frequent_successor_of_every_pair_and_token(vocab, min_count):
    rng = random.Random(vocab)
    seqs = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 400))] for _ in range(60)]
    table = NgramTable.build([np.array(s) for s in seqs], vocab, min_count)
    pairs, single = _brute_force(seqs, min_count)
    assert table.n_pairs == len(pairs) and int((table.single >= 0).sum()) == len(single)
    for (a, b), nxt in pairs.items():  # every pair is found within the probe window (300**2 keys: a large table)
        assert table.next_host(a, b) == nxt
    for a in range(vocab):
        for b in range(vocab):
            if (a, b) not in pairs:  # no pair: the single token's successor, or none
                assert table.next_host(a, b) == single.get(b, -1)
    assert table.next_host(None, seqs[0][0]) == single.get(seqs[0][0], -1)
    # pairs never span two sequences: "1 2" ends one and "3" starts the next
    t2 = NgramTable.build([np.array([0, 1, 2]), np.array([3, 4]), np.array([0, 1, 2])], 5, 1)
    assert t2.next_host(1, 2) == -1 and t2.next_host(0, 1) == 2 and t2.single[2] == -1


def test_the_table_round_trips_through_safetensors_and_bad_files_are_refused(tmp_path):
    table = NgramTable.build([np.array([1, 2, 3, 1, 2, 3, 1, 2, 4])], 6, 1, {"vocab_size": 6})
    path = tmp_path / "t.safetensors"
    table.save(path)
    back = NgramTable.load(path)
    assert back.vocab == 6 and back.tokenizer == {"vocab_size": 6} and back.min_count == 1
    for name in ("keys", "nexts", "counts", "single"):
        assert np.array_equal(getattr(back, name), getattr(table, name))
    assert back.next_host(1, 2) == 3 and back.next_host(3, 1) == 2
    with pytest.raises(UsageError, match="no such n-gram table"):
        NgramTable.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a table")
    with pytest.raises(UsageError, match="not an n-gram table"):
        NgramTable.load(tmp_path / "junk.safetensors")
    with pytest.raises(UsageError, match="vocabulary"):
        NgramTable.build([np.array([0, 7])], 6)


def test_the_table_proposes_where_the_context_has_nothing_to_copy():
    #            pairs: (1, 2) -> 3, (2, 3) -> 4, (3, 4) -> nothing; single: 4 -> nothing
    table = NgramTable.build([np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4])], 10, 2)
    arrays = table.arrays("cpu", below=2)
    ctx = [[9, 8, 7, 1, 2, 0, 0],  # "1 2" occurs nowhere earlier: the table proposes 3 4, then has nothing
           [1, 2, 5, 6, 1, 2, 0],  # "1 2" occurred at 0..1: the context's 5 6 1 2, not the table's
           [7, 7, 7, 7, 7, 2, 0]]  # no earlier "2": no match; the pair (7, 2) is unknown, the single 2 -> 3,
    length = torch.tensor([5, 6, 6])  # then (2, 3) -> 4, then nothing
    got = lookup_propose(torch.tensor(ctx), length, 4, table=arrays)
    plain = lookup_propose(torch.tensor(ctx), length, 4)
    assert got[0].tolist() == [3, 4] + plain[0, 2:].tolist() and plain[0].tolist() == [2, 2, 2, 2]
    assert got[1].tolist() == plain[1].tolist() == [5, 6, 1, 2]
    assert got[2].tolist() == [3, 4] + plain[2, 2:].tolist()
    for r in range(3):
        assert lk.propose_host(ctx[r][: int(length[r])], 4, table=table) == got[r].tolist()
    # below=4: the table proposes over row 1's 2-gram match too; below=0: never
    assert lookup_propose(torch.tensor(ctx), length, 4, table=table.arrays("cpu", below=4))[1].tolist() == [3, 4, 1, 2]
    assert torch.equal(lookup_propose(torch.tensor(ctx), length, 4, table=table.arrays("cpu", below=0)), plain)


def test_device_proposals_with_a_table_equal_the_host_twin():
    rng = random.Random(4)
    vocab = 40  # contexts with few repeats: the table proposes in most rows; some chains stop early
    corpus = [np.array([rng.randrange(vocab // 2) for _ in range(rng.randrange(2, 300))]) for _ in range(40)]
    changed = 0
    # the last table's vocabulary is smaller than the contexts' tokens (a target with a larger vocabulary)
    for below, table in [(b, NgramTable.build(corpus, vocab, 2)) for b in (1, 2, 4)] + [
            (2, NgramTable.build(corpus, 30, 2))]:
        arrays = table.arrays("cpu", below=below)
        for trial in range(30):
            L, plen = 32, rng.randrange(1, 12)
            prompt = torch.tensor([[rng.randrange(vocab) for _ in range(L)] for _ in range(3)])
            hist = torch.tensor([[rng.randrange(vocab) for _ in range(L)] for _ in range(3)])
            hist_len = torch.tensor([rng.randrange(0, L - plen + 1) for _ in range(3)])
            k = rng.randrange(1, 8)
            got = lookup_draft_ref(prompt, torch.tensor(plen), hist, hist_len, k, 3, 1, arrays)
            changed += int((got != lookup_draft_ref(prompt, torch.tensor(plen), hist, hist_len, k)).any(1).sum())
            for r in range(3):
                ctx = prompt[r, :plen].tolist() + hist[r, : int(hist_len[r])].tolist()
                assert lk.propose_host(ctx, k, 3, 1, table, below) == got[r].tolist(), (below, trial, r)
    assert changed > 100


def test_lookup_rounds_with_a_table_give_greedy_tokens_and_accept_what_the_host_predicts(tmp_path):
    target = _repeating_target()
    gen = torch.Generator().manual_seed(8)
    # the table: the target's own greedy text after other prompts (what `data ngrams` reads from `data generate`)
    corpus = [np.array(greedy_reference(target, torch.randint(1, 8, (1, 5), generator=gen), 30)[0])
              for _ in range(6)]
    NgramTable.build(corpus, 8, 1).save(tmp_path / "t.safetensors")
    draft = lk.LookupDraft(max_ngram=3, table=str(tmp_path / "t.safetensors"))
    assert str(draft) == f"lookup:3:{tmp_path / 't.safetensors'}" and draft == lk.parse_lookup(f"3:{draft.table}")
    prompts = torch.randint(1, 8, (3, 4), generator=gen)
    k, n = 3, 30
    further = [greedy_reference(target, prompts[r: r + 1], n + k + 1)[0] for r in range(3)]
    rounds = lk.LookupRounds(target, draft, 3, 4 + n + 2 * (k + 1), k, capture=False)
    got, stats = rounds.generate(prompts, n, sync_every=2)
    assert got == [f[:n] for f in further]
    used = []
    with_table = [lk.simulate_lookup(prompts[r].tolist(), further[r], k, draft, n, from_table=used) for r in range(3)]
    assert len(used) == sum(map(len, with_table)) and 0 < sum(used) < len(used)  # the table wrote some rounds
    without = [lk.simulate_lookup(prompts[r].tolist(), further[r], k, lk.LookupDraft(), n) for r in range(3)]
    assert stats["accepted"] == sum(map(sum, with_table)) and stats["row_rounds"] == sum(map(len, with_table))
    assert with_table != without  # the table changed what the rounds proposed
    # the study of a gate that tables pass (simulate_lookup's table_passes): rounds whose first proposal the table
    # wrote speculate, where the plain gate made them one-token rounds; every token still comes once
    for passes in (False, True):
        used, matches, steps = [], [], []
        counts = lk.simulate_lookup(prompts[0].tolist(), further[0], k, draft, n, from_table=used, matches=matches,
                                    gate=3, steps=steps, table_passes=passes)
        assert sum(counts) + len(counts) == n - 1
        assert steps == [m < 3 and not (passes and u) for m, u in zip(matches, used)]
        assert all(c == 0 for c, st in zip(counts, steps) if st) and (passes or not any(
            c for c, u, m in zip(counts, used, matches) if u and m < 3))
    assert any(u and m < 3 for u, m in zip(used, matches))  # some table round was let through


def test_data_ngrams_and_generate_with_a_table_through_the_cli(pair, tmp_path, capsys):  # noqa: F811
    target = pair / "target"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("one two one two", "three four three",
                                                                           "five six five six five")))
    gen = run_cli(["data", "generate", target, "--prompts", prompts, "--output", tmp_path / "gen", "--tokens", "150",
                   "-t", "0", "-n", "20", "--batch-size", "3", "--continuation-fraction", "0", "--device", "cpu"],
                  capsys)
    assert gen.code == 0, gen.err
    table = tmp_path / "t.safetensors"
    r = run_cli(["data", "ngrams", tmp_path / "gen", "--output", table, "--min-count", "1"], capsys)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["pairs"] > 0 and summary["tokens"] > 0 and table.is_file()
    assert "count and hash pairs" in r.err  # the progress bar, on stderr
    assert summary["vocab"] == json.loads((tmp_path / "gen" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    again = run_cli(["data", "ngrams", tmp_path / "gen", "--output", table], capsys)  # no --force: refused
    one_line_error(again, "--force")
    bad = run_cli(["data", "ngrams", tmp_path / "gen", "--output", tmp_path / "t.bin"], capsys)
    one_line_error(bad, ".safetensors")
    nowhere = run_cli(["data", "ngrams", tmp_path / "none", "--output", tmp_path / "u.safetensors"], capsys)
    one_line_error(nowhere, "none holds no manifest.json", "mamballama data generate")

    text = "one two one two three"
    plain = run_cli(["generate", target, "--prompt", text, "-n", "16"], capsys)
    stats_file = tmp_path / "s.json"
    spec = run_cli(["generate", target, "--prompt", text, "-n", "16", "--speculative", "--draft",
                    f"lookup:2:{table}", "-k", "3", "--stats-json", stats_file], capsys)
    assert spec.code == 0, spec.err
    assert spec.out == plain.out  # lossless at temperature 0
    assert json.loads(stats_file.read_text())["draft"] == f"lookup:2:{table}"
    other = tmp_path / "other.safetensors"  # a table of another tokenizer's text (its identity recorded)
    NgramTable.build([np.array([1, 2, 3])], 8, 1, {"vocab_size": 8, "vocab_sha256": "0" * 16}).save(other)
    one_line_error(run_cli(["generate", target, "--prompt", text, "--speculative", "--draft", f"lookup:{other}"],
                           capsys), "another tokenizer")
    missing = run_cli(["generate", target, "--prompt", text, "--speculative", "--draft",
                       f"lookup:{tmp_path / 'none.safetensors'}"], capsys)
    one_line_error(missing, "data ngrams")


@pytest.mark.gpu
def test_captured_lookup_rounds_with_a_table_equal_the_uncaptured_ones_on_cuda(tmp_path):
    """The kernel's table chain (its probe, ops/triton_lookup.py ``lookup_draft_check``, covers tables too) inside a
    captured round, batch 3: the same tokens as uncaptured rounds and as plain greedy decoding."""
    target = _repeating_target().cuda()
    gen = torch.Generator().manual_seed(8)
    corpus = [np.array(greedy_reference(target, torch.randint(1, 8, (1, 5), generator=gen).cuda(), 30)[0])
              for _ in range(6)]
    NgramTable.build(corpus, 8, 1).save(tmp_path / "t.safetensors")
    draft = lk.LookupDraft(max_ngram=3, table=str(tmp_path / "t.safetensors"))
    prompts = torch.randint(1, 8, (3, 4), generator=gen).cuda()
    n, k = 30, 3
    got = {}
    for capture in (False, True):
        rounds = lk.LookupRounds(target, draft, 3, 4 + n + 2 * (k + 1), k, capture=capture)
        got[capture], _ = rounds.generate(prompts, n, sync_every=2)
    assert got[True] == got[False] == [greedy_reference(target, prompts[r: r + 1], n)[0] for r in range(3)]


def test_spec_eval_splits_the_rounds_the_table_proposed(pair, tmp_path):  # noqa: F811
    """benchmarks/spec_eval.py with --draft lookup:N:TABLE: the simulated rounds say which share of first proposals
    the table wrote, and tokens per call there and elsewhere, consistent with the whole."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import write_heldout_text

    table = tmp_path / "t.safetensors"
    NgramTable.build([np.arange(1, 60) % 23 + 1], 64, 1).save(table)  # within the tiny target's vocabulary
    data = write_heldout_text(tmp_path / "data")
    out = tmp_path / "spec.json"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "spec_eval.py"), str(pair / "target"), "--draft",
                        f"lookup:2:{table}", "-k", "3", "--data", str(data), "--prompts", "2", "--max-new-tokens",
                        "10", "--text-window", "24", "--device", "cpu", "--dtype", "float32", "--parts-iters", "1",
                        "--engines", "plain,round", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    sim = json.loads(out.read_text())["engines"]["round"]["simulated"]
    share, t, c = sim["table_rounds"], sim["table_tokens_per_call"], sim["context_tokens_per_call"]
    assert 0 < share < 1  # the table wrote some first proposals (its tokens: single successors of 1..23)
    whole = share * t + (1 - share) * c
    assert whole == pytest.approx(sim["tokens_per_call"], abs=0.01)
