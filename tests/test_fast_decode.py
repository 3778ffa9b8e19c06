"""The static decoder (generation/fast.py): static cache, captured step, on-device sampling.

On CPU the step runs eagerly on the reference ops and must reproduce transformers' generate on the same
model token for token; on CUDA (gpu marker) the captured step must reproduce the uncaptured one.
"""

import json

import pytest
import torch

from clihelp import run_cli
from helpers import tiny_hybrid, tiny_tokenizer
from mamballama_cli.generation.fast import StaticDecoder, fuse_projections, generate_fast
from mamballama_cli.generation.plain import generate
from mamballama_cli.generation.sampling import SamplingConfig, sample


def plain_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def hybrid():
    """One tiny converted hybrid (attention in layers 1 and 3) shared by the CPU tests; none modifies it."""
    return tiny_hybrid()[0]


def prompts(batch, length, vocab=96, seed=0):
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", ["default", "gqa3"])
def test_static_decoder_greedy_equals_transformers_generate(hybrid, shape):
    # gqa3: three query heads per KV head (a group size that is not a power of two), attention in layer 2 only
    model = hybrid if shape == "default" else tiny_hybrid(attn_layers=(2,), n_heads=6, n_kv=2, hidden=48)[0]
    ids = prompts(2, 9)
    expected = plain_greedy(model, ids, 12)
    dec = StaticDecoder(model, batch_size=2, max_length=9 + 12, capture=False)
    first = dec.prefill(ids)
    assert torch.equal(first, expected[:, 0])
    assert dec.decode(11) == 11
    assert torch.equal(dec.tokens_so_far(), expected)
    assert dec.cache.seqlen == 9 + 11 and dec.room == 1
    assert dec.decode(100) == 1  # capped by the cache's capacity
    mem = dec.cache.memory_bytes()
    assert mem["kv_bytes"] > 0 and mem["state_bytes"] > 0


def test_decoder_is_reusable_across_prompts(hybrid):
    model = hybrid
    dec = StaticDecoder(model, 1, 24, capture=False)
    runs = []
    for seed in (1, 2, 1):
        dec.prefill(prompts(1, 7, seed=seed))
        dec.decode(6)
        runs.append(dec.tokens_so_far().clone())
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[1])
    assert torch.equal(runs[1], plain_greedy(model, prompts(1, 7, seed=2), 7))
    with pytest.raises(ValueError, match="no room"):
        dec.prefill(prompts(1, 24))
    with pytest.raises(ValueError, match="batch of 2"):
        dec.prefill(prompts(2, 5))


def test_generate_static_engine_stops_like_transformers(hybrid, monkeypatch):
    model = hybrid
    tok = tiny_tokenizer()
    ids = prompts(1, 8)
    free = plain_greedy(model, ids, 10)[0].tolist()
    stop = free[4]  # a stop token that greedy decoding really emits
    monkeypatch.setattr(model.generation_config, "eos_token_id", stop)
    sampling = SamplingConfig(max_new_tokens=10)
    plain = generate(model, tok, ids, sampling, engine="transformers")
    pieces = []
    fast = generate(model, tok, ids, sampling, on_text=pieces.append, engine="static")
    assert fast.engine == "static-eager" and plain.engine == "transformers"
    assert fast.token_ids == plain.token_ids == free[: free.index(stop) + 1]
    assert fast.text == plain.text == "".join(pieces)


def test_forced_tokens_batch_prompts_of_unequal_lengths(hybrid):
    """Prefill the shortest prompt, force the rest of the longer ones: each row's greedy continuation is the one
    its prompt gets decoded alone; a stop id inside a forced prompt does not finish the row."""
    model = hybrid
    lengths = [5, 9, 7, 12]
    full = [prompts(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    new = 10
    alone = [plain_greedy(model, p[None], new)[0] for p in full]
    n0 = min(lengths)
    F = max(lengths) - n0
    forced = torch.zeros(len(full), F, dtype=torch.long)
    for i, p in enumerate(full):
        forced[i, : len(p) - n0] = p[n0:]
    forced_len = torch.tensor([n - n0 for n in lengths])
    stop = int(full[3][n0 + 2])  # a token row 3 reads as a forced prompt token
    dec = StaticDecoder(model, len(full), max(lengths) + new, stop_ids=[stop], capture=False, forcing=True)
    first = dec.prefill(torch.stack([p[:n0] for p in full]), forced, forced_len)
    assert first[0] == alone[0][0] and first[3] == full[3][n0]
    dec.decode(F + new - 1)
    hist = dec.tokens_so_far()
    assert hist.shape == (len(full), F + new)
    for i, p in enumerate(full):
        f = len(p) - n0
        assert torch.equal(hist[i, :f], p[n0:])  # the prompt's rest, as forced
        got, want = hist[i, f:f + new].tolist(), alone[i].tolist()
        if stop in want:  # rows stop (and then repeat the stop id) at a sampled stop token only
            cut = want.index(stop) + 1
            assert got[:cut] == want[:cut] and set(got[cut:]) <= {stop}
        else:
            assert got == want
    # Without forced tokens the same decoder is a plain one: equal prompts decode as before.
    same = prompts(4, 6, seed=3)
    dec.prefill(same)
    dec.decode(new - 1)
    plain = StaticDecoder(model, 4, 6 + new, stop_ids=[stop], capture=False)
    plain.prefill(same)
    plain.decode(new - 1)
    assert torch.equal(dec.tokens_so_far(), plain.tokens_so_far())
    with pytest.raises(ValueError, match="forcing=True"):
        plain.prefill(same, forced[:, :2], forced_len)


def test_fused_projections_keep_outputs_and_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = tiny_hybrid()
    ids = prompts(2, 10)
    before = model(ids).logits
    keys = list(model.state_dict())
    fuse_projections(model)
    mlp = model.model.layers[0].mlp
    fused, _ = mlp.__dict__["_mamballama_fused_gate_proj_up_proj"]
    assert mlp.up_proj.weight.data_ptr() == fused[mlp.gate_proj.weight.shape[0]].data_ptr()
    assert torch.equal(model(ids).logits, before)
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(ids).logits, before)


def test_device_sampling_distribution_and_warpers():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))[None].expand(20000, 3).contiguous()
    torch.manual_seed(0)
    counts = torch.bincount(sample(logits, SamplingConfig(temperature=1.0)), minlength=3) / 20000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)
    counts = torch.bincount(sample(logits, SamplingConfig(temperature=1.0, top_p=0.75)), minlength=3) / 20000
    assert counts[2] == 0 and abs(counts[0] - 0.7 / 0.9) < 0.015
    counts = torch.bincount(sample(logits, SamplingConfig(temperature=1.0, top_k=1)), minlength=3)
    assert counts.tolist() == [20000, 0, 0]


def test_two_stage_argmax_matches_argmax_with_ties():
    from mamballama_cli.generation.sampling import argmax_last

    gen = torch.Generator().manual_seed(0)
    for n in (128256, 49152, 100000):
        x = torch.randint(-50, 50, (6, n), generator=gen).to(torch.bfloat16)  # many ties at the maximum
        x[1, :] = 7
        x[2, -1] = 99
        x[3, 5000] = x[3, 9] = 99  # tie across blocks: the first wins
        assert torch.equal(argmax_last(x), x.float().argmax(dim=-1))


def test_sampled_static_decoding_is_seeded_and_top_k1_is_greedy(hybrid):
    model = hybrid
    ids = prompts(1, 6)

    def run(**kw):
        torch.manual_seed(kw.pop("seed", 0))
        dec = StaticDecoder(model, 1, 20, sampling=SamplingConfig(**kw), capture=False)
        dec.prefill(ids)
        dec.decode(8)
        return dec.tokens_so_far()

    assert torch.equal(run(temperature=0.9, seed=3), run(temperature=0.9, seed=3))
    assert torch.equal(run(temperature=0.9, top_k=1), plain_greedy(model, ids, 9))


def test_generate_cli_engines_agree(hybrid, tmp_path, capsys):
    model = hybrid
    ckpt = tmp_path / "hybrid"
    model.save_pretrained(ckpt, safe_serialization=True)
    tiny_tokenizer().save_pretrained(ckpt)
    outs = {}
    for engine in ("static", "transformers"):
        stats = tmp_path / f"{engine}.json"
        res = run_cli(["generate", ckpt, "--prompt", "hello there", "-n", "12", "--engine", engine,
                       "--stats-json", stats], capsys)
        assert res.code == 0, res.err
        outs[engine] = (res.out, json.loads(stats.read_text()))
    assert outs["static"][0] == outs["transformers"][0]
    assert outs["static"][1]["engine"] == "static-eager"
    assert outs["transformers"][1]["engine"] == "transformers"
    bad = run_cli(["generate", ckpt, "--prompt", "x", "--engine", "fastest"], capsys)
    assert bad.code != 0 and "--engine 'fastest'" in bad.err


# ------------------------------------------------------------------------------------------------
# CUDA: the captured step
# ------------------------------------------------------------------------------------------------
def gpu_model(dtype, attn_layers=(1, 3)):
    model, _ = tiny_hybrid(attn_layers=attn_layers, n_heads=4, n_kv=2, hidden=128, layers=4, seed=1)
    return model.to("cuda", dtype).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_captured_decoding_equals_uncaptured(dtype, batch):
    model = gpu_model(dtype)
    ids = prompts(batch, 33).cuda()
    runs = {}
    for capture in (True, False):
        dec = StaticDecoder(model, batch, 33 + 64, capture=capture)
        assert dec.engine == ("static-graph" if capture else "static-eager")
        assert all(b != "torch-ref" for b in dec.backends.values()), dec.backends
        dec.prefill(ids)
        dec.decode(63)
        runs[capture] = dec.tokens_so_far().cpu()
    assert runs[True].shape == (batch, 64)
    assert torch.equal(runs[True], runs[False])


@pytest.mark.gpu
def test_captured_decoding_equals_transformers_generate_fp32():
    model = gpu_model(torch.float32)
    ids = prompts(2, 20).cuda()
    dec = StaticDecoder(model, 2, 20 + 40)
    dec.prefill(ids)
    dec.decode(39)
    assert torch.equal(dec.tokens_so_far(), plain_greedy(model, ids, 40))


@pytest.mark.gpu
def test_captured_sampling_is_seeded():
    model = gpu_model(torch.bfloat16)
    ids = prompts(1, 10).cuda()
    dec = StaticDecoder(model, 1, 50, sampling=SamplingConfig(temperature=1.0, top_p=0.9))
    out = []
    for _ in range(2):
        torch.manual_seed(5)
        dec.prefill(ids)
        dec.decode(39)
        out.append(dec.tokens_so_far().clone())
    assert torch.equal(out[0], out[1])


@pytest.mark.gpu
def test_generate_uses_the_captured_decoder_on_cuda():
    model = gpu_model(torch.float32)
    tok = tiny_tokenizer()
    ids = prompts(1, 12)
    sampling = SamplingConfig(max_new_tokens=30)
    fast = generate(model, tok, ids, sampling)
    plain = generate(model, tok, ids, sampling, engine="transformers")
    assert fast.engine == "static-graph"
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    again = generate_fast(model, tok, ids, sampling)  # the captured decoder is reused
    assert again.token_ids == fast.token_ids


@pytest.mark.gpu
def test_captured_forced_tokens_equal_uncaptured():
    """The forced-token step is graph-safe: captured and eager runs give the same rows, forced prefix included."""
    model = gpu_model(torch.float32)
    lengths = [8, 13, 10]
    full = [prompts(1, n, seed=20 + i)[0].cuda() for i, n in enumerate(lengths)]
    n0, F = min(lengths), max(lengths) - min(lengths)
    forced = torch.zeros(3, F, dtype=torch.long, device="cuda")
    for i, p in enumerate(full):
        forced[i, : len(p) - n0] = p[n0:]
    forced_len = torch.tensor([n - n0 for n in lengths], device="cuda")
    runs = {}
    for capture in (True, False):
        dec = StaticDecoder(model, 3, max(lengths) + 30, capture=capture, forcing=True)
        for _ in range(2):  # the second prefill re-arms the forced buffers of a captured graph
            dec.prefill(torch.stack([p[:n0] for p in full]), forced, forced_len)
            dec.decode(F + 29, sync_every=64)
        runs[capture] = dec.tokens_so_far().cpu()
    assert torch.equal(runs[True], runs[False])
    assert torch.equal(runs[True][1, : lengths[1] - n0], full[1][n0:].cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_piece_graphs_equal_the_eager_walk_and_the_forward(dtype):
    """Runtime.read_on with one CUDA graph per piece length: a prompt read whole (cold) and its last part read on
    from a prefix (a prefix cache's next turn) give the eager walk's logits and states exactly and the forward's
    within the dtype's rounding; a second prompt at other positions replays the graphs recorded by the first."""
    from mamballama_cli.models.runtime import Runtime

    model = gpu_model(dtype)
    seq = prompts(1, 150, seed=3).cuda()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        want = model(seq).logits[:, -1].float()
        got = {}
        for pieces in ("graph", "walk", "forward"):
            rt = Runtime(model, 1, 256, pieces=pieces)
            cold = rt.prefill(seq)
            rt.pieces = "forward"
            rt.prefill(seq[:, :41])
            rt.pieces = pieces
            resumed = rt.prefill(seq[:, 41:], resume=True)  # 109 = 64 + 32 + 8 + 4 + 1
            states = [t.clone() for s in rt.cache.mamba.values() for t in s.values()]
            keys = [k[:, :, :150].clone() for k in rt.cache.key.values()]
            got[pieces] = (cold.float(), resumed.float(), states, keys)
            if pieces == "graph":
                # 150 = 128 + 16 + 4 + 2 cold, 109 = 64 + 32 + 8 + 4 + 1 resumed: one graph per length
                assert sorted(rt.piece_graphs) == [1, 2, 4, 8, 16, 32, 64, 128], sorted(rt.piece_graphs)
                recorded = dict(rt.piece_graphs)
                rt.pieces = "forward"
                rt.prefill(seq[:, :23])
                rt.pieces = "graph"
                again = rt.prefill(seq[:, 23:], resume=True)  # 127 = 64 + 32 + 16 + 8 + 4 + 2 + 1: no new graph
                assert rel_err(again.float(), resumed.float()) < tol
                assert rt.piece_graphs.keys() == recorded.keys()
                assert all(rt.piece_graphs[t] is recorded[t] for t in recorded)
    exact = tol / 100  # a graph replays the walk's own kernels
    for a, b in zip(got["graph"][2] + got["graph"][3], got["walk"][2] + got["walk"][3]):
        assert rel_err(a.float(), b.float()) < exact
    assert rel_err(got["graph"][0], got["walk"][0]) < exact and rel_err(got["graph"][1], got["walk"][1]) < exact
    for pieces in ("graph", "forward"):
        assert rel_err(got[pieces][0], want) < tol and rel_err(got[pieces][1], want) < tol, pieces
    # a state sums a whole prompt, and the forward's chunked scan adds it up in another order than the pieces' scan
    # (float32 on an H100: 1.06e-4 for 150 tokens, where the logits agree within 1e-4)
    state_tol = 1e-3 if dtype == torch.float32 else tol
    for a, b in zip(got["graph"][2] + got["graph"][3], got["forward"][2] + got["forward"][3]):
        assert rel_err(a.float(), b.float()) < state_tol


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_continuous_batching_equals_uncaptured_and_fp32_equals_each_prompt_alone(dtype):
    """Slots at different positions, requests joining a running batch and reusing freed slots, greedy and seeded
    sampled requests side by side (both recorded steps run), and the prefix cache (a request repeating an earlier
    prompt, one extending an earlier request's prompt and answer): the captured steps give the eager step's tokens,
    and in float32 every greedy request its own greedy tokens."""
    from mamballama_cli.generation.continuous import SlotDecoder
    from mamballama_cli.generation.sampling import SamplingConfig

    model = gpu_model(dtype)
    gen = torch.Generator().manual_seed(4)
    reqs = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (40, 7, 100, 23, 61)]
    reqs += [reqs[0], None]  # 5 repeats request 0; 6 extends request 2 (its prompt and answer), made when it joins
    runs, prompts = {}, {}
    for capture in (True, False):
        # prompts through the layer walk's pieces: CUDA graphs when captured, the same walk eagerly when not
        dec = SlotDecoder(model, slots=3, capacity=200, capture=capture, prefix_cache_bytes=1 << 30,
                          pieces="graph" if capture else "walk")
        out, where, queue, cached = {}, {}, list(range(len(reqs))), {}
        for step in range(200):
            if queue and dec.free and step % 7 == 0:  # a request joins every 7 steps while a slot is free
                i = queue.pop(0)
                if i == 6:
                    assert len(out[2]) >= 30 and 2 not in where
                    reqs[6] = reqs[2] + out[2][:29] + [5, 6, 7]
                cfg = SamplingConfig(temperature=0.0 if i not in (1, 3) else 0.8 + 0.1 * i, top_k=8 * (i == 3))
                where[i], first = dec.join(reqs[i], cfg, seed=100 + i)
                out[i], cached[i] = [first], dec.cached[where[i]]
            for i in [i for i in where if len(out[i]) >= 30]:
                dec.leave(where.pop(i))
            if not where:
                if not queue:
                    break
                continue
            toks = dec.step()
            for i, slot in where.items():
                out[i].append(toks[slot])
        assert not queue and all(len(v) >= 30 for v in out.values())
        assert cached[5] == 40 and cached[6] == 100 + 29, cached  # the whole prompt; request 2's prompt and answer
        runs[capture], prompts[capture] = {i: v[:30] for i, v in out.items()}, list(reqs)
    assert runs[True] == runs[False]
    if dtype == torch.float32:
        for i in (0, 2, 4, 5, 6):
            ids = torch.tensor([prompts[True][i]], device="cuda")
            assert runs[True][i] == plain_greedy(model, ids, 30)[0].tolist(), i
