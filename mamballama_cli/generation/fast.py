"""Fast decoding of a hybrid: a static cache, the one-token step captured in a CUDA graph, sampling on device.

:class:`StaticDecoder` owns a preallocated :class:`~mamballama_cli.models.cache.HybridCache` (attention K/V of
a fixed capacity plus the Mamba conv windows and SSM states) and a handful of device tensors: the input
token, the write position, the emitted-token history and the per-row "finished" flags. Its decode step
reads and writes only those, so on CUDA it is captured once per batch size into a CUDA graph and replayed
for every token: no Python, no kernel launches and no host synchronisation per token.

The step walks the layers itself rather than calling the model's ``forward``, so that a layer costs few
kernels: fused residual-add + RMSNorm, one GEMM for [gate; up] and one for [q; k; v] (the module parameters
become views into one buffer, :func:`fuse_projections`, so the checkpoint layout is unchanged), SwiGLU, the
conv-window update, the whole Mamba-2 recurrence with D and the gated norm in one kernel, RoPE + K/V write
at the device-side position, and split-K attention over the static buffer. Each of these is an op with a
pure-PyTorch reference in :mod:`mamballama_cli.ops.decode` (the CPU path, run eagerly) and a Triton kernel in
:mod:`mamballama_cli.ops.triton_decode`.

The prompt goes through the model's own ``forward`` (the prefill uses the SSD chunk scan), writing the
same cache. On CPU the decoder runs the same step eagerly on the references; greedy output equals the
plain ``transformers.generate`` path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli import ops
from mamballama_cli.generation.result import GenerationResult, TextStream, stop_token_ids
from mamballama_cli.generation.sampling import SamplingConfig, sample
from mamballama_cli.ops.decode import DECODE_OPS  # registers the decode ops' references


# ================================================================================================
# Fused projections
# ================================================================================================
def _fuse(owner: torch.nn.Module, names: list[str]) -> tuple[Tensor, Tensor | None]:
    """One buffer holding the weights (and biases) of ``owner.<names>`` stacked by rows; the Linear
    parameters become views into it, so the model and its state_dict keep their layout and values."""
    key = "_mamballama_fused_" + "_".join(names)
    lins = [getattr(owner, n) for n in names]
    cached = owner.__dict__.get(key)
    if cached is not None:
        W, bias = cached
        start, ok = 0, True
        for lin in lins:
            ok = ok and lin.weight.data_ptr() == W[start].data_ptr() and lin.weight.dtype == W.dtype
            start += lin.weight.shape[0]
        if ok:
            return cached
    with torch.no_grad():
        W = torch.cat([lin.weight.data for lin in lins], dim=0)
        bias = None
        if any(lin.bias is not None for lin in lins):
            bias = torch.cat([lin.bias.data if lin.bias is not None
                              else W.new_zeros(lin.weight.shape[0]) for lin in lins])
        start = 0
        for lin in lins:
            rows = lin.weight.shape[0]
            lin.weight.data = W[start:start + rows]
            if lin.bias is not None:
                lin.bias.data = bias[start:start + rows]
            start += rows
    owner.__dict__[key] = (W, bias)  # a plain attribute: not a parameter, not in the state_dict
    return W, bias


def fuse_projections(model) -> None:
    """[gate; up] of every MLP and [q; k; v] of every attention layer into one buffer each (in place).

    A decode step then runs one GEMM where it ran two or three. Parameter names, shapes and values are
    unchanged (``save_pretrained`` writes the usual layout); moving the model with ``.to()`` un-shares the
    views, and the decoder then fuses again.
    """
    for layer in model.model.layers:
        _fuse(layer.mlp, ["gate_proj", "up_proj"])
        if layer.is_attention:
            _fuse(layer.self_attn, ["q_proj", "k_proj", "v_proj"])


# ================================================================================================
# The decoder
# ================================================================================================
def unsupported_reason(model) -> str | None:
    """None when :class:`StaticDecoder` can decode ``model``; else why not (the plain path is used)."""
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    if not isinstance(model, MamballamaForCausalLM):
        return f"{type(model).__name__} is not a mamballama hybrid"
    cfg = model.config
    if cfg.mixer != "mamba2":
        return f"mixer {cfg.mixer!r} (the static decoder runs Mamba-2 mixers)"
    if cfg.sliding_window is not None:
        return "sliding-window attention"
    if cfg.hidden_act not in ("silu", "swish"):
        return f"hidden_act {cfg.hidden_act!r}"
    return None


@dataclass
class _Layer:
    idx: int
    attention: bool
    ln1: Tensor
    ln2: Tensor
    gate_up_w: Tensor
    gate_up_b: Tensor | None
    down_w: Tensor
    down_b: Tensor | None
    module: torch.nn.Module  # self_attn or mamba
    qkv_w: Tensor | None = None
    qkv_b: Tensor | None = None
    conv_w: Tensor | None = None


class StaticDecoder:
    """Prefill + captured one-token decode steps for one batch size and one cache capacity.

    >>> dec = StaticDecoder(model, batch_size=1, max_length=prompt_len + max_new)
    >>> first = dec.prefill(input_ids)      # (batch,) sampled from the prompt's last logits
    >>> dec.decode(max_new - 1)             # more tokens; dec.tokens_so_far() -> (batch, n) int64

    ``capture`` defaults to True on CUDA (a CUDA graph of the step, recorded on the first prefill) and
    must be False elsewhere (the step then runs eagerly). Sampling parameters are fixed per decoder
    (they are baked into the graph). ``stop_ids`` finish a row; finished rows then repeat the first stop
    id. All rows share one prompt length (no padding).

    Prompts of unequal lengths go through ``forcing=True``: prefill the shortest length, and pass the rest of
    each longer prompt to :meth:`prefill` as forced tokens. While a row's step index is below its forced
    length, the step emits (and feeds back) the row's next prompt token instead of its sample, so after the
    forced steps every row continues exactly as if its whole prompt had been prefilled. Forced tokens never
    finish a row, even when one is a stop id (a chat template's end-of-turn, say).
    """

    def __init__(self, model, batch_size: int, max_length: int, sampling=None, stop_ids=(), capture=None,
                 forcing: bool = False):
        from mamballama_cli.models.cache import HybridCache

        why = unsupported_reason(model)
        if why:
            raise ValueError(f"the static decoder cannot run this model: {why}")
        cfg = model.config
        self.model = model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.sampling = sampling or SamplingConfig(temperature=0.0)
        self.capture = (self.device.type == "cuda") if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA-graph capture needs the model on a CUDA device")
        self.eps = cfg.rms_norm_eps
        self.fns: dict[str, Callable] = {}
        self.backends: dict[str, str] = {}
        for op in DECODE_OPS:
            self.backends[op], self.fns[op] = ops.dispatch(op, self.device)

        fuse_projections(model)
        base = model.model
        self.embed_w = base.embed_tokens.weight
        self.norm_w = base.norm.weight
        self.lm_head_w = model.lm_head.weight
        self.layers: list[_Layer] = []
        for i, layer in enumerate(base.layers):
            gate_up_w, gate_up_b = _fuse(layer.mlp, ["gate_proj", "up_proj"])
            entry = _Layer(i, layer.is_attention, layer.input_layernorm.weight,
                           layer.post_attention_layernorm.weight, gate_up_w, gate_up_b, layer.mlp.down_proj.weight, layer.mlp.down_proj.bias,
                           layer.self_attn if layer.is_attention else layer.mamba)
            if layer.is_attention:
                entry.qkv_w, entry.qkv_b = _fuse(layer.self_attn, ["q_proj", "k_proj", "v_proj"])
            else:
                entry.conv_w = layer.mamba.conv1d.weight[:, 0, :]  # (conv_dim, width)
            self.layers.append(entry)

        self.cache = HybridCache(model, self.batch_size, dtype=self.dtype, device=self.device,
                                 max_length=self.max_length)
        with torch.no_grad():
            positions = torch.arange(self.max_length, device=self.device)[None]
            cos, sin = base.rotary_emb(positions, self.dtype)  # the model's own tables: identical rotations
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # (capacity, rotary_dim)
        dev, b = self.device, self.batch_size
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # where the next input token's K/V go
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)  # column of history to write next
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)  # input of the next step
        self.history = torch.zeros(b, self.max_length, dtype=torch.long, device=dev)
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)
        stops = [int(s) for s in stop_ids]
        self.stop = torch.tensor(stops, dtype=torch.long, device=dev) if stops else None
        self.pad_id = stops[0] if stops else 0
        # Forced tokens (graph-safe: fixed buffers the captured step reads); None keeps the step as it was.
        self.forced = torch.zeros(b, self.max_length, dtype=torch.long, device=dev) if forcing else None
        self.forced_len = torch.zeros(b, dtype=torch.long, device=dev) if forcing else None
        self.graph = None
        self.emitted = 0  # host mirror of step_idx

    @property
    def engine(self) -> str:
        return "static-graph" if self.capture else "static-eager"

    # --- one step ------------------------------------------------------------------------------------
    def _emit(self, nxt: Tensor) -> None:
        forcing = None
        if self.forced is not None:
            forcing = self.step_idx < self.forced_len  # (batch,): rows still reading their prompt
            nxt = torch.where(forcing, self.forced.index_select(1, self.step_idx)[:, 0], nxt)
        if self.stop is not None:
            nxt = torch.where(self.done, torch.full_like(nxt, self.pad_id), nxt)
            stopped = (nxt[:, None] == self.stop[None, :]).any(dim=-1)
            self.done |= stopped if forcing is None else stopped & ~forcing
        self.history.index_copy_(1, self.step_idx, nxt[:, None])
        self.tokens.copy_(nxt)
        self.step_idx.add_(1)

    def _attention(self, layer: _Layer, x: Tensor, length: Tensor) -> Tensor:
        attn = layer.module
        qkv = F.linear(x, layer.qkv_w, layer.qkv_b)  # (batch, (n_heads + 2 n_kv) * head_dim)
        k_cache, v_cache = self.cache.key[layer.idx], self.cache.value[layer.idx]
        q = self.fns["rope_kv_write"](qkv, self.cos, self.sin, k_cache, v_cache, self.pos, attn.n_heads, attn.n_kv)
        o = self.fns["decode_attention"](q, k_cache, v_cache, length, attn.scaling)  # (batch, n_heads, head_dim)
        return F.linear(o.reshape(x.shape[0], -1), attn.o_proj.weight, attn.o_proj.bias)

    def _mamba(self, layer: _Layer, x: Tensor) -> Tensor:
        m = layer.module
        b = x.shape[0]
        state = self.cache.mamba[layer.idx]
        zxbcdt = F.linear(x, m.in_proj.weight, m.in_proj.bias)  # (batch, d_in_proj)
        z, xbc, dt_raw = torch.split(zxbcdt, [m.d_z, m.conv_dim, m.n_heads], dim=-1)
        xbc = self.fns["conv_update_inplace"](xbc, state["conv"], layer.conv_w, m.conv1d.bias, m.activation)
        xs, Bs, Cs = torch.split(xbc, [m.d_x, m.d_B, m.d_C], dim=-1)
        gated = m.gated_norm
        y = self.fns["ssm_step_gated"](
            state["ssm"], xs.reshape(b, m.n_groups, m.headdim), Bs.reshape(b, m.n_groups, m.d_state),
            Cs.reshape(b, m.n_heads, m.d_state), dt_raw, m.dt_bias, m.A_log, m.D,
            z.reshape(b, m.n_heads, m.headdim) if gated else None, m.norm.weight if gated else None, m.eps,
        )  # (batch, n_heads * headdim)
        return F.linear(y.to(m.out_proj.weight.dtype), m.out_proj.weight, m.out_proj.bias)

    def _step(self) -> None:
        """Embed self.tokens at self.pos, run every layer, sample, emit; all in place (graph-safe)."""
        add_norm, swiglu = self.fns["add_rmsnorm"], self.fns["swiglu"]
        length = self.pos + 1
        hidden = F.embedding(self.tokens, self.embed_w)  # (batch, hidden)
        residual = None
        for layer in self.layers:
            x, residual = add_norm(hidden, residual, layer.ln1, self.eps)
            hidden = self._attention(layer, x, length) if layer.attention else self._mamba(layer, x)
            x, residual = add_norm(hidden, residual, layer.ln2, self.eps)
            hidden = F.linear(swiglu(F.linear(x, layer.gate_up_w, layer.gate_up_b)), layer.down_w, layer.down_b)
        x, _ = add_norm(hidden, residual, self.norm_w, self.eps)
        self._emit(sample(F.linear(x, self.lm_head_w), self.sampling))
        self.pos.add_(1)

    # --- state ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache.reset()
        for t in (self.pos, self.step_idx, self.tokens, self.history):
            t.zero_()
        if self.forced is not None:
            self.forced.zero_()
            self.forced_len.zero_()
        self.done.zero_()
        self.emitted = 0

    def _capture(self) -> None:
        # Warm up on a side stream (compiles the Triton kernels, creates cuBLAS handles), then record one
        # step. The warm-up writes garbage into the state; reset() clears it before the prompt is read.
        # It also draws random numbers when sampling: restore the generator so a seed set before the
        # first prefill gives the same tokens as on every later prefill.
        rng = torch.cuda.get_rng_state(self.device)
        self.reset()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph
        torch.cuda.set_rng_state(rng, self.device)
        self.reset()

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, forced: Tensor | None = None, forced_len: Tensor | None = None) -> Tensor:
        """Read the prompt (batch, prompt_len) into the cache; sample and return the first new token (batch,).

        With a decoder built with ``forcing=True``: ``forced`` (batch, F) holds the rest of each row's prompt
        and ``forced_len`` (batch,) how many of those F tokens the row has; the first ``forced_len[row]`` emitted
        tokens of the row are these (the returned first token too, for a row with any).
        """
        b, n = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"batch of {b} prompts, but this decoder was built for {self.batch_size}")
        if n + 1 > self.max_length:
            raise ValueError(f"prompt of {n} tokens leaves no room in a cache of {self.max_length}")
        if forced is not None:
            if self.forced is None:
                raise ValueError("forced tokens need a decoder built with forcing=True")
            if forced_len is None or forced.shape[0] != b or forced_len.shape != (b,):
                raise ValueError(f"forced tokens: expected forced (batch {b}, F) and forced_len ({b},)")
            if n + forced.shape[1] + 1 > self.max_length:
                raise ValueError(f"prompt of {n} + {forced.shape[1]} forced tokens leaves no room in a cache of "
                                 f"{self.max_length}")
        if self.capture and self.graph is None:
            self._capture()
        self.reset()
        if forced is not None:
            self.forced[:, : forced.shape[1]].copy_(forced)
            self.forced_len.copy_(forced_len)
        out = self.model(input_ids=input_ids.to(self.device), past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        first = sample(out.logits[:, -1], self.sampling)
        self.pos.fill_(n)
        self._emit(first)
        self.emitted = 1
        return first if self.forced is None else self.tokens.clone()

    @property
    def room(self) -> int:
        """Steps left before the cache is full."""
        return self.max_length - self.cache.seqlen

    @torch.no_grad()
    def decode(self, steps: int, on_tokens: Callable[[list[list[int]]], None] | None = None,
               sync_every: int | None = None) -> int:
        """Run up to ``steps`` steps after :meth:`prefill`; returns how many ran.

        The host synchronises only every ``sync_every`` steps (default 8 with a graph, else 1): then it
        passes the new tokens (one list per row) to ``on_tokens`` and stops once every row is finished.
        """
        if self.emitted == 0:
            raise RuntimeError("call prefill() before decode()")
        steps = min(int(steps), self.room)
        sync_every = sync_every or (8 if self.graph is not None else 1)
        shown = self.emitted
        ran = 0
        for i in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            self.cache.seqlen += 1
            self.emitted += 1
            ran += 1
            if (i + 1) % sync_every == 0 or i == steps - 1:
                if on_tokens is not None:
                    on_tokens(self.history[:, shown:self.emitted].tolist())
                    shown = self.emitted
                if self.stop is not None and bool(self.done.all()):
                    break
        return ran

    def tokens_so_far(self) -> Tensor:
        """(batch, emitted) int64: every token sampled since the prefill (finished rows padded)."""
        return self.history[:, : self.emitted]


# ================================================================================================
# generate() on the static decoder
# ================================================================================================
def get_decoder(model, batch_size: int, max_length: int, sampling, stop_ids, capture=None) -> StaticDecoder:
    """A decoder for this model, batch size and sampling, reused across calls while its cache is big enough
    (a captured graph is kept per batch size)."""
    key = (batch_size, sampling.temperature, sampling.top_p, sampling.top_k, tuple(stop_ids), capture)
    store = model.__dict__.setdefault("_mamballama_decoders", {})
    dec = store.get(key)
    if dec is None or dec.max_length < max_length or dec.device != model.lm_head.weight.device:
        store.pop(key, None)
        dec = None
        if model.lm_head.weight.is_cuda:
            torch.cuda.empty_cache()
        dec = StaticDecoder(model, batch_size, max_length, sampling, stop_ids, capture)
        store[key] = dec
    return dec


def static_capacity(n_prompt: int, max_new_tokens: int) -> int:
    """Cache capacity for a request, rounded up so that nearby prompt lengths reuse one captured graph."""
    return -(-(n_prompt + max_new_tokens) // 256) * 256


def static_cache_bytes(model, batch_size: int, capacity: int) -> int:
    """What a :class:`StaticDecoder` of ``capacity`` tokens allocates beyond the weights: the attention layers'
    K/V, the token history and the rotary tables (the Mamba state does not grow with the context)."""
    cfg = model.config
    elsize = model.lm_head.weight.element_size()
    n_attn = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_attention_layer(i))
    kv = 2 * n_attn * batch_size * cfg.num_key_value_heads * capacity * cfg.head_dim * elsize
    return kv + batch_size * capacity * 8 + 2 * capacity * cfg.head_dim * elsize


def available_bytes(device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: available RAM), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def generate_fast(model, tokenizer, input_ids: Tensor, sampling, on_text=None, capture=None):
    """Same contract as :func:`mamballama_cli.generation.plain.generate`, on the static decoder."""
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    stops = stop_token_ids(model, tokenizer)
    n_prompt = input_ids.shape[1]
    capacity = static_capacity(n_prompt, sampling.max_new_tokens)
    dec = get_decoder(model, input_ids.shape[0], capacity, sampling, stops, capture)
    stream = TextStream(tokenizer, on_text)
    start = time.perf_counter()
    first = dec.prefill(input_ids)
    stream.push(first[:1].tolist())  # one host sync: the first token is out
    ttft = time.perf_counter() - start
    if not (dec.stop is not None and bool(dec.done.all())):
        dec.decode(sampling.max_new_tokens - 1, on_tokens=lambda rows: stream.push(rows[0]))
    ids = dec.tokens_so_far()[0].tolist()
    if stops:  # drop the padding after the first stop token (transformers keeps that stop token)
        for i, t in enumerate(ids):
            if t in stops:
                ids = ids[: i + 1]
                break
    total = time.perf_counter() - start
    text = stream.finish()
    return GenerationResult(text, n_prompt, len(ids), ttft, total, ids, engine=dec.engine)
