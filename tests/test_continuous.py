"""Continuous batching (generation/continuous.py): requests join and leave a running batch between steps, each
slot at its own position, and every request gets the greedy tokens it gets alone (issue 17)."""

import pytest
import torch

from helpers import StandInGraph, decode_with_cache, tiny_hybrid
from mamballama_cli.generation.continuous import SlotDecoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _solo(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of ``prompt`` alone through the model's own cached forward."""
    _, tokens, _ = decode_with_cache(model, torch.tensor([prompt]), n)
    return tokens[0, len(prompt):].tolist()


def _run(dec, reqs, arrive, wants, slots_used=None) -> dict[int, list[int]]:
    """Drive ``dec`` through a schedule: request i = (prompt, sampling, seed) joins before step arrive[i] when a
    slot is free and leaves once it has wants[i] tokens; ``slots_used`` collects the slot of each join."""
    got, slot_of, waiting = {}, {}, list(range(len(reqs)))
    for step in range(200):
        for i in list(waiting):
            if arrive[i] <= step and dec.free:
                prompt, cfg, seed = reqs[i]
                slot_of[i], first = dec.join(prompt, cfg, seed)
                got[i] = [first]
                waiting.remove(i)
                if slots_used is not None:
                    slots_used.append(slot_of[i])
        for i, slot in list(slot_of.items()):
            if len(got[i]) >= wants[i]:
                dec.leave(slot)
                del slot_of[i]
        if not slot_of and not waiting:
            break
        if slot_of:
            tokens = dec.step()
            for i, slot in slot_of.items():
                got[i].append(tokens[slot])
    assert not waiting and not slot_of
    return {i: v[: wants[i]] for i, v in got.items()}


@pytest.mark.parametrize("attn_layers", [(1, 3), (1,)])
def test_requests_joining_and_leaving_a_running_batch_get_their_solo_answers(attn_layers):
    model, _ = tiny_hybrid(attn_layers=attn_layers, seed=3)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (5, 11, 3, 8, 6)]
    wants = [9, 4, 12, 6, 7]  # tokens per request
    # schedule: request i arrives before step arrive[i]; three slots, so request 3 waits for a slot to free
    arrive = [0, 0, 2, 3, 5]
    dec = SlotDecoder(model, slots=3, capacity=40, capture=False, prefill_chunk=4)
    slots_used: list[int] = []
    with torch.no_grad():
        got = _run(dec, [(p, None, 0) for p in prompts], arrive, wants, slots_used)
    for i, p in enumerate(prompts):
        assert got[i] == _solo(model, p, wants[i]), i
    assert len(set(slots_used)) == 3 and len(slots_used) == 5  # slots were reused by later requests


def test_slot_errors_name_the_problem():
    model, _ = tiny_hybrid(attn_layers=(1,), seed=1)
    dec = SlotDecoder(model, slots=1, capacity=8, capture=False)
    with pytest.raises(ValueError, match="prompt of 8 tokens"):
        dec.join(list(range(3, 11)))
    slot, _ = dec.join([5, 6, 7])
    with pytest.raises(RuntimeError, match="no free slot"):
        dec.join([5])
    for _ in range(5):
        dec.step()
    with pytest.raises(RuntimeError, match="slot 0 is full"):
        dec.step()
    dec.leave(slot)
    with pytest.raises(ValueError, match="slot 0 is not in use"):
        dec.leave(slot)
    dec.join([4, 4])  # the freed slot takes the next request


def test_requests_with_their_own_sampling_share_a_batch_and_a_seed_draws_the_same_tokens_alone():
    """Per-slot sampling: greedy and sampled requests with different temperatures, top-p and top-k decode in one
    running batch; each seeded request gets the tokens it gets alone from the same seed, and another seed others."""
    from mamballama_cli.generation.sampling import SamplingConfig

    model, _ = tiny_hybrid(attn_layers=(1, 3), seed=5)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    p = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (6, 9, 4, 7, 5)]
    reqs = [(p[0], SamplingConfig(temperature=0.0), 0),
            (p[1], SamplingConfig(temperature=0.9), 5),
            (p[2], SamplingConfig(temperature=1.3, top_p=0.9), 9),
            (p[3], SamplingConfig(temperature=1.0, top_k=4), 5),
            (p[4], SamplingConfig(temperature=1.5), 2**40 + 3)]
    wants = [10, 14, 8, 12, 9]
    with torch.no_grad():
        together = _run(SlotDecoder(model, slots=3, capacity=40, capture=False), reqs, [0, 0, 1, 3, 4], wants)
        for i, req in enumerate(reqs):
            alone = _run(SlotDecoder(model, slots=1, capacity=40, capture=False), [req], [0], [wants[i]])
            assert together[i] == alone[0], i
        assert together[0] == _solo(model, p[0], wants[0])
        reseeded = _run(SlotDecoder(model, slots=1, capacity=40, capture=False),
                        [(p[1], reqs[1][1], 6)], [0], [wants[1]])
    assert reseeded[0] != together[1]
    assert len(set(together[4])) > 3  # temperature 1.5 on a tiny random model: the draws differ step to step


def _answer(dec, prompt, n, cfg=None, seed=0):
    """One request alone through ``dec``: its n tokens, and how many prompt tokens came from the prefix cache."""
    slot, first = dec.join(prompt, cfg, seed)
    out, cached = [first], dec.cached[slot]
    while len(out) < n:
        out.append(dec.step()[slot])
    dec.leave(slot)
    return out, cached


@pytest.mark.parametrize("pieces", ["forward", "walk"])
def test_prefix_cache_serves_a_prompt_that_extends_or_repeats_an_earlier_request_with_the_same_tokens(pieces):
    """The next turn of a conversation (the earlier prompt, its answer, more) resumes from the state the earlier
    request left; a repeated prompt needs no forward. Every answer equals the one read without the cache, with
    the staging runtime reading prompts through the model's forward or through the layer walk's pieces (what the
    CUDA graphs of ``pieces="graph"`` record: tests/test_runtime_gpu.py)."""
    from mamballama_cli.generation.sampling import SamplingConfig

    model, _ = tiny_hybrid(attn_layers=(1, 3), seed=8)
    model.eval()
    gen = torch.Generator().manual_seed(2)
    p = torch.randint(3, 96, (9,), generator=gen).tolist()
    hot = SlotDecoder(model, slots=2, capacity=80, capture=False, prefill_chunk=4, prefix_cache_bytes=1 << 30,
                      pieces=pieces)
    assert hot.stage.pieces == pieces
    cold = SlotDecoder(model, slots=2, capacity=80, capture=False, prefill_chunk=4)
    with torch.no_grad():
        a, cached = _answer(hot, p, 8)
        assert cached == 0 and a == _answer(cold, p, 8)[0]
        turn2 = p + a + [5, 9, 11]  # the conversation goes on: prompt, answer (all 8 tokens), a new message
        b, cached = _answer(hot, turn2, 10)
        assert cached == len(p) + 7  # every token request A fed: its prompt and its answer but the last
        assert b == _answer(cold, turn2, 10)[0]
        again, cached = _answer(hot, p, 8)  # the same prompt: its kept state and logits, no forward
        assert cached == len(p) and again == a
        fed = p + a[:7]  # exactly what A fed: the state and the logits of A's last step
        c, cached = _answer(hot, fed, 5)
        assert cached == len(fed) and c == _answer(cold, fed, 5)[0] and c[0] == a[7]
        cfg = SamplingConfig(temperature=1.1)  # sampled with a seed: the same draws from a restored state
        s1, cached = _answer(hot, turn2 + [7], 9, cfg, seed=4)
        assert cached == len(turn2) and s1 == _answer(cold, turn2 + [7], 9, cfg, seed=4)[0]  # B's prompt's entry
    assert hot.prefix.hits == 4 and len(hot.prefix) >= 5


def test_prefix_cache_keeps_to_its_budget_dropping_the_least_recently_used():
    from mamballama_cli.generation.prefix_cache import PrefixCache

    model, _ = tiny_hybrid(attn_layers=(1,), seed=1)
    model.eval()
    dec = SlotDecoder(model, slots=1, capacity=64, capture=False, prefix_cache_bytes=1 << 30)
    with torch.no_grad():
        _answer(dec, list(range(3, 23)), 2)
    one = next(iter(dec.prefix.entries.values())).nbytes  # a 20-token prompt's entry
    small = PrefixCache(model, budget_bytes=int(2.5 * one))
    for start in (3, 4, 5):  # three 20-token prompts; room for two
        small.put(list(range(start, start + 20)), dec.runtime.cache, 0, torch.zeros(1, 8))
    assert len(small) == 2 and small.bytes <= small.budget
    assert small.lookup(list(range(3, 30))) is None  # the first was dropped
    assert small.lookup(list(range(4, 30)))[0] == tuple(range(4, 24))
    small.put(list(range(6, 26)), dec.runtime.cache, 0, torch.zeros(1, 8))  # drops 5.., not 4.. (just used)
    assert small.lookup(list(range(5, 30))) is None and small.lookup(list(range(4, 24))) is not None
    assert not PrefixCache(model, budget_bytes=one // 2).put(list(range(3, 23)), dec.runtime.cache, 0,
                                                             torch.zeros(1, 8))  # too big on its own


def _shared_beginnings(seed: int):
    """Three prompts that begin with the same 40 tokens (a system prompt) and go on differently, and a fourth that
    shares only its first 35."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 96, (40,), generator=gen).tolist()
    tails = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (7, 5, 9)]
    return [head + t for t in tails] + [head[:35] + [4, 4, 4, 4, 4, 4, 4]]


@pytest.mark.parametrize("pieces", ["forward", "walk"])
def test_a_hybrid_keeps_the_state_where_requests_share_a_beginning_and_later_ones_resume_there(pieces):
    """Two requests with the same 40-token beginning: the second reads its prompt in two pieces and keeps the state
    after the shared whole blocks (32 tokens), so a third and a fourth that begin the same way read only from there.
    Every answer equals the one read without the cache."""
    from mamballama_cli.generation.prefix_cache import BLOCK

    model, _ = tiny_hybrid(attn_layers=(1, 3), seed=5)
    model.eval()
    a, b, c, d = _shared_beginnings(1)
    hot = SlotDecoder(model, slots=1, capacity=80, capture=False, prefill_chunk=8, prefix_cache_bytes=1 << 30,
                      pieces=pieces)
    cold = SlotDecoder(model, slots=1, capacity=80, capture=False, prefill_chunk=8)
    with torch.no_grad():
        got = [_answer(hot, p, 6) for p in (a, b, c, d)]
        for p, (answer, _) in zip((a, b, c, d), got):
            assert answer == _answer(cold, p, 6)[0]
    shared = 40 // BLOCK * BLOCK
    assert [cached for _, cached in got] == [0, 0, shared, shared]  # a hybrid's state exists only where kept
    assert tuple(b[:shared]) in hot.prefix.entries  # the state at the branch point, kept by the second request
    # the cache forgets the block hashes of what it drops
    for key in list(hot.prefix.entries):
        hot.prefix._drop(key)
    assert not hot.prefix.blocks and not hot.prefix.lengths and hot.prefix.bytes == 0


def test_a_transformer_resumes_from_the_blocks_its_prompt_shares_with_any_kept_prompt():
    """Every layer attention (a Llama through ``as_hybrid``, as `serve` runs a Transformer): the K/V of a shared
    beginning are a slice of a longer prompt's, so the second request already resumes from the shared whole
    blocks, and its answer is the model's own."""
    from helpers import tiny_llama

    from mamballama_cli.generation.prefix_cache import BLOCK
    from mamballama_cli.generation.runners import as_hybrid

    model = as_hybrid(tiny_llama(seed=6)).eval()
    a, b, c, _ = _shared_beginnings(2)
    hot = SlotDecoder(model, slots=1, capacity=80, capture=False, prefill_chunk=8, prefix_cache_bytes=1 << 30)
    with torch.no_grad():
        got = [_answer(hot, p, 6) for p in (a, b, c)]
        for p, (answer, _) in zip((a, b, c), got):
            assert answer == _solo(model, p, 6)
    assert [cached for _, cached in got] == [0, 40 // BLOCK * BLOCK, 40 // BLOCK * BLOCK]
    assert hot.prefix.hits == 2


def test_shared_beginnings_are_found_in_whole_blocks_and_checked_token_by_token():
    from mamballama_cli.generation.prefix_cache import BLOCK, PrefixCache, block_hashes

    model, _ = tiny_hybrid(attn_layers=(1,), seed=1)
    model.eval()
    dec = SlotDecoder(model, slots=1, capacity=80, capture=False)
    cache = PrefixCache(model, budget_bytes=1 << 30)
    kept = list(range(3, 3 + 3 * BLOCK + 5))  # three whole blocks and five tokens
    cache.put(kept, dec.runtime.cache, 0, torch.zeros(1, 8))
    assert len(block_hashes(kept)) == 3 and block_hashes(kept, 2 * BLOCK + 1) == block_hashes(kept)[:2]
    other = kept[: 2 * BLOCK + 3] + [99] * 20  # differs inside the third block
    assert cache.shared(other, len(other) - 1) == (2 * BLOCK, tuple(kept))
    assert cache.shared(other, BLOCK + 4) == (BLOCK, tuple(kept))  # no further than the limit
    assert cache.shared([99] + kept, 60) == (0, None)  # the first block differs
    # a hash that matched by collision is caught by comparing the tokens
    fake = [7] * (2 * BLOCK)
    for h in block_hashes(fake):
        cache.blocks[h] = {tuple(kept): None}
    assert cache.shared(fake, 40) == (0, None)


def test_the_prefix_cache_benchmark_reports_each_case_with_its_cached_tokens(tmp_path):
    """benchmarks/prefix_cache.py on the tiny shape: a next turn and a repeat resume from the kept state, and of
    three requests sharing a beginning the third resumes from its whole blocks; --profile writes the tables."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, prof = tmp_path / "pc.json", tmp_path / "profile.txt"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "prefix_cache.py"), "--shape", "tiny", "--context",
                        "40", "--turn", "8", "--reps", "1", "--dtype", "float32", "--pieces", "walk", "--json",
                        str(out), "--profile", str(prof)], capture_output=True, text=True, timeout=300, check=False,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root)))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    rows = got["rows"]
    assert got["pieces"] == "walk" and got["next_turn_kept_forward_s_median"] > 0  # the A/B's other side
    agree = got["next_turn_pieces_vs_forward"]  # the walk's next turn gives the forward's logits (float32)
    assert agree["rel_err"] < 1e-4 and agree["same_argmax"], agree
    assert all(row["next_turn_cached_tokens"] == row["repeat_cached_tokens"] == 40 for row in rows)
    assert all((row["branch_second_cached_tokens"], row["branch_third_cached_tokens"]) == (0, 32) for row in rows)
    phases = json.loads(out.read_text())["next_turn_phases_s"]  # the synchronised breakdown of one next turn
    assert {"lookup", "restore", "prefill", "slot_copy_in", "put_alloc", "put", "join_s"} <= set(phases), phases
    assert sum(v for k, v in phases.items() if k != "join_s") <= phases["join_s"]
    text = prof.read_text()
    assert all(f"prefix_cache.{name}" in text for name in ("lookup", "restore", "alloc", "copy")), text[:3000]
    assert "runtime.read_on.walk" in text  # the profiled next turn read its 8 new tokens through the walk
    assert "a shared beginning" in r.stdout


def test_a_prompt_read_a_few_tokens_at_a_time_between_steps_joins_as_if_read_whole():
    """`serve --prefill-per-step`: a prompt read into a slot in budgets of 5 tokens while another slot decodes
    (begin, advance between steps, finish) answers as the same prompt joined whole, its slot left alone by the steps
    meanwhile; with the prefix cache, a next turn and a request sharing a beginning with a kept one (its piece stops
    at the end of the shared blocks, which is kept) resume as when read whole. Misuse is refused."""
    from mamballama_cli.generation.prefix_cache import BLOCK

    model, _ = tiny_hybrid(attn_layers=(1, 3), seed=5)
    model.eval()
    a, b, c, _ = _shared_beginnings(3)
    gen = torch.Generator().manual_seed(9)
    other = torch.randint(3, 96, (11,), generator=gen).tolist()
    whole = SlotDecoder(model, slots=2, capacity=90, capture=False, prefill_chunk=8, prefix_cache_bytes=1 << 30)
    paced = SlotDecoder(model, slots=2, capacity=90, capture=False, prefill_chunk=8, prefix_cache_bytes=1 << 30)
    with torch.no_grad():
        want = {i: _answer(whole, p, 6) for i, p in enumerate((a, a + [7, 8, 9], b, c))}
        got = {}
        for i, p in enumerate((a, a + [7, 8, 9], b, c)):
            busy, _ = paced.join(other)  # a row decoding meanwhile
            reading = paced.begin(p)
            steps = 0
            while not reading.done:
                assert paced.advance(reading, 5) <= 5
                before = paced.length[reading.slot]
                paced.step()
                steps += 1
                assert paced.length[reading.slot] == before  # the step leaves the reading slot alone
            slot, tok = paced.finish(reading)
            out = [tok] + [paced.step()[slot] for _ in range(5)]
            got[i] = (out, paced.cached[slot])
            assert steps >= 1 and (steps > 1) == (len(p) - paced.cached[slot] > 5), (i, steps)
            paced.leave(slot)
            paced.leave(busy)
        assert got == want, (got, want)
        assert [cached for _, cached in got.values()] == [0, len(a), 0, 40 // BLOCK * BLOCK]
        reading = paced.begin(torch.randint(3, 96, (20,), generator=gen).tolist())  # nothing of it kept
        paced.advance(reading, 5)
        with pytest.raises(RuntimeError, match="a prompt is being read already"):
            paced.begin(b)
        with pytest.raises(RuntimeError, match="15 tokens of the prompt are still to read"):
            paced.finish(reading)
        with pytest.raises(ValueError, match="still reading its prompt"):
            paced.leave(reading.slot)
        paced.drop(reading)
        assert sorted(paced.free) == [0, 1] and paced.reading is None


def test_captured_steps_and_piece_graphs_record_within_a_short_buffer_and_answer_as_the_eager_walk(monkeypatch):
    """step_warm with the decode step captured and prompts read in piece graphs, on a CPU with a stand-in for the
    CUDA graph (helpers.StandInGraph): it records every piece length a 40-position buffer allows and no longer one
    (on an H100 the warm-up of a 256-token piece wrote past a 200-token buffer), and requests read through those
    pieces, a next turn from the prefix cache among them, answer as through the eager walk and as alone."""
    from mamballama_cli.generation import continuous
    from mamballama_cli.models import runtime as rtmod

    def capture(fn, device, warmup=2, before=None, pool=None):
        for _ in range(warmup):
            fn()
        if before is not None:
            before()
        return StandInGraph.record(fn, before)

    monkeypatch.setattr(rtmod, "capture_graph", capture)
    monkeypatch.setattr(continuous, "capture_graph", capture)
    model, _ = tiny_hybrid(attn_layers=(1, 3), seed=8)
    model.eval()
    p = torch.randint(3, 96, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    graphed = SlotDecoder(model, slots=2, capacity=40, capture=True, prefix_cache_bytes=1 << 30, pieces="walk")
    graphed.stage.pieces = "graph"  # refused off CUDA when asked for; the stand-in records the pieces here
    eager = SlotDecoder(model, slots=2, capacity=40, capture=False, prefix_cache_bytes=1 << 30, pieces="walk")
    with torch.no_grad():
        a = _answer(graphed, p, 6)[0]
        assert set(graphed.graphs) == {True, False}
        assert sorted(graphed.stage.piece_graphs) == [1, 2, 4, 8, 16, 32]  # every length up to the buffer's 40
        assert a == _answer(eager, p, 6)[0] == _solo(model, p, 6)
        turn2 = p + a + [5, 9]  # the next turn: 26 tokens kept, 3 read through the pieces (2 + 1)
        b, cached = _answer(graphed, turn2, 5)
        assert cached == len(p) + 5 and b == _answer(eager, turn2, 5)[0] == _solo(model, turn2, 5)


def test_piece_graphs_need_cuda():
    model, _ = tiny_hybrid(attn_layers=(1,), seed=1)
    with pytest.raises(ValueError, match="pieces='graph' records CUDA graphs; the model is on cpu: give walk or forward"):
        SlotDecoder(model.eval(), slots=1, capacity=16, capture=False, pieces="graph")
    assert SlotDecoder(model, slots=1, capacity=16).stage.pieces == "forward"  # the CPU's default
