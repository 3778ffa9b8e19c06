"""Runners: the speculative state of one model behind one protocol (docs/speculative.md).

``prefill(ids) -> last logits``, ``extend(ids, rebase) -> logits`` and ``commit(r)`` (of the tokens fed since the
last rebase, the first r are correct). :class:`HybridRunner` runs a hybrid on the inference runtime
(models/runtime.py) with replay windows; :class:`TransformersRunner` any transformers model with a croppable
cache; :class:`RefeedRunner` re-runs the kept tokens. :func:`make_runner` picks one.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.models.runtime import Runtime, capture_graph


class HybridRunner:
    """Speculative state of a MamballamaForCausalLM (target, or a draft that is a hybrid).

    The :class:`~mamballama_cli.models.runtime.Runtime` holds the static buffers: attention K/V for
    ``max_length`` tokens, and a replay window of ``window`` tokens per recurrent layer (each mixer's own,
    models/step.py). Per row, ``start`` is the committed position where the current window begins and ``keep``
    how many tokens of the window are correct; ``wlen``, how many tokens the window holds, is shared (every call
    feeds each row the same number of tokens). Rows may commit different counts (``per_row``): each then sits
    at its own position, which the attention kernels take per row. :meth:`capture` (CUDA) records every step
    shape used in a CUDA graph before the prefill; ``static`` runs the very same computation eagerly
    (positions and replay counts read from device tensors), which is how the CPU tests check the graph path.
    """

    per_row = True  # commit() takes a count per row

    def __init__(self, model, batch_size: int, max_length: int, window: int, keep_live: bool = False,
                 static: bool = False):
        self.model = model
        self.runtime = Runtime(model, batch_size, max_length, window=window, keep_live=keep_live)
        self.dtype, self.device = self.runtime.dtype, self.runtime.device
        self.batch_size, self.window = batch_size, window
        self.cache = self.runtime.cache
        self.capacity = max_length
        self.has_mamba = bool(self.runtime.windows)
        self.wlen = 0
        self.start, self.keep = [0] * batch_size, [0] * batch_size
        self.pos_t = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.keep_t = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple, tuple] = {}
        self.static = static  # attend over the whole static buffer with device-side positions, as graphs do
        self.calls = 0

    def _walk(self, ids: Tensor, pos_t: Tensor, keep_t: Tensor, rebase: bool, wlen: int,
              kv_len: int | None, **features) -> Tensor:
        """Logits (batch, T, vocab) of T new tokens at positions pos_t .. pos_t + T - 1 (the runtime's walk;
        ``features``: its ``features=`` / ``features_out=``, for feature drafts and their targets)."""
        step = self.runtime.step(pos=pos_t, keep=keep_t, rebase=rebase, wlen=wlen, kv_len=kv_len)
        return self.runtime.walk(ids, step, **features)

    # --- the runner protocol ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Tensor, **features) -> Tensor:
        """Run the prompt through the model's own forward; return the last position's logits (batch, vocab)
        (``features``: the runtime prefill's ``features=`` / ``features_out=``)."""
        if ids.shape[1] + self.window > self.capacity:
            raise MamballamaError(f"prompt of {ids.shape[1]} tokens leaves no room in a {self.capacity}-token cache")
        logits = self.runtime.prefill(ids, **features)
        self.start, self.wlen, self.keep = [ids.shape[1]] * self.batch_size, 0, [0] * self.batch_size
        self.calls += 1
        return logits

    @torch.inference_mode()
    def extend(self, ids: Tensor, rebase: bool) -> Tensor:
        """Feed T new tokens; ``rebase`` starts a new window after the ``keep`` correct tokens of the last."""
        T = ids.shape[1]
        if rebase:
            self.start = [s + k for s, k in zip(self.start, self.keep)]
            self.wlen = 0
        pos = [s + self.wlen for s in self.start]
        if max(pos) + T > self.capacity:
            raise MamballamaError(f"speculative cache of {self.capacity} tokens is full; raise max_length")
        key = self._graph_key(T, rebase, self.wlen)
        if key in self.graphs:
            logits = self._replay_graph(key, ids, pos)
        elif self.static:  # exactly what a graph records, run eagerly (tests the graph path on CPU)
            self._fill(pos)
            logits = self._walk(ids, self.pos_t, self.keep_t, rebase, self.wlen, kv_len=None)
        else:
            # one position for the whole batch where the rows agree (the shared-position path of the ops)
            where = pos[:1] if len(set(pos)) == 1 else pos
            logits = self._walk(ids, torch.tensor(where, device=self.device), self._keep_tensor(), rebase,
                                self.wlen, kv_len=max(pos) + T)
        self.wlen += T
        self.keep = [self.wlen] * self.batch_size
        self.cache.seqlen = max(self.start) + self.wlen
        self.calls += 1
        return logits

    def commit(self, r) -> None:
        """Of the tokens fed since the last rebase, the first ``r`` are part of the output: one count for every
        row (an int) or one per row (a sequence or a (batch,) tensor)."""
        rs = [int(r)] * self.batch_size if isinstance(r, int) else [int(x) for x in (
            r.tolist() if isinstance(r, Tensor) else r)]
        if len(rs) != self.batch_size or not all(0 <= x <= self.wlen for x in rs):
            raise ValueError(f"commit({r}) with {self.wlen} tokens in the window of {self.batch_size} rows")
        self.keep = rs
        self.cache.seqlen = max(s + k for s, k in zip(self.start, rs))

    def _keep_tensor(self) -> Tensor:
        return torch.tensor(self.keep, dtype=torch.long, device=self.device)

    def _fill(self, pos: list[int]) -> None:
        """The graph inputs: each row's position and kept count (a fill where the rows agree, else one small
        host-to-device copy)."""
        for buf, vals in ((self.pos_t, pos), (self.keep_t, self.keep)):
            if len(set(vals)) == 1:
                buf.fill_(vals[0])
            else:
                buf.copy_(torch.tensor(vals, dtype=torch.long), non_blocking=True)

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
            graph, logits = capture_graph(
                lambda ids=ids, rebase=rebase, wlen=wlen: self._walk(ids, self.pos_t, self.keep_t, rebase, wlen,
                                                                     kv_len=None), self.device, warmup)
            self.graphs[key] = (graph, ids, logits)
        torch.cuda.synchronize()

    def _replay_graph(self, key: tuple, ids: Tensor, pos: list[int]) -> Tensor:
        graph, ids_buf, logits = self.graphs[key]
        ids_buf.copy_(ids)
        self._fill(pos)
        graph.replay()
        return logits.clone()  # the buffer is overwritten by the next replay


def _cache_kwarg(model) -> str:
    """transformers renamed the cache argument of forward: past_key_values (5.17) -> cache (later)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TransformersRunner:
    """Any transformers causal LM with a croppable DynamicCache (e.g. a shrunk Llama draft)."""

    per_row = False  # one cache length for the batch: rows advance together

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

    per_row = False

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


