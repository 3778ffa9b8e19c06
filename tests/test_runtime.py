"""The inference protocol (models/step.py) and the one layer walk (models/runtime.py) on CPU.

Per mixer: T tokens stepped one at a time, one T-token window step and the parallel forward give the same
outputs and the same states. The runtime: its decode walk and its window walk give the model's own logits
on tiny random hybrids, Mamba-2 and Mamba-1, with and without attention layers.
"""

import pytest
import torch

from helpers import StandInGraph, tiny_hybrid
from mamballama_cli.models.cache import HybridCache
from mamballama_cli.models.runtime import Runtime
from mamballama_cli.models.step import OpTable, Step

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


def hybrid(mixer: str, attn_layers=(1, 3)):
    """``mixer``: mamba2, mamba1, or mamba2-nogate (Mamba-2 without the z projection, convert --no-gate)."""
    # Mamba-1 needs a head dim that is a multiple of its d_state (16): 4 heads of 32
    hidden = 128 if mixer == "mamba1" else 64
    overrides = {"mamba_gate": False} if mixer == "mamba2-nogate" else None
    model, _ = tiny_hybrid(attn_layers=attn_layers, mixer=mixer.split("-")[0], hidden=hidden, seed=2,
                           overrides=overrides)
    if overrides:
        m = model.model.layers[0].mamba
        assert m.in_proj.out_features == m.conv_dim + m.n_heads and m.out_proj.in_features == m.d_inner
    return model.eval()


def ids(n, batch=2, seed=0):
    return torch.randint(3, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def layer_input(model, n, batch=2, seed=0):
    """A plausible input of a layer's mixer: normalised random hidden states (batch, n, hidden)."""
    h = torch.randn(batch, n, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return model.model.layers[0].input_layernorm(h)


# --- each mixer: one token at a time == one window step == the parallel forward -----------------------------
@pytest.mark.parametrize("mixer", ["mamba2", "mamba1", "mamba2-nogate"])
def test_recurrent_mixer_steps_equal_the_parallel_forward(mixer):
    model = hybrid(mixer)
    m = model.model.layers[0].mamba
    P, T, b = 7, 5, 2
    x = layer_input(model, P + T, b)
    with torch.no_grad():
        # the parallel forward over prompt + new tokens, from zeros: outputs and final state
        full_state = m.allocate_state(b, torch.float32, "cpu")
        want = m(x, full_state)[:, P:]

        # the prompt in parallel into a cache, then T decode steps in place
        cache = HybridCache(model, b, max_length=P + T)
        m(x[:, :P], cache.mamba_state(m.layer_idx))
        cache.seqlen = P
        windowed = m.inference_state(cache, window=T + 1, keep_live=True)  # loaded before the decode steps
        windowed.load(cache)
        state = m.inference_state(cache)
        assert state is cache.mamba_state(m.layer_idx)
        one = OpTable("cpu")
        steps = torch.stack([m.step(x[:, P + t], state, Step(one)) for t in range(T)], 1)

        # one window step of all T tokens, from the same prompt state
        no_replay = torch.zeros(b, dtype=torch.long)
        window = m.step(x[:, P:], windowed, Step(one, window=True, keep=no_replay, rebase=True))
        live = windowed.live.clone()
        # the next rebase keeping all T replays them into the checkpoint (before its own token: any will do)
        m.step(x[:, :1], windowed, Step(one, window=True, keep=torch.full((b,), T), rebase=True))

    assert rel(steps, want) < TOL and rel(window, want) < TOL
    for name in ("ssm", "conv"):
        assert rel(state[name], full_state[name]) < TOL
    assert rel(live, full_state["ssm"]) < TOL
    assert rel(windowed.ckpt, full_state["ssm"]) < TOL


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1", "mamba2-nogate"])
def test_window_grows_by_continue_steps_and_rolls_back(mixer):
    """A draft's window: tokens appended one at a time from the live state, then cut back to a prefix."""
    model = hybrid(mixer)
    m = model.model.layers[2].mamba
    P, b, keep = 6, 1, 2
    x = layer_input(model, P + 4 + 2, b, seed=1)
    one = OpTable("cpu")
    with torch.no_grad():
        cache = HybridCache(model, b, max_length=32)
        m(x[:, :P], cache.mamba_state(m.layer_idx))
        win = m.inference_state(cache, window=4, keep_live=True)
        win.load(cache)
        zero = torch.zeros(b, dtype=torch.long)
        outs = [m.step(x[:, P:P + 1], win, Step(one, window=True, keep=zero, rebase=True))]
        for j in range(1, 4):
            outs.append(m.step(x[:, P + j:P + j + 1], win, Step(one, window=True, keep=zero, rebase=False, wlen=j)))
        with pytest.raises(RuntimeError, match="replay window holds 4 tokens"):
            m.step(x[:, :1], win, Step(one, window=True, keep=zero, rebase=False, wlen=4))
        # keep the first two tokens of the window, then two new ones
        nxt = m.step(x[:, P + 4:], win, Step(one, window=True, keep=torch.full((b,), keep), rebase=True))
        want_steps = m(x[:, :P + 4])[:, P:]
        kept = torch.cat([x[:, :P + keep], x[:, P + 4:]], 1)
        want_next = m(kept)[:, -2:]
    assert rel(torch.cat(outs, 1), want_steps) < TOL
    assert rel(nxt, want_next) < TOL


def test_attention_decode_and_window_steps_equal_the_parallel_forward():
    model = hybrid("mamba2")
    attn = model.model.layers[1].self_attn
    P, T, b, cap = 7, 4, 2, 16
    x = layer_input(model, P + T, b, seed=3)
    positions = torch.arange(P + T)[None].expand(b, -1)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(positions, torch.float32)
        want = attn(x, cos, sin, None, None)[:, P:]
        tables = model.model.rotary_emb(torch.arange(cap)[None], torch.float32)
        tab_cos, tab_sin = tables[0][0].contiguous(), tables[1][0].contiguous()
        outs = {}
        for window in (False, True):
            cache = HybridCache(model, b, max_length=cap)
            attn(x[:, :P], cos[:, :P], sin[:, :P], None, cache)  # the prompt's K/V
            state = attn.inference_state(cache, window=T if window else 0)
            if window:
                step = Step(OpTable("cpu"), window=True, pos=torch.tensor(P), cos=tab_cos, sin=tab_sin,
                            keep=torch.zeros(b, dtype=torch.long))
                outs[window] = attn.step(x[:, P:], state, step)
            else:
                got = []
                for t in range(T):
                    pos = torch.tensor([P + t])
                    step = Step(OpTable("cpu"), pos=pos, length=pos + 1, cos=tab_cos, sin=tab_sin)
                    got.append(attn.step(x[:, P + t], state, step))
                outs[window] = torch.stack(got, 1)
            assert torch.equal(cache.key[1][:, :, P + T:], torch.zeros_like(cache.key[1][:, :, P + T:]))
    assert rel(outs[False], want) < TOL and rel(outs[True], want) < TOL


# --- the runtime's walk: the model's own logits ---------------------------------------------------------------
@pytest.mark.parametrize("mixer,attn_layers", [("mamba2", (1, 3)), ("mamba2", ()), ("mamba1", (2,)),
                                               ("mamba1", ()), ("mamba2-nogate", (1, 3))])
def test_runtime_decode_and_window_walks_equal_the_model(mixer, attn_layers):
    model = hybrid(mixer, attn_layers)
    P, T, b = 6, 5, 2
    seq = ids(P + T, b, seed=4)
    with torch.no_grad():
        want = model(seq).logits  # (b, P + T, vocab)

        rt = Runtime(model, b, P + T)
        first = rt.prefill(seq[:, :P])
        assert rel(first, want[:, P - 1]) < TOL
        pos = torch.tensor([P])
        step = rt.step(pos=pos)
        got = []
        for t in range(T - 1):  # feed token P + t, get the logits at position P + t
            step.length = pos + 1
            got.append(rt.walk(seq[:, P + t], step))
            pos.add_(1)
        assert rel(torch.stack(got, 1), want[:, P:P + T - 1]) < TOL
        assert all(p.state is rt.cache.mamba_state(i) for i, p in enumerate(rt.layers) if i not in attn_layers)

        rtw = Runtime(model, b, P + T + 1, window=T)
        rtw.prefill(seq[:, :P])
        wstep = rtw.step(pos=torch.tensor(P), keep=torch.zeros(b, dtype=torch.long), rebase=True)
        assert wstep.window and len(rtw.windows) == model.config.num_hidden_layers - len(attn_layers)
        logits = rtw.walk(seq[:, P:], wstep)
    assert rel(logits, want[:, P:]) < TOL


@pytest.mark.parametrize("mixer,attn_layers", [("mamba2", (1, 3)), ("mamba1", (2,))])
def test_chunked_prefill_equals_the_whole_prompt_at_once(mixer, attn_layers):
    """The prompt read in pieces (each continuing from the cache the last one wrote) gives the model's logits,
    the same cache, and the same decode and speculative-window steps after it."""
    from mamballama_cli.generation.fast import StaticDecoder

    model = hybrid(mixer, attn_layers)
    P, T, b = 11, 4, 2
    seq = ids(P + T, b, seed=5)
    with torch.no_grad():
        want = model(seq).logits
        whole = Runtime(model, b, P + T, prefill_chunk=P)
        ref_first = whole.prefill(seq[:, :P])
        for chunk in (1, 3, 5):
            rt = Runtime(model, b, P + T, prefill_chunk=chunk)
            first = rt.prefill(seq[:, :P])
            assert rel(first, want[:, P - 1]) < TOL and rel(first, ref_first) < TOL, chunk
            for i in range(model.config.num_hidden_layers):
                if i in attn_layers:
                    assert rel(rt.cache.key[i], whole.cache.key[i]) < TOL and rel(rt.cache.value[i], whole.cache.value[i]) < TOL
                else:
                    for k, v in rt.cache.mamba_state(i).items():
                        assert rel(v, whole.cache.mamba_state(i)[k]) < TOL, (chunk, i, k)
            rtw = Runtime(model, b, P + T + 1, window=T, prefill_chunk=chunk)  # replay windows load from it
            rtw.prefill(seq[:, :P])
            wstep = rtw.step(pos=torch.tensor(P), keep=torch.zeros(b, dtype=torch.long), rebase=True)
            assert rel(rtw.walk(seq[:, P:], wstep), want[:, P:]) < TOL, chunk
        if mixer != "mamba2":  # the static decoder runs Mamba-2 mixers
            return
        greedy = [StaticDecoder(model, b, P + 8, capture=False, prefill_chunk=c) for c in (None, 2)]
        outs = []
        for dec in greedy:
            dec.prefill(seq[:, :P])
            dec.decode(6)
            outs.append(dec.tokens_so_far())
    assert torch.equal(outs[0], outs[1])


def test_prefill_chunk_defaults_and_bad_values():
    from types import SimpleNamespace

    from mamballama_cli.models.runtime import auto_prefill_chunk

    llama8b = SimpleNamespace(hidden_size=4096, intermediate_size=14336)
    assert auto_prefill_chunk(llama8b, 1) == 4096
    chunk = auto_prefill_chunk(llama8b, 24)  # the batch of the 32K crash: 24 x 32,768 x 4,096 > 2^31
    assert chunk % 256 == 0 and 256 <= chunk < 4096 and 24 * chunk * 16384 <= 1 << 30
    assert auto_prefill_chunk(llama8b, 100_000) == 256
    with pytest.raises(ValueError, match="prefill chunk 0"):
        Runtime(hybrid("mamba2"), 1, 8, prefill_chunk=0)


def test_runtime_resolves_each_op_once_per_device():
    model = hybrid("mamba2")
    rt = Runtime(model, 1, 16)
    rt.prefill(ids(4, 1))
    pos = torch.tensor([4])
    rt.walk(ids(1, 1)[:, 0], rt.step(pos=pos, length=pos + 1))
    assert set(rt.fns.backends) >= {"add_rmsnorm", "gemv", "add_rmsnorm_gemv", "add_rmsnorm_gemv_swiglu",
                                    "add_rmsnorm_gemv_conv", "ssm_step_gated", "rope_kv_write", "decode_attention"}
    assert set(rt.fns.backends.values()) == {"torch-ref"}  # CPU: the references


@pytest.mark.parametrize("tie", [True, False])
def test_cpu_runtime_stores_wide_projections_column_major_and_checkpoints_stay_usual(tie, tmp_path):
    """On a CPU the runtime stores [gate; up], [q; k; v], in_proj, lm_head... transposed (a one-token GEMM reads
    them twice as fast); values, outputs, state_dict and saved checkpoints are those of the usual layout."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny_hybrid(tie=tie, seed=5)
    seq = ids(9, 2, seed=6)
    with torch.no_grad():
        before = model(seq).logits
    keys = list(model.state_dict())
    Runtime(model, 2, 16)
    layer = model.model.layers[0]
    assert layer.mamba.in_proj.weight.stride(0) == 1 and model.lm_head.weight.stride(0) == 1
    assert layer.mlp.gate_proj.weight.stride(0) == 1  # a view into the column-major [gate; up]
    assert layer.mlp.down_proj.weight.is_contiguous()  # narrower out than in: row-major reads faster
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.allclose(model(seq).logits, before, atol=1e-5)
    state = model.state_dict()
    assert list(state) == keys and all(t.is_contiguous() for t in state.values())
    model.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path)(seq).logits, before, atol=1e-5)


@pytest.mark.parametrize("gqa", [False, True])
def test_lower_right_attention_in_bounded_blocks_equals_the_masked_attention(gqa, monkeypatch):
    """A later prefill piece's attention (queries the last Lq of Lk positions) goes through in blocks of queries
    whose scores stay under a budget: the same result as one masked SDPA call."""
    import torch.nn.functional as F

    from mamballama_cli.models import attention_masks

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 13, 16, generator=gen)
    k, v = (torch.randn(2, 2 if gqa else 8, 40, 16, generator=gen) for _ in range(2))
    qi = torch.arange(13)[:, None] + 27
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=(torch.arange(40)[None] <= qi)[None, None], scale=0.2,
                                          enable_gqa=gqa)
    monkeypatch.setattr(attention_masks, "SCORES_BUDGET", 2 * 8 * 40 * 3)  # blocks of 3 queries
    got = attention_masks.lower_right_attention(q, k, v, 0.2, gqa)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert attention_masks.attention_mask_4d(13, 40, None, None, "cpu") is attention_masks.LOWER_RIGHT


_VIEWS = {"view", "_unsafe_view", "split", "split_with_sizes", "slice", "select", "t", "transpose", "expand",
          "as_strided", "unsqueeze", "squeeze", "permute", "detach", "alias", "reshape", "unbind", "narrow",
          "empty", "empty_like", "empty_strided"}


def _walk_launches(model, window: int, monkeypatch):
    """What one walk would launch on a GPU, counted on CPU: each call of an op of the runtime's table (and of the
    gated norm, which the Mamba mixers dispatch themselves) is one launch; every other aten op outside those
    calls that is not a view or an allocation would be a launch too ("stray")."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from mamballama_cli import ops

    counts, stray, depth = Counter(), Counter(), [0]

    class Stray(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not depth[0] and name not in _VIEWS:
                stray[name] += 1
            return func(*args, **(kwargs or {}))

    def counted(name, fn):
        def call(*a, **k):
            counts[name] += 1
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
        return call

    rt = Runtime(model, 1, 32, window=window)
    rt.prefill(ids(8, 1))
    names = (["rope_kv_write_window", "window_attention", "add_rmsnorm_gemv_spec_conv", "ssm_replay_gated"] if window
             else ["add_rmsnorm_gemv_conv", "conv_update_inplace", "ssm_step_gated", "rope_kv_write",
                   "decode_attention"])
    for name in list(rt.fns.resolve(names)):  # every op of the table, the walk's own ones included
        rt.fns[name] = counted(name, rt.fns[name])
    monkeypatch.setattr(ops, "rmsnorm_gated", counted("rmsnorm_gated", ops.rmsnorm_gated))
    if window:
        new, step = torch.tensor([[5, 6, 7, 8, 9]]), rt.step(pos=torch.tensor([8]), keep=torch.tensor([0]))
    else:
        new, step = torch.tensor([5]), rt.step(pos=torch.tensor([8]), length=torch.tensor([9]))
    with torch.no_grad(), Stray():
        rt.walk(new, step)
    return counts, stray


@pytest.mark.parametrize("window", [0, 5])
def test_a_walk_launches_its_ops_and_nothing_else(window, monkeypatch):
    """Launch count of one step, pinned (a GPU step is bound by its launches at small sizes): per layer the input
    norm + the mixer's first projection in one op, the mixer's own ops and its output projection, then the
    norm + [gate; up] + SwiGLU op and down_proj; one norm + lm_head at the end; nothing else but the embedding,
    and in a verify window one flip of the slot that every Mamba-2 layer's replay op writes its window inputs
    into (the copies after each replay are gone)."""
    model = hybrid("mamba2")
    n = model.config.num_hidden_layers
    n_attn = len(model.config.attn_layers)
    n_mamba = n - n_attn
    counts, stray = _walk_launches(model, window, monkeypatch)
    want = {"gemv": 2 * n, "add_rmsnorm_gemv_swiglu": n}
    # a Mamba-2 layer's norm, in_proj and conv are one op, in a window as at one token (ops/triton_gemv_conv.py)
    if window:
        want |= {"add_rmsnorm_gemv": n_attn + 1, "add_rmsnorm_gemv_spec_conv": n_mamba,
                 "ssm_replay_gated": n_mamba, "rope_kv_write_window": n_attn, "window_attention": n_attn}
    else:
        want |= {"add_rmsnorm_gemv": n_attn + 1, "add_rmsnorm_gemv_conv": n_mamba, "ssm_step_gated": n_mamba,
                 "rope_kv_write": n_attn, "decode_attention": n_attn}
    assert dict(counts) == want
    assert dict(stray) == ({"embedding": 1, "bitwise_xor_": 1} if window else {"embedding": 1})


# --- prompt pieces through the walk (Runtime.read_on): what the forward reads, without its host cost ----------
@pytest.mark.parametrize("mixer,attn_layers,sliding", [("mamba2", (1, 3), None), ("mamba1", (2,), None),
                                                       ("mamba2-nogate", (1, 3), None), ("mamba2", (0, 2), 4),
                                                       ("mamba2", (), None)])
def test_prompt_pieces_through_the_walk_equal_the_forward(mixer, attn_layers, sliding):
    """A prompt read whole through the walk's pieces (cold), and its last part read on from a prefix the forward
    read (a prefix cache's next turn): the forward's logits, the same K/V and Mamba states, and the decode step
    after it gives the model's next logits (sliding-window attention: the pieces mask their window too). At most 8
    tokens a piece: 17 cold = 8 + 8 + 1, 11 resumed = 8 + 2 + 1."""
    model = hybrid(mixer, attn_layers)
    if sliding:
        model.config.sliding_window = sliding
        for i in attn_layers:
            model.model.layers[i].self_attn.sliding_window = sliding
    P, n, b = 6, 11, 2
    seq = ids(P + n + 1, b, seed=7)
    with torch.no_grad():
        want = model(seq).logits
        ref = Runtime(model, b, 32)
        ref.prefill(seq[:, :P + n])
        for cold in (True, False):
            rt = Runtime(model, b, 32, pieces="walk")
            rt.piece_max = 8
            if cold:
                got = rt.prefill(seq[:, :P + n])
            else:
                rt.pieces = "forward"
                rt.prefill(seq[:, :P])
                rt.pieces = "walk"
                got = rt.prefill(seq[:, P:P + n], resume=True)
            assert rt.cache.seqlen == P + n
            assert rel(got, want[:, P + n - 1]) < TOL, cold
            for i in range(model.config.num_hidden_layers):
                if i in attn_layers:
                    assert rel(rt.cache.key[i][:, :, :P + n], ref.cache.key[i][:, :, :P + n]) < TOL
                    assert rel(rt.cache.value[i][:, :, :P + n], ref.cache.value[i][:, :, :P + n]) < TOL
                else:
                    for k, v in rt.cache.mamba_state(i).items():
                        assert rel(v, ref.cache.mamba_state(i)[k]) < TOL, (cold, i, k)
            if sliding:  # the decode step has no sliding window (the static decoder refuses such models)
                continue
            pos = torch.tensor([P + n])
            nxt = rt.walk(seq[:, P + n], rt.step(pos=pos, length=pos + 1))
            assert rel(nxt, want[:, P + n]) < TOL, cold


def test_piece_lengths_and_the_longest_piece():
    from types import SimpleNamespace

    from mamballama_cli.models.runtime import PIECE_SCORES, piece_lengths, piece_max

    assert piece_lengths(100, 64) == [64, 32, 4]
    assert piece_lengths(300, 128) == [128, 128, 32, 8, 4]
    assert piece_lengths(7, 256) == [4, 2, 1] and piece_lengths(256, 256) == [256] and piece_lengths(0, 8) == []
    for n in range(1, 70):
        lengths = piece_lengths(n, 16)
        assert sum(lengths) == n and all(t & (t - 1) == 0 and t <= 16 for t in lengths)
        assert len(set(lengths) - {16}) == len([t for t in lengths if t != 16])  # each shorter length once
    llama8b = SimpleNamespace(num_attention_heads=32)
    assert piece_max(llama8b, 4096 + 136) == 256  # a 4K chat: the longest piece the cap allows
    assert piece_max(llama8b, 32768) == 64 and 64 * 32 * 32768 <= PIECE_SCORES  # 32K: its scores bounded
    assert piece_max(llama8b, 1 << 22) == 16  # never below 16
    assert piece_max(llama8b, 4096 + 136, batch_size=4) == 64  # every row's scores count (123 fit: 64)
    # never past the buffer: a piece graph's warm-up writes K/V from position 0 (an H100 found an index past a
    # 200-token buffer when every length up to 256 was recorded)
    assert piece_max(llama8b, 43) == 32 and piece_max(llama8b, 8) == 8 and piece_max(llama8b, 1) == 1


def test_pieces_bad_value_and_where_the_forward_stays():
    model = hybrid("mamba2")
    with pytest.raises(ValueError, match="pieces='fast': give one of forward, walk, graph"):
        Runtime(model, 1, 8, pieces="fast")
    assert Runtime(model, 1, 8, window=3, pieces="walk").pieces == "forward"  # speculative windows: the forward
    rt = Runtime(model, 1, 40, pieces="walk")
    rt.prefill(ids(20, 1))
    with pytest.raises(RuntimeError, match="20 cached \\+ 21 new tokens: the cache holds 40"):
        rt.prefill(ids(21, 1), resume=True)


def test_piece_graph_bookkeeping_with_a_stand_in_graph_on_cpu(monkeypatch):
    """read_on's "graph" branch on a CPU: capture_graph replaced by a stand-in whose recording runs nothing that
    stays (its warm-ups' changes to the Mamba states are undone, as the real one's are) and whose replay reruns the
    recorded call into the recorded output. Each length is recorded once and replayed after, its ids copied in and
    its position read from ``piece_pos``: the eager walk's values."""
    from mamballama_cli.models import runtime as rtmod

    recorded = []

    def capture(fn, device, warmup=2, before=None, pool=None):
        for _ in range(warmup):
            fn()
        before()
        recorded.append(pool)
        return StandInGraph.record(fn, before)

    monkeypatch.setattr(rtmod, "capture_graph", capture)
    model = hybrid("mamba2")
    seq = ids(40, 1, seed=9)
    with torch.no_grad():
        want = model(seq).logits
        walk, graph = Runtime(model, 1, 64, pieces="walk"), Runtime(model, 1, 64, pieces="graph")
        for rt in (walk, graph):
            rt.piece_max = 16
        for a, b in ((0, 13), (13, 29), (29, 40)):  # 13 = 8 + 4 + 1; 16; 8 + 2 + 1
            outs = [rt.prefill(seq[:, a:b], resume=a > 0) for rt in (walk, graph)]
            assert rel(outs[1], outs[0]) < 1e-6 and rel(outs[1], want[:, b - 1]) < TOL
    assert sorted(graph.piece_graphs) == [1, 2, 4, 8, 16] and recorded == [None] + ["pool"] * 4
    for i, state in graph.cache.mamba.items():
        for k, t in state.items():
            assert rel(t, walk.cache.mamba[i][k]) < 1e-6


def test_piece_graphs_recorded_in_inference_mode_serve_calls_outside_it(monkeypatch):
    """`serve` records the piece graphs under torch.inference_mode; a later read under no_grad alone still writes
    the recorded ids buffer (a tensor made in inference mode could not be written outside it)."""
    from mamballama_cli.models import runtime as rtmod

    monkeypatch.setattr(rtmod, "capture_graph", lambda fn, device, warmup=2, before=None, pool=None:
                        StandInGraph.record(fn, before))
    model = hybrid("mamba2")
    rt = Runtime(model, 1, 32, pieces="graph")
    with torch.inference_mode():
        rt.warm_piece(4)
    with torch.no_grad():
        got = rt.prefill(ids(4, 1, seed=2))
        want = model(ids(4, 1, seed=2)).logits[:, -1]
    assert rel(got, want) < TOL


def test_copy_row_moves_one_rows_prefix_and_state_and_nothing_else():
    """HybridCache.copy_row (a prefix cache's restore, a slot's copy-in; one _foreach_copy_ call): row 1 of a
    two-row cache takes row 0 of another cache's first 5 positions of K/V and its whole Mamba state; row 0 and the
    positions from 5 on keep what they held."""
    model = hybrid("mamba2")
    src, dst = HybridCache(model, 1, max_length=12), HybridCache(model, 2, max_length=12)
    gen = torch.Generator().manual_seed(3)
    for cache in (src, dst):
        for t in [*cache.key.values(), *cache.value.values(), *(x for s in cache.mamba.values() for x in s.values())]:
            t.copy_(torch.randn(t.shape, generator=gen))
    before = {id(t): t.clone() for t in [*dst.key.values(), *dst.value.values()]}
    before_state = {(i, k): t.clone() for i, s in dst.mamba.items() for k, t in s.items()}
    dst.copy_row(src, 0, 1, 5)
    for d, s in ((dst.key, src.key), (dst.value, src.value)):
        for i in d:
            assert torch.equal(d[i][1, :, :5], s[i][0, :, :5])
            assert torch.equal(d[i][1, :, 5:], before[id(d[i])][1, :, 5:]) and torch.equal(d[i][0], before[id(d[i])][0])
    for i, state in dst.mamba.items():
        for k, t in state.items():
            assert torch.equal(t[1], src.mamba[i][k][0]) and torch.equal(t[0], before_state[(i, k)][0])
