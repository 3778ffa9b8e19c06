"""Speculative decoding built for recurrent state (design.md section 4).

A round: the draft proposes K tokens one at a time; the target verifies all of them in one call on K+1
tokens (the last committed token plus the K drafts); standard lossless acceptance keeps a prefix of the
drafts and adds one token of the target's own (a correction, or a bonus when all K were accepted).

The target needs to forget rejected tokens. Attention layers write K+1 K/V entries and move the length
back. A Mamba layer cannot un-absorb a token, so each one keeps (the replay scheme):

* ``ckpt``: its SSM state at the start of the last window, the last position known to be correct;
* the per-step SSM inputs of that window (post-conv x, raw dt, B);
* a conv buffer: the ``d_conv - 1`` conv inputs before the window followed by the window's own.

The next call first replays the steps accepted last round from ``ckpt`` (elementwise, no GEMMs, the op
``ssm_replay``), stores the result as the new checkpoint, then runs the new steps. Rejection costs nothing
when it happens. The same object serves hybrid drafts, whose window grows one token at a time over a
round ("continue" steps, from a ``live`` state) and is rolled back the same way.

Runners share one small protocol: ``prefill(ids) -> last logits``, ``extend(ids, rebase) -> logits`` and
``commit(r)`` (of the tokens fed since the last rebase, the first r are correct). Mixers plug in through
:func:`register_replay_layer` (see docs/speculative.md for the per-mixer protocol).
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli import ops
from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.generation.sampling import SamplingConfig, probabilities
from mamballama_cli.models.cache import HybridCache
from mamballama_cli.models.rope import apply_rotary
from mamballama_cli.ops.replay import ssm_replay
from mamballama_cli.ops.verify_ref import VERIFY_REFERENCES  # noqa: F401  (registers the verify ops)


# --------------------------------------------------------------------------------------------------------
# Per-mixer replay layers
# --------------------------------------------------------------------------------------------------------
# factory(mixer, batch_size, window, dtype, device, keep_live) -> object with
#     load(cache_state: dict) -> None                      state after prefill, from HybridCache.mamba_state(i)
#     extend(hidden, keep_t, rebase: bool, wlen: int) -> Tensor   (batch, T, hidden) -> (batch, T, hidden)
REPLAY_LAYERS: dict[type, Callable] = {}


def register_replay_layer(mixer_cls: type, factory: Callable) -> None:
    """Teach the speculative runner a mixer (Mamba-1 registers itself this way)."""
    REPLAY_LAYERS[mixer_cls] = factory


def make_replay_layer(mixer, batch_size: int, window: int, dtype, device, keep_live: bool):
    for cls in type(mixer).__mro__:
        if cls in REPLAY_LAYERS:
            return REPLAY_LAYERS[cls](mixer, batch_size, window, dtype, device, keep_live)
    hook = getattr(mixer, "replay_layer", None)  # duck-typed alternative: the mixer builds its own
    if callable(hook):
        return hook(batch_size, window, dtype, device, keep_live)
    raise MamballamaError(
        f"speculative decoding does not know the mixer {type(mixer).__name__}; register it with "
        "mamballama_cli.generation.speculative.register_replay_layer (docs/speculative.md)"
    )


class Mamba2ReplayLayer:
    """Replay state of one Mamba-2 layer: checkpoint, last window's SSM inputs, conv buffer.

    ``window`` is the most tokens one window holds (K+1). Buffers are allocated once (CUDA graphs). The
    layer uses the mixer's own parameters and pieces (in_proj, conv1d weights, A_log, dt_bias, D, output),
    with one conv over [buffered prefix, new inputs] (the op ``spec_conv``, which also writes the conv
    buffer) and the window written by a single copy.
    """

    def __init__(self, mixer, batch_size: int, window: int, dtype, device, keep_live: bool):
        m = mixer
        self.mixer, self.window, self.keep_live = m, window, keep_live
        b, w1 = batch_size, m.d_conv - 1
        self.w1 = w1
        self.d_xB = m.d_x + m.d_B
        self.ckpt = torch.zeros(b, m.n_heads, m.headdim, m.d_state, dtype=torch.float32, device=device)
        self.live = torch.zeros_like(self.ckpt) if keep_live else None  # state after the whole window
        # post-conv [x | B] and raw dt (before dt_bias and softplus) of every step of the window
        self.win_xB = torch.zeros(b, window, self.d_xB, dtype=dtype, device=device)
        self.win_dt = torch.zeros(b, window, m.n_heads, dtype=dtype, device=device)
        # conv inputs (pre-conv x, B, C): w1 before the window, then the window's own
        self.conv = torch.zeros(b, m.conv_dim, w1 + window, dtype=dtype, device=device)
        self._no_shift = torch.zeros(b, dtype=torch.long, device=device)  # continue steps: no replay, no shift
        self.spec_conv = ops.dispatch("spec_conv", device)[1]
        with torch.no_grad():
            self.A = -torch.exp(m.A_log.float())  # (nheads,): fixed while decoding
            self.conv_w = m.conv1d.weight[:, 0, :]  # (conv_dim, width)

    def load(self, cache_state: dict) -> None:
        self.ckpt.copy_(cache_state["ssm"])
        if self.live is not None:
            self.live.copy_(cache_state["ssm"])
        self.conv[:, :, : self.w1].copy_(cache_state["conv"])

    def _window(self, xB: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, dt, B) views of window-shaped [x | B] and dt buffers, as the replay op reads them."""
        m = self.mixer
        b, steps, _ = xB.shape
        return (xB[..., : m.d_x].view(b, steps, m.n_groups, m.headdim), dt,
                xB[..., m.d_x :].view(b, steps, m.n_groups, m.d_state))

    def extend(self, hidden: Tensor, keep_t: Tensor, rebase: bool, wlen: int) -> Tensor:
        """Run T new tokens. ``rebase``: first replay ``keep_t`` (batch,) steps of the old window from the
        checkpoint, which becomes the new checkpoint, and start a new window; else append to the window
        (which then holds ``wlen`` entries) from the live state."""
        m = self.mixer
        b, T, _ = hidden.shape
        zxbcdt = m.in_proj(hidden)
        z, xbc_in, dt_raw = torch.split(zxbcdt, [m.d_z, m.conv_dim, m.n_heads], dim=-1)
        if rebase:
            # the w1 conv inputs before the new window start keep_t entries into the buffer
            start, n_replay, offset, shift = self.ckpt, keep_t, 0, keep_t
            old = self._window(self.win_xB, self.win_dt)
        else:
            if wlen + T > self.window:
                raise RuntimeError(f"replay window holds {self.window} tokens; {wlen + T} were fed")
            start, n_replay, offset, shift = self.live, self._no_shift, wlen, self._no_shift
            old = self._window(self.win_xB[:, :0], self.win_dt[:, :0])
        # Conv over [buffered prefix, new inputs], the buffer rewritten from ``offset`` (it holds only conv
        # inputs, which the replay does not read): post (b, T, conv_dim) = silu(conv) of [x | B | C].
        post = self.spec_conv(xbc_in, self.conv, shift, offset, self.conv_w, m.conv1d.bias, m.activation)
        x, _, B = self._window(post[..., : self.d_xB], dt_raw)
        C = post[..., self.d_xB :].view(b, T, m.n_heads, m.d_state)
        y, _, _ = ssm_replay(
            start, *old, n_replay, x, dt_raw, B, C, self.A, m.dt_bias, m.D,
            state_out=self.ckpt if rebase else None, final_out=self.live,
        )
        # Only now overwrite the window: the replay above read the old one.
        self.win_xB[:, offset : offset + T].copy_(post[..., : self.d_xB])
        self.win_dt[:, offset : offset + T].copy_(dt_raw)
        return m.output(y.reshape(b, T, m.d_z), z)


def _register_builtin_layers() -> None:
    from mamballama_cli.models.mixers import Mamba2Mixer

    register_replay_layer(Mamba2Mixer, Mamba2ReplayLayer)


_register_builtin_layers()


# --------------------------------------------------------------------------------------------------------
# Runners: the speculative state of one model
# --------------------------------------------------------------------------------------------------------
class HybridRunner:
    """Speculative state of a MamballamaForCausalLM (target, or a draft that is a hybrid).

    Attention K/V live in a HybridCache allocated for ``max_length`` tokens (static buffers); the replay
    state of each Mamba layer lives in its replay layer. ``start`` is the committed position where the
    current window begins, ``wlen`` how many tokens the window holds, ``keep`` how many of them are correct.
    :meth:`capture` (CUDA) records every step shape used in a CUDA graph before the prefill; ``static``
    runs the very same computation eagerly (positions and replay counts read from device tensors), which
    is how the CPU tests check the graph path. Attention layers use the window ops ``rope_kv_write_window``
    and ``window_attention`` (fused kernels on CUDA; query t attends to positions [0, pos + t] whatever
    the buffer length); sliding-window layers keep a masked SDPA over the buffer.
    """

    def __init__(self, model, batch_size: int, max_length: int, window: int, keep_live: bool = False,
                 static: bool = False):
        from mamballama_cli.generation.fast import _fuse

        self.model, self.base = model, model.model
        ref = model.lm_head.weight
        self.dtype, self.device = ref.dtype, ref.device
        self.batch_size, self.window = batch_size, window
        self.cache = HybridCache(model, batch_size, dtype=self.dtype, device=self.device, max_length=max_length)
        self.capacity = max_length
        self.eps = model.config.rms_norm_eps
        self.layers = {
            i: make_replay_layer(layer.mamba, batch_size, window, self.dtype, self.device, keep_live)
            for i, layer in enumerate(self.base.layers)
            if not layer.is_attention
        }
        self.has_mamba = bool(self.layers)
        # One GEMM for [gate; up] and one for [q; k; v] (the static decoder's fused views: the model's
        # parameters and checkpoint layout are unchanged).
        self.gate_up = [_fuse(layer.mlp, ["gate_proj", "up_proj"]) for layer in self.base.layers]
        self.qkv = {i: _fuse(layer.self_attn, ["q_proj", "k_proj", "v_proj"])
                    for i, layer in enumerate(self.base.layers) if layer.is_attention}
        self.add_norm = ops.dispatch("add_rmsnorm", self.device)[1]
        self.swiglu = ops.dispatch("swiglu", self.device)[1]
        self.rope_window = ops.dispatch("rope_kv_write_window", self.device)[1]
        self.window_attention = ops.dispatch("window_attention", self.device)[1]
        with torch.no_grad():  # the model's own rotary tables, indexed by position on the device
            cos, sin = self.base.rotary_emb(torch.arange(max_length, device=self.device)[None], self.dtype)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # (capacity, rotary_dim)
        self.start = self.wlen = self.keep = 0
        self.pos_t = torch.zeros((), dtype=torch.long, device=self.device)
        self.keep_t = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple, tuple] = {}
        self.static = static  # attend over the whole static buffer with device-side positions, as graphs do
        self.calls = 0

    # --- the walk over layers (eager, and what the graphs capture) -----------------------------------
    def _attention(self, i: int, attn, x: Tensor, pos_t: Tensor, idx: Tensor, kv_len: int | None) -> Tensor:
        b, T, _ = x.shape
        nh, nkv, hd = attn.n_heads, attn.n_kv, attn.head_dim
        qkv = F.linear(x, *self.qkv[i])
        kb, vb = self.cache.key[i], self.cache.value[i]
        if attn.sliding_window is None:
            # RoPE + K/V write at pos_t + t, then causal attention over [0, pos_t + t]: kv_len is not needed
            q = self.rope_window(qkv, self.cos, self.sin, kb, vb, pos_t, nh, nkv)  # (b, T, nh, hd)
            out = self.window_attention(q, kb, vb, pos_t, attn.scaling)
            return attn.o_proj(out.reshape(b, T, nh * hd))
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(b, T, nh, hd).transpose(1, 2)
        k = k.view(b, T, nkv, hd).transpose(1, 2)
        v = v.view(b, T, nkv, hd).transpose(1, 2)
        cos = self.cos.index_select(0, idx)[None].expand(b, T, -1)
        sin = self.sin.index_select(0, idx)[None].expand(b, T, -1)
        q, k = apply_rotary(q, k, cos, sin)
        kb.index_copy_(2, idx, k.to(kb.dtype))
        vb.index_copy_(2, idx, v.to(vb.dtype))
        L = kb.shape[2] if kv_len is None else kv_len  # graphs attend over the whole buffer, masked
        kj = torch.arange(L, device=x.device)[None, :]
        mask = kj <= idx[:, None]  # (T, L): a new token sees everything up to itself
        if attn.sliding_window is not None:
            mask = mask & (kj > idx[:, None] - attn.sliding_window)
        out = F.scaled_dot_product_attention(
            q, kb[:, :, :L].to(q.dtype), vb[:, :, :L].to(q.dtype), attn_mask=mask[None, None],
            scale=attn.scaling, enable_gqa=nkv != nh,
        )
        return attn.o_proj(out.transpose(1, 2).reshape(b, T, nh * hd))

    def _walk(self, ids: Tensor, pos_t: Tensor, keep_t: Tensor, rebase: bool, wlen: int,
              kv_len: int | None) -> Tensor:
        """Logits (batch, T, vocab) of T new tokens at positions pos_t .. pos_t + T - 1.

        The same computation as DecoderLayer.forward (residual adds fused with the next RMSNorm), with the
        speculative state in place of the cache.
        """
        base = self.base
        T = ids.shape[1]
        idx = pos_t + torch.arange(T, device=ids.device)  # (T,)
        hidden = F.embedding(ids, base.embed_tokens.weight)  # (batch, T, hidden)
        residual = None
        for i, layer in enumerate(base.layers):
            x, residual = self.add_norm(hidden, residual, layer.input_layernorm.weight, self.eps)
            if layer.is_attention:
                hidden = self._attention(i, layer.self_attn, x, pos_t, idx, kv_len)
            else:
                hidden = self.layers[i].extend(x, keep_t, rebase, wlen)
            x, residual = self.add_norm(hidden, residual, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            hidden = mlp.down_proj(self.swiglu(F.linear(x, *self.gate_up[i])))
        x, _ = self.add_norm(hidden, residual, base.norm.weight, self.eps)
        return self.model.lm_head(x)

    # --- the runner protocol ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """Run the prompt through the model's own forward; return the last position's logits (batch, vocab)."""
        if ids.shape[1] + self.window > self.capacity:
            raise MamballamaError(f"prompt of {ids.shape[1]} tokens leaves no room in a {self.capacity}-token cache")
        self.cache.reset()
        out = self.model(ids, past_key_values=self.cache, use_cache=True)
        for i, layer in self.layers.items():
            layer.load(self.cache.mamba_state(i))
        self.start, self.wlen, self.keep = ids.shape[1], 0, 0
        self.calls += 1
        return out.logits[:, -1]

    @torch.inference_mode()
    def extend(self, ids: Tensor, rebase: bool) -> Tensor:
        """Feed T new tokens; ``rebase`` starts a new window after the ``keep`` correct tokens of the last."""
        T = ids.shape[1]
        if rebase:
            self.start += self.keep
            self.wlen = 0
        pos = self.start + self.wlen
        if pos + T > self.capacity:
            raise MamballamaError(f"speculative cache of {self.capacity} tokens is full; raise max_length")
        key = self._graph_key(T, rebase, self.wlen)
        if key in self.graphs:
            logits = self._replay_graph(key, ids, pos)
        elif self.static:  # exactly what a graph records, run eagerly (tests the graph path on CPU)
            self.pos_t.fill_(pos)
            self.keep_t.fill_(self.keep)
            logits = self._walk(ids, self.pos_t, self.keep_t, rebase, self.wlen, kv_len=None)
        else:
            logits = self._walk(ids, torch.tensor(pos, device=self.device), self._keep_tensor(), rebase,
                                self.wlen, kv_len=pos + T)
        self.wlen += T
        self.keep = self.wlen
        self.cache.seqlen = self.start + self.wlen
        self.calls += 1
        return logits

    def commit(self, r: int) -> None:
        """Of the tokens fed since the last rebase, the first ``r`` are part of the output."""
        if not 0 <= r <= self.wlen:
            raise ValueError(f"commit({r}) with {self.wlen} tokens in the window")
        self.keep = r
        self.cache.seqlen = self.start + r

    def _keep_tensor(self) -> Tensor:
        return torch.full((self.batch_size,), self.keep, dtype=torch.long, device=self.device)

    # --- CUDA graphs -------------------------------------------------------------------------------------
    def _graph_key(self, T: int, rebase: bool, wlen: int) -> tuple:
        # Without Mamba layers the mode and window offset only move the position, which is an input.
        return (T, rebase, wlen) if self.has_mamba else (T,)

    @torch.inference_mode()
    def capture(self, shapes: list[tuple[int, bool, int]], warmup: int = 2) -> None:
        """Capture one CUDA graph per (T, rebase, wlen) step shape. Call before :meth:`prefill`: the
        warm-up runs scribble on the state, which the prefill then overwrites."""
        if self.device.type != "cuda":
            raise MamballamaError("CUDA graphs need the model on a CUDA device")
        for T, rebase, wlen in shapes:
            key = self._graph_key(T, rebase, wlen)
            if key in self.graphs:
                continue
            ids = torch.zeros(self.batch_size, T, dtype=torch.long, device=self.device)
            self.pos_t.fill_(wlen)
            self.keep_t.fill_(0)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # compiles kernels, runs autotuning, settles allocations
                    self._walk(ids, self.pos_t, self.keep_t, rebase, wlen, kv_len=None)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._walk(ids, self.pos_t, self.keep_t, rebase, wlen, kv_len=None)
            self.graphs[key] = (graph, ids, logits)
        torch.cuda.synchronize()

    def _replay_graph(self, key: tuple, ids: Tensor, pos: int) -> Tensor:
        graph, ids_buf, logits = self.graphs[key]
        ids_buf.copy_(ids)
        self.pos_t.fill_(pos)
        self.keep_t.fill_(self.keep)
        graph.replay()
        return logits.clone()  # the buffer is overwritten by the next replay


def _cache_kwarg(model) -> str:
    """transformers renamed the cache argument of forward: past_key_values (5.17) -> cache (later)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TransformersRunner:
    """Any transformers causal LM with a croppable DynamicCache (e.g. a shrunk Llama draft)."""

    def __init__(self, model, batch_size: int, max_length: int, window: int, keep_live: bool = True):
        from transformers import DynamicCache

        self.model = model
        self.device = next(model.parameters()).device
        try:
            self.cache = DynamicCache(config=model.config)
        except TypeError:  # pragma: no cover - older signature
            self.cache = DynamicCache()
        self.kw = _cache_kwarg(model)
        self.window_start = 0
        self.calls = 0

    def _forward(self, ids: Tensor) -> Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self.kw: self.cache})
        self.calls += 1
        return out.logits

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        return self._forward(ids)[:, -1]

    @torch.inference_mode()
    def extend(self, ids: Tensor, rebase: bool) -> Tensor:
        if rebase:
            self.window_start = self.cache.get_seq_length()
        return self._forward(ids)

    def commit(self, r: int) -> None:
        # crop(-n) removes n tokens in every release since 5.17 (5.24 refuses the old absolute form).
        remove = self.cache.get_seq_length() - (self.window_start + r)
        if remove > 0:
            self.cache.crop(-remove)


class RefeedRunner:
    """Fallback for models whose cache cannot be cut back: every call re-runs the kept tokens (slow, exact)."""

    def __init__(self, model, batch_size: int, max_length: int, window: int, keep_live: bool = True):
        self.model, self.ids, self.window_start, self.calls = model, None, 0, 0

    def _forward(self) -> Tensor:
        self.calls += 1
        return self.model(input_ids=self.ids, use_cache=False).logits

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        self.ids = ids
        return self._forward()[:, -1]

    @torch.inference_mode()
    def extend(self, ids: Tensor, rebase: bool) -> Tensor:
        if rebase:
            self.window_start = self.ids.shape[1]
        self.ids = torch.cat([self.ids, ids], dim=1)
        return self._forward()[:, -ids.shape[1]:]

    def commit(self, r: int) -> None:
        self.ids = self.ids[:, : self.window_start + r]


def is_hybrid(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "mamballama"


def as_hybrid(model):
    """An all-attention MamballamaForCausalLM sharing a Llama-family model's weights (no copy).

    The hybrid at 100% attention computes exactly what the teacher does, and gets the speculative
    runner's static cache and CUDA graphs. Returns None for families the converter does not know.
    """
    from mamballama_cli.convert.families import family_for
    from mamballama_cli.models.configuration import MamballamaConfig
    from mamballama_cli.models.modeling import MamballamaForCausalLM
    from mamballama_cli.models.rope import RotaryEmbedding

    try:
        family = family_for(model.config)
    except MamballamaError:
        return None
    kwargs = family.hybrid_config(model.config)
    kwargs["attn_layers"] = list(range(model.config.num_hidden_layers))
    cfg = MamballamaConfig(**kwargs)
    ref = next(model.parameters())
    with torch.device("meta"):
        hybrid = MamballamaForCausalLM(cfg)
    state = model.state_dict()
    missing, unexpected = hybrid.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or [k for k in unexpected if "rotary_emb" not in k]:
        return None
    if cfg.tie_word_embeddings:
        hybrid.lm_head.weight = hybrid.model.embed_tokens.weight
    hybrid.model.rotary_emb = RotaryEmbedding(cfg.rope_parameters, cfg.head_dim).to(ref.device)
    if any(p.is_meta for p in hybrid.parameters()):
        return None
    hybrid.generation_config = getattr(model, "generation_config", hybrid.generation_config)
    return hybrid.eval()


def make_runner(model, batch_size: int, max_length: int, window: int, keep_live: bool, kind: str = "auto",
                static: bool = False):
    """The runner for ``model``: HybridRunner for hybrids, else a croppable transformers cache, else re-feed."""
    if kind not in ("auto", "hybrid", "transformers", "refeed"):
        raise UsageError(f"runner kind {kind!r} is not one of auto, hybrid, transformers, refeed")
    if hasattr(model, "prefill") and hasattr(model, "extend") and hasattr(model, "commit"):
        return model  # already a runner (tests, plugins)
    if kind == "hybrid" and not is_hybrid(model):
        model = as_hybrid(model)
        if model is None:
            raise UsageError("--draft-runner hybrid: this draft's architecture has no hybrid equivalent; "
                             "use --draft-runner transformers")
    if kind == "refeed":
        return RefeedRunner(model, batch_size, max_length, window)
    if is_hybrid(model):
        if kind == "transformers":
            raise UsageError("--draft-runner transformers: a mamballama hybrid has no croppable transformers "
                             "cache; use auto")
        return HybridRunner(model, batch_size, max_length, window, keep_live=keep_live, static=static)
    if getattr(model, "_is_stateful", False):
        return RefeedRunner(model, batch_size, max_length, window)
    return TransformersRunner(model, batch_size, max_length, window)


# --------------------------------------------------------------------------------------------------------
# Acceptance (the distributions come from generation/sampling.py)
# --------------------------------------------------------------------------------------------------------
def draw(probs: Tensor, gen: torch.Generator | None) -> Tensor:
    """One sample per row: probs (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


def accept_greedy(drafts: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """drafts (b, K), target_logits (b, K+1, V) -> (accepted (b,), next token (b,)).

    Accept while the draft equals the target's argmax; the next token is the target's argmax right after.
    """
    best = target_logits.argmax(-1)  # (b, K+1)
    accepted = (drafts == best[:, :-1]).long().cumprod(-1).sum(-1)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


def accept_sampled(drafts: Tensor, q: Tensor, p: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Lossless rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    drafts (b, K) drawn from q (b, K, V); p (b, K+1, V) the target's processed distributions. Draft j is
    kept with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the next token is drawn from
    norm(max(0, p_j - q_j)); when all K are kept it is drawn from p_{K+1} (the bonus).
    Returns (accepted (b,), next token (b,)).
    """
    b, K = drafts.shape
    pd = p[:, :K].gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(b, K, generator=gen, device=p.device)
    keep = u * qd < pd  # u < p/q without dividing by a zero q
    accepted = keep.long().cumprod(-1).sum(-1)  # (b,)
    rows = torch.arange(b, device=p.device)
    at = accepted.clamp(max=K - 1)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # p == q leaves no residual mass; rejection then had probability 0, but guard the division anyway.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[rows, at])
    fix = torch.where((accepted == K)[:, None], p[:, K], residual)
    return accepted, draw(fix, gen)


def lockstep(accepted: Tensor, nxt: Tensor, drafts: Tensor) -> tuple[int, Tensor]:
    """Batched rows advance together by the smallest accepted count m: a row that kept more emits its
    (accepted) draft token at position m+1 instead. Each emitted token is still the output of that row's
    own lossless procedure at that position, decided without looking at it, so the output stays exact."""
    m = int(accepted.min())
    if m == int(accepted.max()):
        return m, nxt
    K = drafts.shape[1]
    ahead = accepted > m
    return m, torch.where(ahead, drafts[:, min(m, K - 1)], nxt)


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------
@dataclass
class SpecStats:
    k: int
    rounds: int = 0  # target verify calls
    drafted: int = 0
    accepted: int = 0
    produced: int = 0  # tokens out of verify calls, before truncation at max_new_tokens / a stop token
    new_tokens: int = 0
    prompt_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    draft_calls: int = 0
    target_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_call(self) -> float:
        return self.produced / self.rounds if self.rounds else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / dt if self.new_tokens > 1 and dt > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, tokens_per_call=self.tokens_per_call,
                 tokens_per_s=self.tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        # NaN (nothing drafted: the first token already stopped generation) is written as null
        return {k: ((round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass
class SpecResult:
    tokens: list[list[int]]  # new tokens per batch row
    stats: SpecStats
    text: str = ""
    extra: dict = field(default_factory=dict)


def _sync(device) -> None:
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    input_ids: Tensor,
    *,
    k: int = 4,
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    stop_tokens: list[int] | tuple[int, ...] = (),
    seed: int | None = None,
    cuda_graphs: bool | None = None,
    draft_runner: str = "auto",
    on_tokens: Callable[[list[int]], None] | None = None,
    static: bool = False,
) -> SpecResult:
    """Speculative decoding of ``target`` (a MamballamaForCausalLM, or any runner) with ``draft``.

    input_ids (batch, prompt_len): rows of one batch share the prompt length (no padding) and advance in
    lockstep. At temperature 0 the output equals the target's greedy decoding; when sampling it follows
    the target's processed distribution. ``on_tokens`` receives row 0's new tokens as they are accepted.
    ``cuda_graphs`` (default: on CUDA) captures the verify and draft steps; ``static`` runs the captured
    computation eagerly (what the CPU tests use to check it).
    """
    if k < 1:
        raise UsageError(f"-k {k}: the draft must propose at least one token per round")
    sampling = sampling or SamplingConfig()
    device = input_ids.device
    b, n_prompt = input_ids.shape
    window = k + 1
    max_length = n_prompt + max_new_tokens + 2 * window
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA device; drop it or use --device cuda")
    if draft_runner == "auto" and cuda_graphs and not is_hybrid(draft) and not hasattr(draft, "extend"):
        draft_runner = "hybrid" if as_hybrid(draft) is not None else "auto"

    t_runner = make_runner(target, b, max_length, window, keep_live=False, kind="auto", static=static)
    d_runner = make_runner(draft, b, max_length, window, keep_live=True, kind=draft_runner, static=static)
    if cuda_graphs:
        if isinstance(t_runner, HybridRunner):
            t_runner.capture([(window, True, 0)])
        if isinstance(d_runner, HybridRunner):
            shapes = [(1, True, 0), (2, True, 0)] + [(1, False, j) for j in range(1, k + 1)]
            d_runner.capture(shapes)

    gen = None
    if seed is not None:
        gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    stats = SpecStats(k=k, prompt_tokens=n_prompt)
    out: list[list[int]] = [[] for _ in range(b)]
    finished = torch.zeros(b, dtype=torch.bool, device=device)

    def pick(logits: Tensor) -> tuple[Tensor, Tensor | None]:
        if sampling.greedy:
            return logits.argmax(-1), None
        probs = probabilities(logits, sampling)
        return draw(probs, gen), probs

    def emit(tokens: Tensor) -> bool:
        """tokens (b, n) new for every row; returns True when generation is over."""
        nonlocal finished
        for row in range(b):
            if bool(finished[row]):
                continue
            for tok in tokens[row].tolist():
                if len(out[row]) >= max_new_tokens:
                    break
                out[row].append(tok)
                if stops.numel() and tok in stops.tolist():
                    finished[row] = True
                    break
            if len(out[row]) >= max_new_tokens:
                finished[row] = True
        if on_tokens is not None:
            on_tokens(out[0])
        return bool(finished.all())

    _sync(device)
    start = time.perf_counter()
    first_logits = t_runner.prefill(input_ids)
    d_runner.prefill(input_ids)
    last, _ = pick(first_logits)  # (b,) the first new token comes from the target itself
    done = emit(last[:, None])
    _sync(device)
    stats.time_to_first_token_s = time.perf_counter() - start
    pending = last[:, None]  # tokens the draft has not seen yet (1, or 2 after a full acceptance)

    while not done:
        # 1. Draft K tokens.
        drafts, qs = [], []
        logits = d_runner.extend(pending, rebase=True)[:, -1]
        fed_by_draft = pending.shape[1]
        for j in range(k):
            tok, q = pick(logits)
            drafts.append(tok)
            qs.append(q)
            if j < k - 1:
                logits = d_runner.extend(tok[:, None], rebase=False)[:, -1]
                fed_by_draft += 1
        d = torch.stack(drafts, dim=1)  # (b, K)

        # 2. Verify: the last committed token plus the K drafts, in one call.
        verify_ids = torch.cat([last[:, None], d], dim=1)  # (b, K+1)
        t_logits = t_runner.extend(verify_ids, rebase=True)
        if sampling.greedy:
            accepted, nxt = accept_greedy(d, t_logits)
        else:
            accepted, nxt = accept_sampled(d, torch.stack(qs, dim=1), probabilities(t_logits, sampling), gen)
        m, nxt = lockstep(accepted, nxt, d)

        # 3. Commit: the target keeps the last token and m drafts; the draft keeps what it fed correctly.
        t_runner.commit(m + 1)
        d_runner.commit(pending.shape[1] + min(m, k - 1))
        pending = torch.cat([d[:, k - 1 :], nxt[:, None]], dim=1) if m == k else nxt[:, None]
        last = nxt
        stats.rounds += 1
        stats.drafted += k * b
        stats.accepted += int(accepted.sum())
        stats.produced += m + 1
        done = emit(torch.cat([d[:, :m], nxt[:, None]], dim=1))

    _sync(device)
    stats.total_s = time.perf_counter() - start
    stats.new_tokens = len(out[0])
    stats.target_calls = getattr(t_runner, "calls", 0)
    stats.draft_calls = getattr(d_runner, "calls", 0)
    extra = {"cuda_graphs": bool(cuda_graphs), "draft_runner": type(d_runner).__name__,
             "target_runner": type(t_runner).__name__, "batch_size": b}
    return SpecResult(out, stats, extra=extra)


# --------------------------------------------------------------------------------------------------------
# The command's core: `mamballama generate TARGET --speculative --draft DRAFT`
# --------------------------------------------------------------------------------------------------------
@dataclass
class SpeculativeConfig:
    """Options of `generate --speculative` (the plain generate options plus these)."""

    target: str = ""
    draft: str = ""  # checkpoint dir, or a registered draft provider: NAME or NAME:ARG
    k: int = 4
    prompt: str = ""
    chat: bool = False
    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    cuda_graphs: bool | None = None  # None = on CUDA
    compare_plain: bool = True  # also time the target's plain decoding in the same run
    draft_runner: str = "auto"
    stats_json: str | None = None

    def validate(self) -> None:
        if not self.draft:
            raise UsageError("--speculative needs --draft DRAFT (a checkpoint directory or a draft provider name)")
        if self.k < 1:
            raise UsageError(f"-k {self.k}: the draft must propose at least one token per round; use -k 4")
        if self.k > 32:
            raise UsageError(f"-k {self.k} is larger than 32; acceptance falls geometrically, use -k 4 to 8")
        if self.draft_runner not in ("auto", "hybrid", "transformers", "refeed"):
            raise UsageError(f"--draft-runner {self.draft_runner!r} is not one of auto, hybrid, transformers, refeed")


def resolve_draft(spec: str):
    """("dir", spec) for a checkpoint directory (or 'default'), else ("provider", DraftSpec, arg) for a
    provider of the mamballama.drafts group named NAME[:ARG]. Cheap: call it before loading anything."""
    from pathlib import Path

    from mamballama_cli import plugins

    if Path(spec).expanduser().is_dir() or spec == "default":
        return ("dir", spec)
    name, _, arg = spec.partition(":")
    provider = plugins.drafts.get(name)
    if provider is None:
        known = ", ".join(plugins.drafts.names())
        raise UsageError(f"--draft {spec!r} is neither a checkpoint directory nor a draft provider ({known}); "
                         "pass a directory from `convert --draft-layers` or e.g. --draft self")
    return ("provider", provider, arg or None)


def load_draft(spec: str, target, target_path, dtype: str, device: str):
    """(model, tokenizer or None, description) for a --draft value (see :func:`resolve_draft`)."""
    from mamballama_cli.loading import load_causal_lm

    where = resolve_draft(spec)
    if where[0] == "dir":
        model, tok, _ = load_causal_lm(spec, dtype=dtype, device=device)
        return model, tok, f"path:{spec}"
    _, provider, arg = where
    model = provider.load(target, path=arg, arg=arg, target_path=str(target_path))
    if isinstance(model, tuple):
        model = model[0]
    ref = next(target.parameters())
    if hasattr(model, "to"):
        model = model.to(device=ref.device, dtype=ref.dtype).eval()
    return model, None, f"{provider.name}:{arg}" if arg else provider.name


def check_same_tokenizer(target_tok, draft_tok, target, draft) -> None:
    tv = getattr(target.config, "vocab_size", None)
    dv = getattr(getattr(draft, "config", None), "vocab_size", tv)
    if tv != dv:
        raise MamballamaError(f"the draft's vocabulary ({dv} tokens) differs from the target's ({tv}); a draft "
                              "must share the target's tokenizer")
    if target_tok is not None and draft_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab():
        raise MamballamaError("the draft's tokenizer differs from the target's; a draft must share the tokenizer")


def run_speculative(cfg: SpeculativeConfig, on_text: Callable[[str], None] | None = None) -> dict:
    """Load target and draft, decode speculatively (streaming text), optionally time plain decoding of the
    same prompt and length, and return the statistics."""
    from mamballama_cli.generation.plain import check_request, encode_prompt, generate
    from mamballama_cli.generation.result import TextStream, stop_token_ids
    from mamballama_cli.loading import load_causal_lm

    resolve_draft(cfg.draft)  # a bad --draft fails before any weights are read
    target, tok, target_path = load_causal_lm(cfg.target, dtype=cfg.dtype, device=cfg.device)
    if tok is None:
        raise MamballamaError(f"model {cfg.target!r} has no tokenizer files; convert it again or copy the teacher's")
    if not is_hybrid(target):
        # A plain Transformer target still works: run it through the same static-cache runner.
        converted = as_hybrid(target)
        if converted is None:
            raise MamballamaError(f"target {cfg.target!r} ({type(target).__name__}) is not a mamballama hybrid nor "
                                  "a Llama-family model; speculative decoding needs one of those as target")
        target = converted
    draft, draft_tok, draft_name = load_draft(cfg.draft, target, target_path, cfg.dtype, cfg.device)
    check_same_tokenizer(tok, draft_tok, target, draft)
    ids = encode_prompt(tok, cfg.prompt, cfg.chat, cfg.system).to(next(target.parameters()).device)
    check_request(target, ids.shape[1], cfg.max_new_tokens, "transformers")  # empty prompt, context length
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, seed=cfg.seed)
    stops = stop_token_ids(target, tok)
    stream = TextStream(tok, on_text)
    shown = [0]

    def on_tokens(tokens: list[int]) -> None:
        stream.push(tokens[shown[0]:])
        shown[0] = len(tokens)

    if ids.device.type == "cuda" and cfg.compare_plain:
        # Warm-up, as for the plain run below: the first call compiles the Triton kernels (tens of seconds),
        # which would otherwise sit inside the timed run and swamp the speedup.
        speculative_generate(target, draft, ids, k=cfg.k, max_new_tokens=2 * (cfg.k + 1), sampling=sampling,
                             stop_tokens=stops, seed=cfg.seed, cuda_graphs=cfg.cuda_graphs,
                             draft_runner=cfg.draft_runner)
    result = speculative_generate(
        target, draft, ids, k=cfg.k, max_new_tokens=cfg.max_new_tokens, sampling=sampling, stop_tokens=stops,
        seed=cfg.seed, cuda_graphs=cfg.cuda_graphs, draft_runner=cfg.draft_runner, on_tokens=on_tokens,
    )
    text = stream.finish()
    s = result.stats
    stats = {"mode": "speculative", "target": str(target_path), "draft": draft_name, **s.as_dict(), **result.extra,
             "sampling": asdict(sampling), "device": str(ids.device),
             "dtype": str(next(target.parameters()).dtype).replace("torch.", "")}
    if cfg.compare_plain:
        plain_cfg = replace(sampling, max_new_tokens=max(1, s.new_tokens))
        generate(target, tok, ids, SamplingConfig(max_new_tokens=2))  # warm-up: kernels compiled, caches hot
        plain = generate(target, tok, ids, plain_cfg)
        stats["plain"] = {"new_tokens": plain.new_tokens, "total_s": round(plain.total_s, 4),
                          "time_to_first_token_s": round(plain.time_to_first_token_s, 4),
                          "decode_tokens_per_s": round(plain.decode_tokens_per_s, 2),
                          "tokens_per_s": round(plain.new_tokens / plain.total_s, 2) if plain.total_s > 0 else None}
        if plain.new_tokens and s.new_tokens and plain.total_s > 0:
            plain_rate = plain.new_tokens / plain.total_s
            stats["speedup"] = round(s.tokens_per_s / plain_rate, 3)
            if math.isfinite(plain.decode_tokens_per_s) and math.isfinite(s.decode_tokens_per_s):
                stats["decode_speedup"] = round(s.decode_tokens_per_s / plain.decode_tokens_per_s, 3)
        if sampling.greedy:
            n = min(len(plain.token_ids), len(result.tokens[0]))
            stats["matches_plain_greedy"] = plain.token_ids[:n] == result.tokens[0][:n]
    stats["text"] = text
    return stats


def format_stats(stats: dict) -> str:
    def num(key, fmt):
        v = stats.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    # The target's calls are the prefill plus one verify call per round: the same count as target_calls in the
    # statistics JSON (tokens/call is per verify call, as tokens_per_call).
    line = (f"[speculative k={stats['k']}: {stats['new_tokens']} new tokens in {stats['target_calls']} target calls "
            f"(prefill + {stats['rounds']} verify); "
            f"acceptance {num('acceptance_rate', '.3f')}, {num('tokens_per_call', '.2f')} tokens/call (verify), "
            f"{num('tokens_per_s', '.1f')} tok/s")
    if "plain" in stats:
        line += (f"; plain {stats['plain']['tokens_per_s']} tok/s, speedup {stats.get('speedup', float('nan'))}x "
                 f"(decode only: {stats.get('decode_speedup', float('nan'))}x)")
    if "matches_plain_greedy" in stats:
        line += f"; greedy output {'matches' if stats['matches_plain_greedy'] else 'DIFFERS FROM'} plain decoding"
    return line + f"; {stats['device']} {stats['dtype']}]"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
