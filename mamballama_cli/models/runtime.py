"""The one inference walk over a hybrid's layers, for T new tokens on static buffers.

:class:`Runtime` owns what a decode or verify step reads besides the weights: a
:class:`~mamballama_cli.models.cache.HybridCache` of a fixed capacity, the rotary tables of that capacity, the op
table of the device, and per layer the mixer's inference state (models/step.py). :meth:`Runtime.walk` is the
layer walk, the same computation as ``DecoderLayer.forward`` with each residual add fused into the next RMSNorm
and one GEMM for [gate; up]:

    embedding -> per layer: add + RMSNorm, mixer.step, add + RMSNorm, SwiGLU MLP -> add + final norm -> logits

Its users hold their own loop state: :class:`~mamballama_cli.generation.fast.StaticDecoder` (one token per
step, sampling, forced tokens, one captured graph) and the speculative
:class:`~mamballama_cli.generation.runners.HybridRunner` (windows of up to K+1 tokens with replay, one graph per
step shape). Both capture through :func:`capture_graph`. The prompt goes through the model's own ``forward``
(:meth:`Runtime.prefill`, the chunked scan), writing the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli.models.cache import HybridCache
from mamballama_cli.models.feature_draft import feature_inputs
from mamballama_cli.models.step import (NormedInput, OpTable, Step, column_major, contiguous_state_dict,
                                        fuse_linears)


def fuse_projections(model, column_major: bool = False) -> None:
    """[gate; up] of every MLP and [q; k; v] of every attention layer into one buffer each (in place).

    Parameter names, shapes and values are unchanged (``save_pretrained`` writes the usual layout)."""
    for layer in model.model.layers:
        fuse_linears(layer.mlp, ["gate_proj", "up_proj"], column_major)
        if layer.is_attention:
            fuse_linears(layer.self_attn, ["q_proj", "k_proj", "v_proj"], column_major)


def decode_layout(model) -> None:
    """Fuse the projections; on a CPU also store every projection whose output is at least as wide as its input
    column-major (:func:`~mamballama_cli.models.step.column_major`): [gate; up], [q; k; v], in_proj, lm_head...

    A one-token GEMM on a CPU core reads such a weight about twice as fast, and a decode step is mostly those.
    Shapes and values are unchanged, and so is ``state_dict()`` (it hands out contiguous copies of the
    transposed weights, so ``save_pretrained`` writes the usual layout). On CUDA only the fusion: cuBLAS
    reads either layout at full bandwidth."""
    cpu = model.lm_head.weight.device.type == "cpu"
    fuse_projections(model, column_major=cpu)
    if not cpu:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            column_major(module)
    for module in model.modules():  # tied embeddings share lm_head's weight
        if any(not p.is_contiguous() for p in module.parameters(recurse=False)):
            contiguous_state_dict(module)


@dataclass
class LayerPlan:
    """One decoder layer as the walk runs it: norms, fused MLP weights, the mixer and its inference state."""

    ln1: Tensor
    ln2: Tensor
    gate_up_w: Tensor
    gate_up_b: Tensor | None
    down_w: Tensor
    down_b: Tensor | None
    mixer: torch.nn.Module  # self_attn or mamba: has inference_state() and step()
    state: object


class Runtime:
    """Static inference state of one MamballamaForCausalLM: ``batch_size`` rows, ``capacity`` positions.

    ``window`` 0: decode (one token per step, each mixer's state updated in place). ``window`` > 0: speculative
    windows of up to that many tokens; every recurrent mixer keeps a replay window (``keep_live`` for drafts,
    whose window grows one token at a time).
    """

    def __init__(self, model, batch_size: int, capacity: int, window: int = 0, keep_live: bool = False,
                 prefill_chunk: int | None = None, pieces: str = "forward"):
        if pieces not in PIECE_MODES:
            raise ValueError(f"pieces={pieces!r}: give one of {', '.join(PIECE_MODES)}")
        self.model, self.base = model, model.model
        ref = model.lm_head.weight
        self.device, self.dtype = ref.device, ref.dtype
        self.batch_size, self.capacity, self.window = int(batch_size), int(capacity), int(window)
        if prefill_chunk is not None and int(prefill_chunk) < 1:
            raise ValueError(f"prefill chunk {prefill_chunk}: give a positive number of tokens")
        self.prefill_chunk = int(prefill_chunk) if prefill_chunk else auto_prefill_chunk(model.config,
                                                                                       self.batch_size)
        self.eps = model.config.rms_norm_eps
        self.column_major = self.device.type == "cpu"
        self.fns = OpTable(self.device).resolve(("add_rmsnorm", "gemv", "add_rmsnorm_gemv",
                                                 "add_rmsnorm_gemv_swiglu"))
        self.cache = HybridCache(model, self.batch_size, dtype=self.dtype, device=self.device,
                                 max_length=self.capacity)
        decode_layout(model)
        self.embed_w, self.norm_w, self.lm_head_w = self.base.embed_tokens.weight, self.base.norm.weight, ref
        fc = getattr(self.base, "fc", None)  # a feature draft's input layer (models/feature_draft.py)
        self.fc_w = fc.weight if fc is not None else None
        self.layers: list[LayerPlan] = []
        for layer in self.base.layers:
            mixer = layer.self_attn if layer.is_attention else layer.mamba
            gate_up_w, gate_up_b = fuse_linears(layer.mlp, ["gate_proj", "up_proj"], self.column_major)
            self.layers.append(LayerPlan(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight, gate_up_w, gate_up_b,
                layer.mlp.down_proj.weight, layer.mlp.down_proj.bias, mixer,
                mixer.inference_state(self.cache, self.window, keep_live),
            ))
        self.windows = [p.state for p in self.layers if hasattr(p.state, "load")]
        # the slot every Mamba-2 window writes (models/mixers.py): one flip per rebase walk for all of them
        self.slot = (torch.zeros(1, dtype=torch.long, device=self.device)
                     if any(getattr(w, "slotted", False) for w in self.windows) else None)
        with torch.no_grad():  # the model's own rotary tables, indexed by position on the device
            cos, sin = self.base.rotary_emb(torch.arange(self.capacity, device=self.device)[None], self.dtype)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # (capacity, rotary_dim)
        # short prompts through the walk (:meth:`read_on`): "walk" eagerly, "graph" one CUDA graph per piece length
        self.pieces = pieces if window == 0 and self.fc_w is None else "forward"
        self.piece_pos = torch.zeros(1, dtype=torch.long, device=self.device)  # where the piece's first token goes
        self.piece_max = piece_max(model.config, self.capacity, self.batch_size)
        self.piece_graphs: dict[int, tuple[object, Tensor, Tensor]] = {}  # length -> (graph, its ids, its logits)
        self.piece_pool = None  # one memory pool for every piece graph: they never run at once

    def step(self, **kw) -> Step:
        """A :class:`Step` over this runtime's op table and rotary tables (``kw``: its other fields)."""
        return Step(self.fns, cos=self.cos, sin=self.sin, window=self.window > 0, slot=self.slot, **kw)

    # --- the walk ------------------------------------------------------------------------------------------
    def walk(self, ids: Tensor, step: Step, features: Tensor | None = None,
             features_out: Tensor | None = None, last: bool = False) -> Tensor:
        """Logits of the new tokens: ids (batch,) -> (batch, vocab) for a decode step, (batch, T) ->
        (batch, T, vocab) for a window, (batch, vocab) of the last token with ``last``. Graph-safe: no host sync,
        every buffer static.

        ``features``: a feature draft's second input, the target's features one position back (ids' shape plus
        hidden). ``features_out``: a buffer of ids' shape plus hidden that receives the new tokens' features (the
        last hidden state after the final norm, what lm_head reads)."""
        add_norm, linear, eps = self.fns["add_rmsnorm"], self.fns["gemv"], self.eps
        # every norm in one op with the GEMV after it (the mixer's first projection, [gate; up], lm_head), and
        # SwiGLU with [gate; up] too: one kernel each on CUDA where that was timed faster (ops/triton_gemv_fused.py)
        norm_linear, norm_glu = self.fns["add_rmsnorm_gemv"], self.fns["add_rmsnorm_gemv_swiglu"]
        if step.window and step.rebase and step.slot is not None:
            step.slot.bitwise_xor_(1)  # a new window: every Mamba-2 layer reads the other slot, writes this one
        hidden = F.embedding(ids, self.embed_w)
        if self.fc_w is not None:
            if features is None:
                raise ValueError("a feature draft steps with its target's features: pass features=")
            hidden = linear(torch.cat([hidden, features.to(hidden.dtype)], dim=-1), self.fc_w)
        residual = None
        for p in self.layers:
            x = NormedInput(hidden, residual, p.ln1, eps)
            hidden = p.mixer.step(x, p.state, step)
            residual = x.residual_out(p.mixer)
            act, residual = norm_glu(hidden, residual, p.ln2, eps, p.gate_up_w, p.gate_up_b)
            hidden = linear(act, p.down_w, p.down_b)
        if last:  # a prompt piece: only the last token's logits
            hidden, residual = hidden[:, -1].contiguous(), residual[:, -1].contiguous()
        if features_out is None:
            return norm_linear(hidden, residual, self.norm_w, eps, self.lm_head_w)[0]
        x, _ = add_norm(hidden, residual, self.norm_w, eps)
        features_out.copy_(x)
        return linear(x, self.lm_head_w)

    # --- the prompt ----------------------------------------------------------------------------------------
    def prefill(self, ids: Tensor, features: Tensor | None = None, features_out: Tensor | None = None,
                resume: bool = False) -> Tensor:
        """Read the prompt (batch, n) into a reset cache with the model's own forward; fill the replay windows.
        Returns the last position's logits (batch, vocab).

        The prompt goes through in pieces of at most ``prefill_chunk`` tokens per row, each continuing from the
        cache the one before wrote (attention reads the cached keys, a Mamba layer starts from the cached conv
        and SSM state), so activation memory is bounded by the piece, not the prompt, and no activation tensor
        of a long batched prompt passes 2^31 elements.

        ``features`` (a feature draft: the target's features one position back, (batch, n, hidden)) and
        ``features_out`` (a (batch, n, hidden) buffer for the prompt's own features) as in :meth:`walk`.
        ``resume``: the cache already holds a prefix (``cache.seqlen`` tokens, a prefix cache's entry restored):
        ``ids`` are the tokens after it, read from there instead of from a reset cache.

        With ``pieces`` "walk" or "graph" (a decode runtime, no features), a prompt of at most
        :data:`PIECE_TOKENS` tokens goes through :meth:`read_on` instead of the forward.
        """
        if not resume:
            self.cache.reset()
        n = ids.shape[1]
        if self.pieces != "forward" and features is None and n <= PIECE_TOKENS:
            return self.read_on(ids)
        for s in range(0, n, self.prefill_chunk):
            piece = slice(s, s + self.prefill_chunk)
            kw = dict(past_key_values=self.cache, use_cache=True)
            if features is not None:
                kw["inputs_embeds"] = feature_inputs(self.model, ids[:, piece], features[:, piece])
            else:
                kw["input_ids"] = ids[:, piece]
            hidden = self.base(**kw).last_hidden_state
            if features_out is not None:
                features_out[:, piece].copy_(hidden)
        for state in self.windows:
            state.load(self.cache)
        return self.model.lm_head(hidden[:, -1:])[:, -1]

    def read_on(self, ids: Tensor) -> Tensor:
        """Read ``ids`` (batch, n) on from the cache's ``seqlen`` through :meth:`walk` with every mixer's prompt-piece
        form (models/step.py: the parallel scan from the decode state, attention over the K/V buffer masked at its
        positions); returns the last token's logits (batch, vocab).

        The model's forward spends most of a short prompt's time on the host (launches, Python), not the device. Here
        the prompt goes through in pieces whose lengths are powers of two (:func:`piece_lengths`); with ``pieces``
        "graph" each length is one CUDA graph, recorded on its first use (:meth:`warm_piece`), so a piece costs one
        replay. Same values as :meth:`prefill`'s forward (tests/test_runtime.py)."""
        n = ids.shape[1]
        start = self.cache.seqlen
        if start + n > self.capacity:
            raise RuntimeError(f"{start} cached + {n} new tokens: the cache holds {self.capacity}")
        done, logits = 0, None
        with torch.profiler.record_function(f"runtime.read_on.{self.pieces}"):  # named in a profile
            for T in piece_lengths(n, self.piece_max):
                self.piece_pos.fill_(start + done)
                if self.pieces == "graph":
                    graph, logits = self.warm_piece(T, ids[:, done : done + T])
                    graph.replay()
                else:
                    logits = self._piece(ids[:, done : done + T])
                done += T
                self.cache.seqlen = start + done
            return logits.clone()  # a graph's output lives in the pool every piece graph shares

    def _piece(self, ids: Tensor) -> Tensor:
        return self.walk(ids, self.step(pos=self.piece_pos, piece=True), last=True)

    def warm_piece(self, T: int, ids: Tensor | None = None) -> tuple[object, Tensor]:
        """The CUDA graph of a piece of ``T`` tokens at ``piece_pos`` (recorded on first use: its warm-up runs
        write the K/V at ``piece_pos`` onwards and change the Mamba states, which are restored before the
        recording); ``ids`` are copied into its input first. Returns (graph, its logits)."""
        if T not in self.piece_graphs:
            with torch.inference_mode(False):  # a plain tensor, written in or out of inference mode later
                buf = torch.zeros(self.batch_size, T, dtype=torch.long, device=self.device)
            saved = [(t, t.clone()) for state in self.cache.mamba.values() for t in state.values()]

            def restore() -> None:
                for t, copy in saved:
                    t.copy_(copy)
            graph, logits = capture_graph(lambda: self._piece(buf), self.device, warmup=2, before=restore,
                                          pool=self.piece_pool)
            self.piece_pool = self.piece_pool or graph.pool()
            self.piece_graphs[T] = (graph, buf, logits)
        graph, buf, logits = self.piece_graphs[T]
        if ids is not None:
            buf.copy_(ids)
        return graph, logits

    def reset(self) -> None:
        self.cache.reset()


PIECE_MODES = ("forward", "walk", "graph")
PIECE_TOKENS = 1024  # prompts of at most this many tokens go through :meth:`Runtime.read_on` when it is on
PIECE_SCORES = 1 << 26  # attention scores (heads x queries x buffer positions) one piece may hold


def piece_max(config, capacity: int, batch_size: int = 1) -> int:
    """The longest piece :meth:`Runtime.read_on` runs: a power of two, at most 256, and small enough that one
    attention layer's masked scores over the whole buffer (every row's) stay under :data:`PIECE_SCORES` (at
    least 16), and never longer than the buffer (a piece graph is recorded at position 0: its K/V must fit)."""
    heads = int(getattr(config, "num_attention_heads", 1))
    most = max(1, PIECE_SCORES // max(1, heads * int(capacity) * int(batch_size)))
    fits = 1 << (max(1, int(capacity)).bit_length() - 1)
    return min(fits, max(16, min(256, 1 << (most.bit_length() - 1))))


def piece_lengths(n: int, most: int) -> list[int]:
    """``n`` as pieces of ``most`` tokens, then the powers of two of the rest, longest first (100, 64: 64, 32,
    4): few lengths, so few graphs, and no piece padded."""
    out = [most] * (n // most)
    rest = n % most
    out += [1 << k for k in range(rest.bit_length() - 1, -1, -1) if rest >> k & 1]
    return out


PREFILL_CHUNK = 4096  # tokens per row and prefill piece, unless a smaller piece keeps activations under 2^31


def auto_prefill_chunk(config, batch_size: int) -> int:
    """The default prefill piece: 4,096 tokens per row, fewer (a multiple of 256, at least 256) where a batch
    of them would make the widest activation (MLP, Mamba in-projection, vocabulary row of one position)
    pass 2^30 elements, half the 32-bit limit some kernels index with."""
    h = int(getattr(config, "hidden_size", 1))
    widest = max(int(getattr(config, "intermediate_size", 0) or 0), 4 * h)
    limit = (1 << 30) // max(1, batch_size * widest)
    if limit >= PREFILL_CHUNK:
        return PREFILL_CHUNK
    return max(256, limit // 256 * 256)


def capture_graph(fn: Callable[[], object], device, warmup: int = 2, before: Callable[[], None] | None = None,
                  pool=None):
    """Record one call of ``fn`` in a CUDA graph; returns (graph, what the recorded call returned).

    ``fn`` first runs ``warmup`` times on a side stream (compiles the Triton kernels, runs autotuning, creates
    cuBLAS handles, settles allocations); ``before`` runs between the warm-up and the recording (the warm-up
    scribbles on the state). ``pool``: another graph's memory pool (``graph.pool()``) to share, for graphs that
    never replay at once."""
    device = torch.device(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if before is not None:
        before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
