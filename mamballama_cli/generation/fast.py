"""Fast decoding of a hybrid: a static cache, the one-token step captured in a CUDA graph, sampling on device.

:class:`StaticDecoder` is the plain decode loop on a :class:`~mamballama_cli.models.runtime.Runtime` (the static
cache, the layer walk, each mixer's own one-token step) plus a handful of device tensors: the input token, the
write position, the emitted-token history and the per-row "finished" flags. Its step (the runtime's walk, then
sampling and emission) reads and writes only those, so on CUDA it is captured once per batch size into a CUDA
graph and replayed for every token: no Python, no kernel launches and no host synchronisation per token.

Each op of the step has a pure-PyTorch reference in :mod:`mamballama_cli.ops.decode` (the CPU path, run eagerly)
and a Triton kernel in :mod:`mamballama_cli.ops.triton_decode`. The prompt goes through the model's own
``forward`` (the prefill uses the SSD chunk scan), writing the same cache. On CPU the decoder runs the same
step eagerly on the references; greedy output equals the plain ``transformers.generate`` path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from mamballama_cli.generation.result import GenerationResult, TextStream, stop_token_ids
from mamballama_cli.generation.sampling import SamplingConfig, sample
from mamballama_cli.models.runtime import Runtime, capture_graph, fuse_projections  # noqa: F401  (re-export)
from mamballama_cli.ops.decode import DECODE_OPS


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
                 forcing: bool = False, prefill_chunk: int | None = None):
        why = unsupported_reason(model)
        if why:
            raise ValueError(f"the static decoder cannot run this model: {why}")
        self.model = model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.sampling = sampling or SamplingConfig(temperature=0.0)
        self.capture = (self.device.type == "cuda") if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA-graph capture needs the model on a CUDA device")
        self.runtime = Runtime(model, self.batch_size, self.max_length, prefill_chunk=prefill_chunk)
        self.fns = self.runtime.fns.resolve(DECODE_OPS)
        self.backends = {op: self.fns.backends[op] for op in DECODE_OPS}
        self.cache = self.runtime.cache
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

    def _step(self) -> None:
        """Embed self.tokens at self.pos, run every layer, sample, emit; all in place (graph-safe)."""
        step = self.runtime.step(pos=self.pos, length=self.pos + 1)
        self._emit(sample(self.runtime.walk(self.tokens, step), self.sampling))
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
        # Warm up on a side stream, then record one step. The warm-up writes garbage into the state; reset()
        # clears it before the prompt is read. It also draws random numbers when sampling: restore the
        # generator so a seed set before the first prefill gives the same tokens as on every later prefill.
        rng = torch.cuda.get_rng_state(self.device)
        self.reset()
        self.graph, _ = capture_graph(self._step, self.device, warmup=2, before=self.reset)
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
        first = sample(self.runtime.prefill(input_ids.to(self.device)), self.sampling)
        self.pos.fill_(n)
        self._emit(first)
        self.emitted = 1
        return first if self.forced is None else self.tokens.clone()

    def jump(self, position: int) -> None:
        """After :meth:`prefill`: decode on as if the context were ``position`` tokens long. The positions skipped
        keep whatever the cache holds there (zeros when unused); a decode step costs the same whatever the cached
        values are, which is what a benchmark at a long context without a long prefill relies on."""
        if not self.emitted or not int(self.pos) <= position < self.max_length:
            raise ValueError(f"jump to {position}: after prefill, between the prompt's end and {self.max_length - 1}")
        self.pos.fill_(position)
        self.cache.seqlen = position

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
    kv = kv_bytes_per_token(cfg, elsize) * batch_size * capacity
    return kv + batch_size * capacity * 8 + 2 * capacity * cfg.head_dim * elsize


def kv_bytes_per_token(cfg, elsize: int) -> int:
    """The attention K/V one token adds to one sequence: a hybrid's attention layers, or every layer of a plain
    Transformer's config."""
    n_attn = len(set(cfg.attn_layers)) if hasattr(cfg, "attn_layers") else cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * n_attn * (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head_dim * elsize


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
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
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
