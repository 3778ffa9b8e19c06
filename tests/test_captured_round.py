"""The speculative round with nothing on the host inside it (generation/captured_round.py), run eagerly: the
computation a CUDA graph records (device-side positions, counts and history)."""

import pytest
import torch

from helpers import tiny_hybrid
from mamballama_cli.errors import UsageError
from mamballama_cli.generation.acceptance import gumbel_draw
from mamballama_cli.generation.captured_round import CapturedRounds
from mamballama_cli.generation.sampling import SamplingConfig, probabilities
from test_speculative import NeverAgrees, greedy_reference, perturbed  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("k", [1, 3])
def test_device_rounds_give_each_rows_greedy_tokens(k):
    target, _ = tiny_hybrid(seed=1)
    prompts = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(9))
    n = 24
    wants = [greedy_reference(target, prompts[r : r + 1], n)[0] for r in range(3)]
    stop = wants[1][7]
    rounds = CapturedRounds(target, perturbed(target, 0.05), 3, 6 + n + 2 * (k + 1), k, stop_tokens=[stop],
                            capture=False)
    got, stats = rounds.generate(prompts, n, sync_every=3)
    for row, want in enumerate(wants):
        assert got[row] == (want[: want.index(stop) + 1] if stop in want else want), row
    assert 0 < stats["acceptance_rate"] < 1 and 1 < stats["tokens_per_call"] <= k + 1
    assert stats["rounds"] <= n + 3  # the rounds stop once every row is done (checked every 3 replays)
    # the same object again (fixed buffers, as a captured graph needs): the same answers
    again, _ = rounds.generate(prompts, n)
    assert again == got
    # an identical draft keeps every token: K + 1 tokens per verify call
    same = CapturedRounds(target, target, 3, 6 + n + 2 * (k + 1), k, capture=False)
    got, stats = same.generate(prompts, n)
    assert got == wants and stats["acceptance_rate"] == 1.0 and stats["tokens_per_call"] == k + 1


def test_sampled_device_rounds_follow_the_target_distribution_at_the_first_positions():
    """Lossless rejection sampling with Gumbel-max draws: the empirical distribution of the second new token
    matches the target's exactly computed marginal (total variation within sampling noise)."""
    target, _ = tiny_hybrid(seed=2, vocab=24)
    draft = perturbed(target, 1.0)  # its own marginal is 0.24 away (total variation) from the target's
    prompt = torch.randint(3, 24, (1, 5), generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(temperature=1.0)
    B = 1500
    rounds = CapturedRounds(target, draft, B, 5 + 3 + 2 * 3, 2, sampling=cfg, capture=False)
    torch.manual_seed(0)
    got, _ = rounds.generate(prompt.expand(B, -1), 3)
    second = torch.tensor([g[1] for g in got])
    with torch.no_grad():  # exact marginal of the 2nd token: sum over the first token
        p1 = probabilities(target(prompt).logits[:, -1], cfg)[0]
        ids = torch.cat([prompt.expand(24, -1), torch.arange(24)[:, None]], 1)
        p2 = probabilities(target(ids).logits[:, -1], cfg)  # (24, V)
        marginal = (p1[:, None] * p2).sum(0)
    emp = torch.bincount(second, minlength=24).float() / B
    assert 0.5 * (emp - marginal).abs().sum() < 0.08  # sampling noise at 1,500 draws: about 0.05


def test_gumbel_draw_samples_the_distribution():
    torch.manual_seed(0)
    p = torch.tensor([[0.1, 0.6, 0.0, 0.3]]).expand(20000, -1)
    freq = torch.bincount(gumbel_draw(p), minlength=4).float() / 20000
    assert freq[2] == 0 and (freq - p[0]).abs().max() < 0.02


def test_captured_rounds_refuse_what_they_cannot_run():
    target, teacher = tiny_hybrid(seed=1)
    with pytest.raises(UsageError, match="hybrid .* as target and as draft"):
        CapturedRounds(target, torch.nn.Linear(2, 2), 1, 64, 2, capture=False)
    rounds = CapturedRounds(target, target, 1, 20, 2, capture=False)
    with pytest.raises(UsageError, match="do not fit"):
        rounds.generate(torch.ones(1, 6, dtype=torch.long), 20)
    with pytest.raises(UsageError, match="at least 2 tokens"):
        rounds.generate(torch.ones(1, 1, dtype=torch.long), 4)


@pytest.mark.parametrize("k", [2, 4])
def test_rounds_accept_exactly_what_the_drafts_teacher_forced_agreement_predicts(k):
    """Greedy rounds accept, call by call, the run of positions where the draft's parallel forward over the
    target's own greedy tokens predicts the next one (generation/acceptance.greedy_rounds): what spec_eval
    simulates beside the measured rounds, so that a round accepting less than its draft's quality allows shows."""
    from mamballama_cli.generation.acceptance import accepted_hist, greedy_rounds, teacher_forced_agreement

    target, _ = tiny_hybrid(seed=1)
    draft = perturbed(target, 0.05)
    prompts = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(9))
    n = 24
    rounds = CapturedRounds(target, draft, 1, 6 + n + 2 * (k + 1), k, capture=False)
    total = [0] * (k + 1)
    for r in range(4):
        plain = greedy_reference(target, prompts[r : r + 1], n + k + 1)[0]  # past n: the last round sees further
        agree = teacher_forced_agreement(draft, prompts[r].tolist(), plain)
        want = accepted_hist(greedy_rounds(agree, k, n), k)
        got, stats = rounds.generate(prompts[r : r + 1], n)
        assert got[0] == plain[:n]
        assert stats["accepted_hist"] == want, (r, agree)
        total = [a + b for a, b in zip(total, want)]
    assert total[0] > 0 and sum(total[1:]) > 0  # some calls accept nothing and some accept drafts
