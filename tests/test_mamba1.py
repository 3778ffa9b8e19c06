"""Mamba-1 mixer: mapping from attention, GQA pairing, selective-scan references, cached generation, convert CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clihelp import run_cli
from helpers import (
    assert_chunked_scan_matches_sequential,
    assert_left_padding_changes_nothing,
    assert_mixer_holds_attention,
    decode_with_cache,
    rel_err,
    save_teacher,
    tiny_hybrid,
    tiny_llama,
)
from mamballama_cli.ops.selective_scan import (
    selective_scan_chunked_ref,
    selective_scan_sequential_ref,
    selective_state_step_ref,
)

GQA = [(4, 4), (4, 2), (8, 2)]  # group sizes r = 1, 2, 4
HEAD_DIM = 32  # two groups of d_state = 16 channels per head: pairing rows inside a head matters


def hidden_for(n_heads):
    return HEAD_DIM * n_heads


def mamba1_hybrid(attn_layers=(1, 3), n_heads=4, n_kv=2, chunk=None, **kw):
    student, teacher = tiny_hybrid(attn_layers=attn_layers, n_heads=n_heads, n_kv=n_kv, mixer="mamba1",
                                   hidden=hidden_for(n_heads), **kw)
    if chunk is not None:
        for layer in student.model.layers:
            if not layer.is_attention:
                layer.mamba.chunk_size = chunk
    return student, teacher


# --- conversion ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_heads,n_kv", GQA)
def test_mamba1_mapping_equals_teachers_weights(n_heads, n_kv):
    student, teacher = mamba1_hybrid(attn_layers=[3], n_heads=n_heads, n_kv=n_kv)
    tsd = teacher.state_dict()
    cfg = student.config
    assert cfg.mixer == "mamba1" and cfg.mamba1_dt_rank == math.ceil(hidden_for(n_heads) / 16)
    for i in (0, 1, 2):
        mixer = assert_mixer_holds_attention(student, tsd, i)
        s = mixer.in_proj_slices()
        # fresh parts: S4D-real A = -(1..16) per channel, D = 1, dt in [1e-3, 1e-1], low-rank dt of rank ceil(H/16)
        d_inner = n_heads * cfg.head_dim
        assert mixer.A_log.shape == (d_inner, 16) and mixer.D.shape == (d_inner,)
        assert torch.allclose(-torch.exp(mixer.A_log), -torch.arange(1.0, 17.0).expand(d_inner, 16))
        assert torch.all(mixer.D == 1)
        dt = F.softplus(mixer.dt_proj.bias)
        assert torch.all((dt >= 1e-3 - 1e-6) & (dt <= 1e-1 + 1e-6))
        assert mixer.dt_proj.weight.shape == (d_inner, cfg.mamba1_dt_rank)
        assert mixer.dt_proj.weight.abs().max() <= cfg.mamba1_dt_rank**-0.5
        assert s["dt"].stop - s["dt"].start == cfg.mamba1_dt_rank
        # x and its conv stay at n_kv * d channels (GQA tied, expanded at compute time)
        assert mixer.conv1d.weight.shape[0] == n_kv * cfg.head_dim
    assert torch.equal(student.model.embed_tokens.weight, tsd["model.embed_tokens.weight"])


def _degenerate(mixer):
    """A = 0 (no decay), dt = 1, identity conv, D = 0 (the gate is off through the config)."""
    with torch.no_grad():
        mixer.A_log.fill_(float("-inf"))
        mixer.dt_proj.weight.zero_()
        mixer.dt_proj.bias.fill_(math.log(math.expm1(1.0)))  # softplus = 1
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0
        mixer.conv1d.bias.zero_()
        mixer.D.zero_()


def _blockwise_linear_attention(q, k, v, W_O, n_heads, n_kv, d, pairing):
    """Unnormalised causal linear attention per block of 16 rows of a head, mixed by W_O.

    q (b, t, n_h*d), k and v (b, t, n_kv*d). ``pairing`` says which K/V block query block j of head i uses:
    "head" = block j of KV head i // r (ours); "channel16" = block (i*d/16 + j) // r of the flat K/V rows,
    which is what repeating K/V at 16-channel granularity (the reference code) amounts to.
    """
    b, t, _ = q.shape
    r, nb = n_heads // n_kv, d // 16
    qb = q.view(b, t, n_heads * nb, 16)
    kb = k.view(b, t, n_kv * nb, 16)
    vb = v.view(b, t, n_kv * nb, 16)
    if pairing == "head":
        idx = torch.tensor([(i // r) * nb + j for i in range(n_heads) for j in range(nb)])
    else:
        idx = torch.tensor([(i * nb + j) // r for i in range(n_heads) for j in range(nb)])
    kb, vb = kb[:, :, idx], vb[:, :, idx]
    scores = torch.einsum("btgn,bsgn->bgts", qb, kb).tril()  # no softmax, no scaling, causal
    o = torch.einsum("bgts,bsgc->btgc", scores, vb).reshape(b, t, n_heads * d)
    return o @ W_O.T


@pytest.mark.parametrize("n_heads,n_kv", GQA)
def test_degenerate_mamba1_is_blockwise_linear_attention(n_heads, n_kv):
    """With A = 0, dt = 1, identity conv, no gate and D = 0, group j of query head i is exactly causal linear
    attention between rows 16j..16j+15 of q of head i and of k, v of its own KV head i // r."""
    from mamballama_cli.convert.converter import convert_model

    hidden = hidden_for(n_heads)
    teacher = tiny_llama(n_heads=n_heads, n_kv=n_kv, hidden=hidden, seed=7)
    student, _ = convert_model(teacher, [3], mixer="mamba1", dtype=torch.float64,
                               config_overrides=dict(mamba_activation="identity", mamba_gated_norm=False,
                                                     mamba_chunk_size=4))
    student = student.double()
    mixer = student.model.layers[0].mamba
    _degenerate(mixer)
    h = torch.randn(2, 11, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = mixer(h)
    att = teacher.model.layers[0].self_attn
    d = teacher.config.head_dim
    q, k, v = (h @ p.weight.double().T for p in (att.q_proj, att.k_proj, att.v_proj))
    W_O = att.o_proj.weight.double()
    expect = _blockwise_linear_attention(q, k, v, W_O, n_heads, n_kv, d, pairing="head")
    assert rel_err(out, expect) < 1e-10
    if n_heads != n_kv:
        # The check tells the pairings apart: repeating K/V in blocks of 16 channels pairs query block j of a
        # head with another block of the right KV head (it coincides with ours only when d = 16 or r = 1).
        wrong = _blockwise_linear_attention(q, k, v, W_O, n_heads, n_kv, d, pairing="channel16")
        assert rel_err(wrong, expect) > 0.1


def test_mamba1_heads_read_only_their_own_kv_head():
    """Perturbing W_K / W_V rows of KV head 1 changes only the outputs of query heads 2 and 3 (r = 2)."""
    student, _ = mamba1_hybrid(attn_layers=[3], n_heads=4, n_kv=2)
    mixer = student.model.layers[0].mamba
    mixer.gated = False
    captured = {}
    mixer.out_proj.register_forward_hook(lambda m, inp, out: captured.__setitem__("y", inp[0].detach().clone()))
    h = torch.randn(1, 9, hidden_for(4), generator=torch.Generator().manual_seed(1))
    d = student.config.head_dim
    with torch.no_grad():
        mixer(h)
        y0 = captured["y"].view(1, 9, 4, d)
        s = mixer.in_proj_slices()
        for part in ("x", "B"):
            mixer.in_proj.weight[s[part].start + d: s[part].start + 2 * d] += 0.5  # KV head 1
        mixer(h)
        y1 = captured["y"].view(1, 9, 4, d)
    changed = (y1 - y0).abs().amax(dim=(0, 1, 3))
    assert torch.all(changed[:2] == 0) and torch.all(changed[2:] > 1e-4)


def test_mamba1_head_dim_must_be_multiple_of_d_state(tmp_path, capsys):
    teacher_dir = save_teacher(tmp_path / "t", n_heads=8, n_kv=2)  # hidden 64 -> head dim 8
    r = run_cli(["convert", teacher_dir, "--mixer", "mamba1", "--output", tmp_path / "o"], capsys)
    assert r.code == 2 and r.err.count("\n") == 1 and "head dim (8)" in r.err and "--mixer mamba2" in r.err
    assert not (tmp_path / "o").exists()


def test_convert_cli_mamba1_summary_and_reload(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    teacher_dir = save_teacher(tmp_path / "t", n_heads=4, n_kv=2, hidden=hidden_for(4))
    out = tmp_path / "hybrid"
    r = run_cli(["convert", teacher_dir, "--mixer", "mamba1", "--ratio", "0.5", "--output", out, "--json",
                 "--dtype", "float32"], capsys)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["mixer"] == "mamba1" and summary["mamba_layers"] == [0, 2]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.mixer == "mamba1"
    assert type(model.model.layers[0].mamba).__name__ == "Mamba1Mixer"
    # the convert summary's fixed state equals what the cache allocates (float32 model -> 4-byte conv state)
    state_bytes = sum(t.numel() * t.element_size() for i in (0, 2)
                      for t in model.model.layers[i].mamba.allocate_state(1, torch.float32, "cpu").values())
    assert summary["state_memory"]["hybrid_fixed_state_bytes_per_sequence"] == state_bytes
    # loading keeps the saved tensors: nothing (random dt_proj, fresh z/dt rows) is re-initialised at load
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    loaded = model.state_dict()
    assert {k for k in saved if ".mamba." in k} >= {"model.layers.0.mamba.dt_proj.bias", "model.layers.0.mamba.A_log"}
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    assert torch.allclose(model.model.layers[0].mamba.A_log[0], torch.log(torch.arange(1.0, 17.0)))


# --- selective scan references ----------------------------------------------------------------------------------
def random_scan_inputs(b=2, l=37, dim=32, g=4, n=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, dim, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, dim, generator=gen, dtype=dtype) - 1.0)
    A = -torch.rand(dim, n, generator=gen, dtype=dtype) * 8 - 0.1
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(dim, generator=gen, dtype=dtype)
    s0 = torch.randn(b, dim, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("seqlen", [1, 16, 37])
def test_chunked_selective_scan_equals_sequential_float64(chunk, seqlen):
    inputs = random_scan_inputs(l=seqlen, seed=chunk * 100 + seqlen)
    assert_chunked_scan_matches_sequential(selective_scan_sequential_ref, selective_scan_chunked_ref, inputs, chunk,
                                           [None, inputs[-1]])


def test_chunked_scan_is_stable_under_strong_decay():
    """Decays of exp(-2000) within one chunk: only products of decays appear, so nothing overflows."""
    x, dt, A, B, C, D, s0 = random_scan_inputs(l=40, seed=9)
    dt = dt * 50 + 5
    y_ref, s_ref = selective_scan_sequential_ref(x, dt, A, B, C, D, initial_state=s0)
    y, s = selective_scan_chunked_ref(x.float(), dt, A, B, C, chunk_size=40, D=D, initial_state=s0)
    assert torch.isfinite(y).all() and rel_err(y.double(), y_ref) <= 1e-5
    assert rel_err(s.double(), s_ref) <= 1e-5


def test_chunked_scan_backward_equals_sequential_and_checkpointing_is_exact():
    inputs = random_scan_inputs(b=1, l=23, dim=16, g=2, seed=4)
    grads = []
    for fn in ("sequential", "chunked", "checkpointed"):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        x, dt, A, B, C, D, s0 = leaves
        if fn == "sequential":
            y, s = selective_scan_sequential_ref(x, dt, A, B, C, D, initial_state=s0)
        else:
            y, s = selective_scan_chunked_ref(x, dt, A, B, C, chunk_size=6, D=D, initial_state=s0,
                                              checkpoint_chunks=fn == "checkpointed")
        w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
        ((y * w).sum() + s.pow(2).sum()).backward()
        grads.append([t.grad for t in leaves])
    for other in grads[1:]:
        for g_ref, g in zip(grads[0], other):
            assert rel_err(g, g_ref) <= 1e-10


def test_step_reads_the_group_of_its_channel():
    x, dt, A, B, C, D, s0 = random_scan_inputs(l=1, dim=32, g=4)
    state, y = selective_state_step_ref(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    c = 13  # channels 8..15 form group 1
    h = s0[:, c] * torch.exp(dt[:, 0, c, None] * A[c]) + (dt[:, 0, c] * x[:, 0, c])[:, None] * B[:, 0, 1]
    assert torch.allclose(state[:, c], h)
    assert torch.allclose(y[:, c], (h * C[:, 0, 1]).sum(-1) + D[c] * x[:, 0, c])
    assert not torch.equal(state, s0)  # the input state is left untouched, a new one returned


def test_ops_are_registered_and_cpu_uses_the_reference():
    from mamballama_cli import ops

    for op in ("selective_scan", "selective_state_step"):
        assert op in ops.REFERENCES
        assert ops.dispatch(op, torch.device("cpu"))[0] == "torch-ref"
    ops._load_fast()
    names = {op: [impl.name for impl in ops.FAST[op]] for op in ("selective_scan", "selective_state_step")}
    assert names["selective_scan"][:2] == ["mamba_ssm-cuda", "torch-chunked"]
    assert names["selective_state_step"] == ["mamba_ssm-triton"]
    if not torch.cuda.is_available():
        assert ops.FAST["selective_scan"][0].probe() == (False, "no CUDA device")


# --- the hybrid with Mamba-1 layers --------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_layers,n_heads,n_kv", [((1, 3), h, kv) for h, kv in GQA] + [((), 4, 2)])
def test_mamba1_cached_step_by_step_equals_parallel_forward(attn_layers, n_heads, n_kv):
    student, _ = mamba1_hybrid(attn_layers=attn_layers, n_heads=n_heads, n_kv=n_kv, chunk=8)
    prompt = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_steps, tokens, cache = decode_with_cache(student, prompt, 16)
        # a multi-token continuation from the cache (chunked prefill) also continues the state
        extra = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(2))
        tokens = torch.cat([tokens, extra], 1)
        logits_steps.append(student(extra, past_key_values=cache, use_cache=True).logits)
        cached = torch.cat(logits_steps, 1)
        parallel = student(tokens).logits
    assert (cached - parallel).abs().max().item() <= 1e-4
    assert torch.equal(cached.argmax(-1), parallel.argmax(-1))
    assert cache.seqlen == tokens.shape[1]
    assert cache.mamba[0]["ssm"].shape == (2, n_heads * student.config.head_dim, 16)


def test_mamba1_left_padded_batch_equals_individual_sequences():
    student, _ = mamba1_hybrid()
    assert_left_padding_changes_nothing(student, new_tokens=10)


def test_mamba1_gradients_flow_through_every_parameter():
    student, _ = mamba1_hybrid()
    student.train()
    ids = torch.randint(0, 96, (2, 20))
    student(ids, labels=ids).loss.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert student.model.layers[0].mamba.A_log.grad.abs().sum() > 0


# --- speculative decoding ----------------------------------------------------------------------------------------
def test_selective_replay_equals_sequential_per_row():
    """Replaying n_replay[row] old steps then running new ones equals the plain recurrence over the kept prefix
    of the old window followed by the new steps, row by row; states land in the given buffers."""
    from mamballama_cli.ops.selective_scan import selective_replay_ref

    x, dt, A, B, C, D, s0 = random_scan_inputs(b=3, l=9, seed=11)
    W, counts = 5, torch.tensor([0, 3, 5])
    old, new = slice(0, W), slice(W, 9)
    state_out, final_out = torch.empty_like(s0), torch.empty_like(s0)
    y, replayed, final = selective_replay_ref(s0, x[:, old], dt[:, old], B[:, old], counts, x[:, new], dt[:, new],
                                              B[:, new], C[:, new], A, D, state_out=state_out, final_out=final_out)
    assert replayed is state_out and final is final_out
    for row, n in enumerate(counts.tolist()):
        keep = list(range(n)) + list(range(W, 9))
        r = slice(row, row + 1)
        y_ref, s_ref = selective_scan_sequential_ref(x[r, keep], dt[r, keep], A, B[r, keep], C[r, keep], D, s0[r])
        _, s_mid = selective_scan_sequential_ref(x[r, :n], dt[r, :n], A, B[r, :n], C[r, :n], D, s0[r])
        assert rel_err(y[r], y_ref[:, n:]) <= 1e-10
        assert rel_err(final[r], s_ref) <= 1e-10
        assert rel_err(replayed[r], s_mid) <= 1e-10


def test_speculative_greedy_equals_plain_greedy_with_mamba1_layers():
    import copy

    from mamballama_cli.generation.speculative import speculative_generate
    from mamballama_cli.models.cache import HybridCache
    from mamballama_cli.models.mamba1 import Mamba1Window

    target, _ = mamba1_hybrid(attn_layers=(1, 3), n_heads=4, n_kv=2)
    # A Mamba-1 draft that agrees with the target about half the time: accepted, rejected and bonus tokens all
    # occur, and the draft's own Mamba-1 layers roll back too.
    draft = copy.deepcopy(target)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for i in (0, 2):
            w = draft.model.layers[i].mamba.out_proj.weight
            w.add_(0.02 * torch.randn(w.shape, generator=gen))
    prompt = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(2))
    n_new = 24
    with torch.no_grad():
        plain = target.generate(prompt, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    for k, d in ((3, draft), (2, target)):
        res = speculative_generate(target, d, prompt, k=k, max_new_tokens=n_new)
        assert [res.tokens[r] for r in range(2)] == plain[:, 6:].tolist()
        if d is draft:
            assert 0.0 < res.stats.acceptance_rate < 1.0
            assert res.stats.rounds < n_new - 1  # some rounds produced more than one token
        else:
            assert res.stats.acceptance_rate == 1.0
    cache = HybridCache(target, 1, max_length=8)
    assert isinstance(target.model.layers[0].mamba.inference_state(cache, window=4), Mamba1Window)


# --- the commands accept a Mamba-1 hybrid -------------------------------------------------------------------------
def test_distill_sft_dpo_eval_accept_a_mamba1_hybrid(tmp_path, capsys):
    from pathlib import Path

    data = Path(__file__).parent / "data"
    teacher = save_teacher(tmp_path / "t", n_heads=4, n_kv=2, hidden=hidden_for(4))
    hybrid = tmp_path / "h"
    assert run_cli(["convert", teacher, "--mixer", "mamba1", "--output", hybrid, "--dtype", "float32"],
                   capsys).code == 0
    small = ["--steps", "1", "--seq-len", "64", "--micro-batch-size", "2"]
    model = hybrid
    for cmd, extra in (("distill", ["--teacher", teacher, "--data", data / "chat_train.jsonl"]),
                       ("sft", ["--data", data / "chat_train.jsonl"]),
                       ("dpo", ["--data", data / "pairs.jsonl", "--max-prompt-length", "32"])):
        out = tmp_path / cmd
        r = run_cli([cmd, model, *extra, *small, "--output", out, "--json"], capsys)
        assert r.code == 0, (cmd, r.err[-2000:])
        assert json.loads((out / "config.json").read_text())["mixer"] == "mamba1", cmd
        model = out
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    r = run_cli(["eval", model, "--teacher", teacher, "--tasks", "perplexity", "--ppl-data", text,
                 "--ppl-max-length", 64, "--ppl-max-tokens", 128, "--output", tmp_path / "eval"], capsys)
    assert r.code == 0, r.err[-2000:]
    assert "| perplexity |" in r.out
