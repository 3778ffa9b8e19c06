"""generation/sampling.py: the one temperature / top-k / top-p implementation, its tie rules, and that every
decoding path (transformers generate, the static decoder, speculative decoding) samples through it."""

import pytest
import torch

from helpers import tiny_hybrid, tiny_tokenizer
from mamballama_cli.generation import sampling as sampling_mod
from mamballama_cli.generation.sampling import (
    LogitsFilter,
    RowSampling,
    SamplingConfig,
    filter_logits,
    filter_rows,
    probabilities,
    row_uniform,
    sample,
    sample_rows,
    transformers_kwargs,
)


def logits_of(*probs) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def rows_of(*cfgs: SamplingConfig, seeds=None) -> RowSampling:
    rs = RowSampling(len(cfgs), "cpu")
    for i, cfg in enumerate(cfgs):
        rs.set(i, cfg, 0 if seeds is None else seeds[i])
    return rs


def kept(probs, **kw) -> list[int]:
    """Indices that survive the filter for a distribution given as probabilities; the per-row filter of continuous
    batching (filter_rows) must keep the same ones."""
    cfg = SamplingConfig(temperature=1.0, **kw)
    scores = filter_logits(logits_of(*probs), cfg)
    per_row = filter_rows(logits_of(*probs)[None], rows_of(cfg))[0]
    assert torch.equal(torch.isfinite(per_row), torch.isfinite(scores)), (probs, kw)
    return torch.isfinite(scores).nonzero().flatten().tolist()


# --- top-p --------------------------------------------------------------------------------------------------
def test_top_p_keeps_every_token_tied_at_the_cut():
    # The prefix 0.4 + 0.3 reaches 0.7; the other 0.3 is tied with the last token kept, so it stays too,
    # whichever of the two 0.3s the sort happens to put first.
    assert kept([0.4, 0.3, 0.3], top_p=0.7) == [0, 1, 2]
    assert kept([0.3, 0.4, 0.3], top_p=0.7) == [0, 1, 2]
    assert kept([0.3, 0.3, 0.4], top_p=0.7) == [0, 1, 2]
    p = probabilities(logits_of(0.4, 0.3, 0.3), SamplingConfig(temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([0.4, 0.3, 0.3]))
    # A tie at the very top with a tiny top_p: both tied tokens are kept, not just the one sorted first.
    assert kept([0.35, 0.3, 0.35], top_p=0.1) == [0, 2]
    # Ties below the cut are dropped together.
    assert kept([0.6, 0.2, 0.2], top_p=0.5) == [0]


def test_top_p_stops_at_the_prefix_that_reaches_it_exactly():
    # 0.4 + 0.3 reaches 0.7 exactly: the 0.2 is not needed and is dropped (float rounding does not decide).
    assert kept([0.4, 0.3, 0.2, 0.1], top_p=0.7) == [0, 1]
    assert kept([0.1, 0.2, 0.3, 0.4], top_p=0.7) == [2, 3]
    assert kept([0.4, 0.3, 0.2, 0.1], top_p=0.69) == [0, 1]
    assert kept([0.4, 0.3, 0.2, 0.1], top_p=0.71) == [0, 1, 2]
    assert kept([0.4, 0.3, 0.2, 0.1], top_p=0.4) == [0]
    assert kept([0.4, 0.3, 0.2, 0.1], top_p=0.0) == [0]  # at least the most likely token
    assert kept([0.4, 0.3, 0.2, 0.1], top_p=1.0) == [0, 1, 2, 3]
    p = probabilities(logits_of(0.4, 0.3, 0.2, 0.1), SamplingConfig(temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_top_p_does_not_depend_on_the_order_of_tied_tokens():
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0])  # logits with many ties
    for top_p in (0.3, 0.5, 0.6, 0.8, 0.9, 0.95):
        cfg = SamplingConfig(temperature=1.0, top_p=top_p)
        ref = torch.isfinite(filter_logits(values, cfg))
        # the kept set is closed under ties: a token is kept iff every token at least as likely is kept
        for i in range(len(values)):
            assert bool(ref[i]) == bool(ref[values == values[i]].all())
        for _ in range(20):
            perm = torch.randperm(len(values), generator=gen)
            assert torch.equal(torch.isfinite(filter_logits(values[perm], cfg)), ref[perm])


def test_top_p_mass_kept_reaches_top_p_and_is_minimal_up_to_ties():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=gen) * 2
    for top_p in (0.2, 0.5, 0.9):
        cfg = SamplingConfig(temperature=1.0, top_p=top_p)
        probs = logits.softmax(-1)
        keep = torch.isfinite(filter_logits(logits, cfg))
        assert bool(((probs * keep).sum(-1) >= top_p - 1e-5).all())
        # without its least likely kept token, the kept set no longer reaches top_p
        smallest = torch.where(keep, probs, torch.inf).min(-1).values
        assert bool(((probs * keep).sum(-1) - smallest < top_p).all())


# --- top-k, temperature, greedy -----------------------------------------------------------------------------
def test_top_k_keeps_the_k_most_likely_and_ties_with_the_kth():
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=2) == [1, 3]
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=1) == [1]
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=4) == [0, 1, 2, 3]
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=0) == [0, 1, 2, 3]
    assert kept([0.4, 0.2, 0.2, 0.2], top_k=2) == [0, 1, 2, 3]


def test_top_k_applies_before_top_p():
    # top_k=2 renormalises to [4/7, 3/7]; 4/7 alone reaches 0.5. On the unfiltered 0.4 it would not.
    assert kept([0.4, 0.3, 0.2, 0.1], top_k=2, top_p=0.5) == [0]
    assert kept([0.4, 0.3, 0.2, 0.1], top_p=0.5) == [0, 1]


def test_temperature_scales_the_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 3.0):
        p = probabilities(logits, SamplingConfig(temperature=t))
        assert torch.allclose(p, (logits / t).softmax(-1))


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [5.0, 1.0, 0.0, 4.0]])
    cfg = SamplingConfig(temperature=0.0)
    assert cfg.greedy
    # the first maximal token, as transformers' greedy search and torch.argmax
    assert sample(logits, cfg).tolist() == [1, 0]
    assert probabilities(logits, cfg).tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert transformers_kwargs(cfg)["do_sample"] is False
    # top_k=1 samples the greedy token when the maximum is unique; a tie at the top keeps both (top-k ties)
    torch.manual_seed(0)
    assert sample(logits[1:].repeat(50, 1), SamplingConfig(temperature=0.7, top_k=1)).tolist() == [0] * 50
    assert set(sample(logits[:1].repeat(200, 1), SamplingConfig(temperature=0.7, top_k=1)).tolist()) == {1, 2}


def test_sample_draws_from_the_filtered_distribution():
    logits = logits_of(0.4, 0.3, 0.3)[None].expand(30000, 3).contiguous()
    torch.manual_seed(0)
    counts = torch.bincount(sample(logits, SamplingConfig(temperature=1.0, top_p=0.7)), minlength=3) / 30000
    assert torch.allclose(counts, torch.tensor([0.4, 0.3, 0.3]), atol=0.015)
    logits = logits_of(0.4, 0.3, 0.2, 0.1)[None].expand(30000, 4).contiguous()
    counts = torch.bincount(sample(logits, SamplingConfig(temperature=1.0, top_p=0.7)), minlength=4) / 30000
    assert counts[2] == 0 and counts[3] == 0 and abs(counts[0] - 4 / 7) < 0.015
    # a generator makes it reproducible without touching the global one
    a = sample(logits[:50], SamplingConfig(temperature=1.0), torch.Generator().manual_seed(3))
    b = sample(logits[:50], SamplingConfig(temperature=1.0), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# --- per-row settings (continuous batching) -----------------------------------------------------------------
MIXED = [SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.2, top_p=0.8),
         SamplingConfig(temperature=1.0, top_k=5), SamplingConfig(temperature=0.9, top_k=10, top_p=0.6),
         SamplingConfig(temperature=0.0), SamplingConfig(temperature=2.0, top_k=1)]


def test_rows_with_different_settings_are_each_filtered_as_alone():
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(len(MIXED), 60, generator=gen) * 2).round(decimals=1)  # rounding makes ties
    got = filter_rows(logits, rows_of(*MIXED))
    for i, cfg in enumerate(MIXED):
        if cfg.greedy:  # a greedy row is never filtered for a draw: sample_rows takes its argmax
            continue
        ref = filter_logits(logits[i], cfg)
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(ref)), i
        assert torch.allclose(got[i][torch.isfinite(ref)], ref[torch.isfinite(ref)]), i


def test_row_draws_follow_each_rows_distribution():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(len(MIXED), 40, generator=gen) * 2
    n = 20000  # draws per setting, each row its own seed
    rs = rows_of(*[c for c in MIXED for _ in range(n)], seeds=range(len(MIXED) * n))
    tokens = sample_rows(logits.repeat_interleave(n, 0), rs).view(len(MIXED), n)
    for i, cfg in enumerate(MIXED):
        freq = torch.bincount(tokens[i], minlength=40) / n
        p = probabilities(logits[i], cfg)
        assert float(freq[p == 0].sum()) == 0.0, i  # nothing the filter removed is ever drawn
        assert torch.allclose(freq, p, atol=5 * (0.25 / n) ** 0.5), (i, (freq - p).abs().max())
    assert rs.counter.eq(1).all()


def test_a_rows_draw_depends_only_on_its_seed_and_count():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(len(MIXED), 30, generator=gen)
    seeds = [11, 12, 13, 14, 15, 2**62 + 11]
    together = []
    rs = rows_of(*MIXED, seeds=seeds)
    live = torch.tensor([1, 1, 0, 1, 1, 1])
    for _ in range(40):
        together.append(sample_rows(logits, rs, live))
    assert rs.counter.tolist() == [40, 40, 0, 40, 40, 40]  # a row that is not live does not count its draws
    together = torch.stack(together, 1)
    for i in (0, 1, 3):  # alone, from the same seed: the same 40 tokens
        alone = rows_of(MIXED[i], seeds=[seeds[i]])
        assert torch.equal(torch.stack([sample_rows(logits[i:i + 1], alone) for _ in range(40)], 1)[0],
                           together[i])
    assert len(set(together[0].tolist())) > 5  # the count moves the draw on
    assert together[4].eq(logits[4].argmax()).all()  # greedy
    assert together[5].eq(logits[5].argmax()).all()  # top_k=1
    # the seed's high bits count too, and another seed draws other tokens
    other = rows_of(MIXED[0], seeds=[11 + 2**62])
    assert not torch.equal(torch.stack([sample_rows(logits[:1], other) for _ in range(40)], 1)[0], together[0])
    u = row_uniform(torch.tensor([0, 1, 2**40]), torch.tensor([0, 0, 5]), 50000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="seed -1"):
        RowSampling(1, "cpu").set(0, MIXED[0], -1)


def test_transformers_processor_is_the_same_filter():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    cfg = SamplingConfig(temperature=0.8, top_p=0.6, top_k=10)
    kw = transformers_kwargs(cfg)
    assert kw["do_sample"] is True
    assert kw["temperature"] is None and kw["top_p"] is None and kw["top_k"] is None  # its warpers off
    (proc,) = kw["logits_processor"]
    assert isinstance(proc, LogitsFilter)
    assert torch.equal(proc(None, logits), filter_logits(logits, cfg))


# --- every path samples through filter_logits ---------------------------------------------------------------
FORCED = 7


@pytest.fixture
def only_token_7(monkeypatch):
    """Replace the filter by one keeping token FORCED alone: a path sampling through it emits only FORCED."""
    calls = []

    def forced(logits, cfg):
        calls.append(tuple(logits.shape))
        out = torch.full_like(logits.float(), float("-inf"))
        out[..., FORCED] = 0.0
        return out

    monkeypatch.setattr(sampling_mod, "filter_logits", forced)
    return calls


@pytest.fixture(scope="module")
def models():
    target = tiny_hybrid(seed=0)[0]
    draft = tiny_hybrid(seed=1)[0]
    return target, draft


CFG = SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.8, top_k=20, seed=0)
PROMPT = torch.randint(5, 96, (1, 6), generator=torch.Generator().manual_seed(0))


def test_transformers_path_samples_through_the_filter(models, only_token_7):
    from mamballama_cli.generation.plain import generate

    res = generate(models[0], tiny_tokenizer(), PROMPT, CFG, engine="transformers")
    assert res.engine == "transformers"
    assert res.token_ids == [FORCED] * CFG.max_new_tokens and only_token_7


def test_static_decoder_samples_through_the_filter(models, only_token_7):
    from mamballama_cli.generation.fast import StaticDecoder

    dec = StaticDecoder(models[0], 1, 20, sampling=CFG, capture=False)
    dec.prefill(PROMPT)
    dec.decode(5)
    assert dec.tokens_so_far().tolist() == [[FORCED] * 6] and only_token_7


def test_speculative_path_samples_through_the_filter(models, only_token_7):
    from mamballama_cli.generation.speculative import speculative_generate

    res = speculative_generate(models[0], models[1], PROMPT, k=2, max_new_tokens=6, sampling=CFG, seed=0)
    assert res.tokens == [[FORCED] * 6] and only_token_7
