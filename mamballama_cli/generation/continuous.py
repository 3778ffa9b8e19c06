"""Continuous batching on the static runtime: a fixed set of slots, each holding its own request at its own position.

:class:`SlotDecoder` keeps ``slots`` rows of K/V and Mamba state (one :class:`~mamballama_cli.models.runtime.Runtime`)
and one decode step over all of them, captured once in a CUDA graph on GPU. Every row has its own write position
(a (slots,) device tensor: the attention kernels take a position per row), so requests join and leave between
steps without waiting for each other:

* :meth:`SlotDecoder.join` reads a prompt into a free slot: the prompt goes through the model's own forward on a
  one-row staging runtime (chunked prefill; a short one through the layer walk, captured per piece length on GPU:
  :meth:`~mamballama_cli.models.runtime.Runtime.read_on`), then that row's K/V prefix and Mamba state are copied
  into the slot, overwriting whatever the slot's last request left there. The first token is sampled from the
  prompt's logits. :meth:`SlotDecoder.begin`, :meth:`~SlotDecoder.advance` and :meth:`~SlotDecoder.finish` do the
  same a budget of tokens at a time, between steps (`serve --prefill-per-step`).
* :meth:`SlotDecoder.step` runs one decode step for every slot and returns each slot's new token. Free slots
  compute too (the step is one static graph) but do not advance: their writes stay inside their own row.
* :meth:`SlotDecoder.leave` frees a slot for the next request.

Sampling settings are per slot (:class:`~mamballama_cli.generation.sampling.RowSampling`: device tensors the graph
reads), so requests with different temperatures, top-p, top-k and seeds share one running batch. Each slot draws
its noise from its own seed and draw count (:func:`~mamballama_cli.generation.sampling.row_uniform`), so a seeded
request samples the same tokens alone or beside any others. Two graphs are recorded: a step where every live slot
is greedy takes the argmax only; any sampling slot runs the step with the per-row sampler.

With ``prefix_cache_bytes``, the state after each prompt and after each request that leaves is kept
(generation/prefix_cache.py); a prompt that begins with a kept sequence is read from there on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mamballama_cli.generation.sampling import RowSampling, SamplingConfig, argmax_last, sample_rows, token_logprobs
from mamballama_cli.generation.prefix_cache import BLOCK, PrefixCache
from mamballama_cli.models.runtime import Runtime, capture_graph


@dataclass
class Reading:
    """A prompt being read into a slot (:meth:`SlotDecoder.begin`): ``at`` tokens read so far (a kept prefix
    counts), ``split`` where a piece stops to keep the state (0: nowhere), ``logits`` the prompt's last once read."""

    prompt: list[int]
    slot: int
    sampling: SamplingConfig
    seed: int
    at: int = 0
    split: int = 0
    logits: torch.Tensor | None = None
    source: object = None  # the cache whose row 0 finish copies into the slot: the staging cache or a kept entry's

    @property
    def done(self) -> bool:
        return self.logits is not None


class SlotDecoder:
    """``slots`` independent rows of ``capacity`` positions each, decoded together one token per step."""

    def __init__(self, model, slots: int, capacity: int, sampling: SamplingConfig | None = None, capture=None,
                 prefill_chunk: int | None = None, prefix_cache_bytes: int = 0, pieces: str | None = None):
        from mamballama_cli.generation.fast import unsupported_reason

        why = unsupported_reason(model)
        if why:
            raise ValueError(f"continuous batching runs on the static decoder, which cannot run this model: {why}")
        if int(slots) < 1 or int(capacity) < 2:
            raise ValueError(f"slots {slots}, capacity {capacity}: need at least 1 slot and 2 positions")
        self.model = model
        self.device = model.lm_head.weight.device
        self.slots, self.capacity = int(slots), int(capacity)
        self.sampling = sampling or SamplingConfig(temperature=0.0)
        self.capture = (self.device.type == "cuda") if capture is None else bool(capture)
        self.runtime = Runtime(model, self.slots, self.capacity, prefill_chunk=prefill_chunk)
        # prompts (the part after a kept prefix, or short ones whole) read on the staging runtime: short ones through
        # the layer walk, one CUDA graph per piece length where the step is captured (Runtime.read_on)
        pieces = pieces or ("graph" if self.capture else "forward")
        if pieces == "graph" and self.device.type != "cuda":
            raise ValueError(f"pieces='graph' records CUDA graphs; the model is on {self.device}: give walk or forward")
        self.stage = Runtime(model, 1, self.capacity, prefill_chunk=prefill_chunk, pieces=pieces)
        dev = self.device
        self.pos = torch.zeros(self.slots, dtype=torch.long, device=dev)  # where each slot's next K/V go
        self.tokens = torch.zeros(self.slots, dtype=torch.long, device=dev)  # each slot's next input token
        self.live = torch.zeros(self.slots, dtype=torch.long, device=dev)  # 1: the slot advances
        self.length = [0] * self.slots  # host mirror of pos for live slots
        self.free = list(range(self.slots))
        self.rows = RowSampling(self.slots, dev)  # each slot's sampling settings, seed and draw count
        self.graphs: dict[bool, object] = {}  # greedy-only step -> its graph
        self.step_logits: dict[bool, torch.Tensor] = {}  # greedy-only step -> its logits (static under a graph)
        self.last_logits = None  # (slots, vocab) of the last step, or (1, vocab) of the last join
        self.joined = None  # the slot of the last join, until the next step
        self.stepped = None  # the last step's logits (slots, vocab): valid until the next step
        # prefix cache (generation/prefix_cache.py): each slot's tokens fed so far, and how many of its prompt's
        # tokens came from the cache
        self.prefix = PrefixCache(model, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.fed: list[list[int]] = [[] for _ in range(self.slots)]
        self.next_in = [0] * self.slots  # host mirror of tokens for live slots: the next token a step feeds
        self.cached = [0] * self.slots
        self.prompt_len = [0] * self.slots
        self.reading: Reading | None = None  # the prompt being read into a slot (begin .. finish)

    # --- the step ------------------------------------------------------------------------------------------
    def _step(self, greedy: bool) -> None:
        step = self.runtime.step(pos=self.pos, length=self.pos + 1)
        logits = self.runtime.walk(self.tokens, step)
        self.step_logits[greedy] = logits  # under capture: the graph's output buffer, rewritten by each replay
        self.tokens.copy_(argmax_last(logits) if greedy else sample_rows(logits, self.rows, self.live))
        self.pos.add_(self.live)

    @torch.no_grad()
    def step(self) -> list[int]:
        """One token for every slot (free slots' entries mean nothing). A live slot must have room."""
        live = self.live_slots()
        for s in live:
            if self.length[s] >= self.capacity:
                raise RuntimeError(f"slot {s} is full ({self.capacity} positions): leave() it first")
        self.step_warm()
        greedy = all(self.rows.greedy[s] for s in live)
        if self.graphs:
            self.graphs[greedy].replay()
        else:
            self._step(greedy)
        self.last_logits, self.joined = self.step_logits[greedy], None
        self.stepped = self.last_logits
        out = self.tokens.tolist()
        for s in live:
            self.length[s] += 1
            if self.prefix is not None:
                self.fed[s].append(self.next_in[s])
                self.next_in[s] = out[s]
        return out

    def live_slots(self) -> list[int]:
        """The slots a step advances: those in use, but the one whose prompt is being read."""
        held = self.reading.slot if self.reading is not None else None
        return [s for s in range(self.slots) if s not in self.free and s != held]

    # --- slots ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def join(self, prompt_ids: list[int], sampling: SamplingConfig | None = None,
             seed: int | None = None) -> tuple[int, int]:
        """Read a prompt into a free slot, to be sampled with ``sampling`` (default: the decoder's) from ``seed``
        (default: drawn from torch's generator); returns (slot, first sampled token). :meth:`begin`,
        :meth:`advance` to the end, :meth:`finish`."""
        reading = self.begin(prompt_ids, sampling, seed)
        self.advance(reading)
        return self.finish(reading)

    @torch.no_grad()
    def begin(self, prompt_ids: list[int], sampling: SamplingConfig | None = None,
              seed: int | None = None) -> Reading:
        """Start reading a prompt into a free slot, which it holds from now on (steps leave it alone); the prompt is
        then read by :meth:`advance`, a piece at a time if the caller wants (`serve` reads a long prompt between
        decode steps, so running answers never wait for all of it), and the slot joins with :meth:`finish`. One
        prompt at a time: the staging runtime holds it until then. The prefix cache is looked up here (module doc)."""
        n = len(prompt_ids)
        if not self.free:
            raise RuntimeError("no free slot: every slot holds a request")
        if self.reading is not None:
            raise RuntimeError("a prompt is being read already: finish() or drop() it first")
        if n < 1 or n + 1 > self.capacity:
            raise ValueError(f"prompt of {n} tokens: a slot holds 1 to {self.capacity - 1}")
        seed = int(torch.randint(0, 2**62, (1,))) if seed is None else int(seed)
        self.step_warm()
        r = Reading(list(prompt_ids), self.free.pop(0), sampling or self.sampling, seed)
        self.reading = r
        label = torch.profiler.record_function  # named ranges in a profile (benchmarks/prefix_cache.py --profile)
        if self.prefix is not None:
            with label("prefix_cache.lookup"):
                hit = self.prefix.lookup(r.prompt)
                src = None
                if hit is not None:
                    r.at, src = len(hit[0]), hit[1]
                shared, owner = self.prefix.shared(r.prompt, n - 1) if r.at < n - 1 else (0, None)
            if shared > r.at and not self.runtime.cache.mamba:  # every layer attention: a slice of the owner's K/V
                r.at, src = shared, self.prefix.entries[owner]
                self.prefix.take(owner, r.at)
            elif shared >= r.at + BLOCK:  # a hybrid: worth a piece of its own and an entry
                r.split = shared
            self.fed[r.slot] = list(r.prompt)
            if r.at == n:  # the whole prompt: its state and logits as they were kept (copied in by finish)
                r.source, r.logits = src.cache, src.logits.clone()
            elif r.at:
                with label("prefix_cache.restore"):
                    self.stage.cache.copy_row(src.cache, 0, 0, r.at)
                    self.stage.cache.seqlen = r.at
        self.cached[r.slot] = r.at
        return r

    @torch.no_grad()
    def advance(self, r: Reading, budget: int | None = None) -> int:
        """Read up to ``budget`` more tokens of the prompt (None: the rest) on the staging runtime; returns how many
        were read. Once the last is read, ``r.done``: the prefix cache keeps the prompt's state, and :meth:`finish`
        copies it into the slot. A hybrid's prompt that shares blocks with a kept one stops a piece at the end of
        the shared blocks and keeps the state there too."""
        label = torch.profiler.record_function
        n, read = len(r.prompt), 0
        ids = None
        while r.logits is None and (budget is None or read < budget):
            end = r.split if r.split > r.at else n
            if budget is not None:
                end = min(end, r.at + budget - read)
            if ids is None:
                ids = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
            with label("prefill"):
                logits = self.stage.prefill(ids[:, r.at:end], resume=bool(r.at))
            read += end - r.at
            r.at = end
            if r.at == r.split:  # the end of the shared blocks, kept for the requests that begin the same way
                with label("prefix_cache.put"):
                    self.prefix.put(r.prompt[: r.split], self.stage.cache, 0, logits)
            if r.at == n:
                r.source = self.stage.cache
                if self.prefix is not None:
                    with label("prefix_cache.put"):
                        self.prefix.put(r.prompt, self.stage.cache, 0, logits)
                r.logits = logits
        return read

    @torch.no_grad()
    def finish(self, r: Reading) -> tuple[int, int]:
        """The slot of a prompt read to its end joins the batch: its first token sampled from the prompt's logits;
        returns (slot, first token)."""
        if r.logits is None:
            raise RuntimeError(f"{len(r.prompt) - r.at} tokens of the prompt are still to read: advance() first")
        slot, n, cfg = r.slot, len(r.prompt), r.sampling
        # into the slot now, not when read: a step between the two writes into the reading slot's row
        with torch.profiler.record_function("prefix_cache.restore" if r.source is not self.stage.cache
                                            else "slot.copy_in"):
            self.runtime.cache.copy_row(r.source, 0, slot, n)
        self.reading = None
        self.last_logits = r.logits
        if cfg.greedy:  # the argmax alone (no sort of the vocabulary)
            first = argmax_last(self.last_logits)
        else:
            one = RowSampling(1, self.device)
            one.set(0, cfg, r.seed)
            first = sample_rows(self.last_logits, one)
        self.rows.set(slot, cfg, r.seed)
        self.rows.counter[slot] = 1  # the first draw was the prompt's
        self.joined = slot
        self.pos[slot] = n
        self.tokens[slot] = first[0]
        self.live[slot] = 1
        self.length[slot] = n
        self.next_in[slot] = int(first[0])
        self.prompt_len[slot] = n
        return slot, int(first[0])

    def drop(self, r: Reading) -> None:
        """Give up reading ``r`` (its client left, or reading it failed): its slot is free again."""
        if self.reading is r:
            self.reading = None
            self.fed[r.slot] = []
            self.free.append(r.slot)

    def logprobs(self, slots: list[int], k: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
        """After :meth:`step`: for each of ``slots``, its new token's log-probability and the ``k`` most likely
        tokens (:func:`~mamballama_cli.generation.sampling.token_logprobs`); after :meth:`join`, the same for the
        first token (``slots`` = [the slot joined])."""
        if self.last_logits is None:
            raise RuntimeError("no step or join yet: nothing to give log-probabilities of")
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        if self.joined is not None:  # the last call was a join: its prompt's logits
            if list(slots) != [self.joined]:
                raise ValueError(f"after a join, ask for the slot that joined ([{self.joined}]), not {slots}")
            logits = self.last_logits
        else:
            logits = self.last_logits.index_select(0, rows)
        return token_logprobs(logits, self.tokens.index_select(0, rows), k)

    def leave(self, slot: int) -> None:
        """Free ``slot``; its row keeps computing in the step, at position 0 of its own buffers."""
        if slot in self.free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in use")
        if self.reading is not None and self.reading.slot == slot:
            raise ValueError(f"slot {slot} is still reading its prompt: drop() the reading instead")
        if self.prefix is not None and self.length[slot] > self.prompt_len[slot]:
            # every token it fed, with the logits the last one gave: the last step's (every step feeds every live
            # slot). A slot that leaves before any step was kept as its prompt when it joined.
            self.prefix.put(self.fed[slot], self.runtime.cache, slot, self.stepped[slot])
        self.fed[slot] = []
        self.live[slot] = 0
        self.pos[slot] = 0
        self.length[slot] = 0
        self.free.append(slot)

    @property
    def in_use(self) -> int:
        return self.slots - len(self.free)

    def room(self, slot: int) -> int:
        """Steps left before ``slot``'s buffers are full."""
        return self.capacity - self.length[slot]

    def step_warm(self) -> None:
        """Record the two CUDA graphs (once, with capture on, in one memory pool: they never run at once) while no
        slot is live: the warm-up steps spoil nothing."""
        if not self.capture or self.graphs:
            return
        if self.in_use:
            raise RuntimeError("record the step before any slot is in use")
        pool = None
        for greedy in (True, False):
            self.graphs[greedy], _ = capture_graph(lambda g=greedy: self._step(g), self.device, warmup=2,
                                                   before=self._clear, pool=pool)
            pool = self.graphs[greedy].pool()
        self._clear()
        if self.stage.pieces == "graph":  # every piece length a prompt can need, recorded now rather than mid-request
            self.stage.piece_pos.zero_()  # the warm-up runs write K/V from here: the longest piece fits from 0
            for k in range(self.stage.piece_max.bit_length()):
                self.stage.warm_piece(1 << k)

    def _clear(self) -> None:
        self.runtime.reset()
        for t in (self.pos, self.tokens, self.live, self.rows.counter):
            t.zero_()
