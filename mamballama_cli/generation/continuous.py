"""Continuous batching on the static runtime: a fixed set of slots, each holding its own request at its own position.

:class:`SlotDecoder` keeps ``slots`` rows of K/V and Mamba state (one :class:`~mamballama_cli.models.runtime.Runtime`)
and one decode step over all of them, captured once in a CUDA graph on GPU. Every row has its own write position
(a (slots,) device tensor: the attention kernels take a position per row), so requests join and leave between
steps without waiting for each other:

* :meth:`SlotDecoder.join` reads a prompt into a free slot: the prompt goes through the model's own forward on a
  one-row staging runtime (chunked prefill), then that row's K/V prefix and Mamba state are copied into the slot,
  overwriting whatever the slot's last request left there. The first token is sampled from the prompt's logits.
* :meth:`SlotDecoder.step` runs one decode step for every slot and returns each slot's new token. Free slots
  compute too (the step is one static graph) but do not advance: their writes stay inside their own row.
* :meth:`SlotDecoder.leave` frees a slot for the next request.

Sampling settings are fixed per decoder (they are in the graph); ``serve`` keeps one decoder per setting.
"""

from __future__ import annotations

import torch
from mamballama_cli.generation.sampling import SamplingConfig, sample
from mamballama_cli.models.runtime import Runtime, capture_graph


class SlotDecoder:
    """``slots`` independent rows of ``capacity`` positions each, decoded together one token per step."""

    def __init__(self, model, slots: int, capacity: int, sampling: SamplingConfig | None = None, capture=None,
                 prefill_chunk: int | None = None):
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
        self.stage = Runtime(model, 1, self.capacity, prefill_chunk=prefill_chunk)
        dev = self.device
        self.pos = torch.zeros(self.slots, dtype=torch.long, device=dev)  # where each slot's next K/V go
        self.tokens = torch.zeros(self.slots, dtype=torch.long, device=dev)  # each slot's next input token
        self.live = torch.zeros(self.slots, dtype=torch.long, device=dev)  # 1: the slot advances
        self.length = [0] * self.slots  # host mirror of pos for live slots
        self.free = list(range(self.slots))
        self.graph = None

    # --- the step ------------------------------------------------------------------------------------------
    def _step(self) -> None:
        step = self.runtime.step(pos=self.pos, length=self.pos + 1)
        self.tokens.copy_(sample(self.runtime.walk(self.tokens, step), self.sampling))
        self.pos.add_(self.live)

    @torch.no_grad()
    def step(self) -> list[int]:
        """One token for every slot (free slots' entries mean nothing). A live slot must have room."""
        for s in range(self.slots):
            if s not in self.free and self.length[s] >= self.capacity:
                raise RuntimeError(f"slot {s} is full ({self.capacity} positions): leave() it first")
        self.step_warm()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        for s in range(self.slots):
            if s not in self.free:
                self.length[s] += 1
        return self.tokens.tolist()

    # --- slots ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def join(self, prompt_ids: list[int]) -> tuple[int, int]:
        """Read a prompt into a free slot; returns (slot, first sampled token)."""
        n = len(prompt_ids)
        if not self.free:
            raise RuntimeError("no free slot: every slot holds a request")
        if n < 1 or n + 1 > self.capacity:
            raise ValueError(f"prompt of {n} tokens: a slot holds 1 to {self.capacity - 1}")
        self.step_warm()
        slot = self.free.pop(0)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        first = sample(self.stage.prefill(ids), self.sampling)
        self.runtime.cache.copy_row(self.stage.cache, 0, slot, n)
        self.pos[slot] = n
        self.tokens[slot] = first[0]
        self.live[slot] = 1
        self.length[slot] = n
        return slot, int(first[0])

    def leave(self, slot: int) -> None:
        """Free ``slot``; its row keeps computing in the step, at position 0 of its own buffers."""
        if slot in self.free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in use")
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
        """Record the CUDA graph (once, with capture on) while no slot is live: the warm-up steps spoil nothing."""
        if not self.capture or self.graph is not None:
            return
        if self.in_use:
            raise RuntimeError("record the step before any slot is in use")
        rng = torch.cuda.get_rng_state(self.device)
        self.graph, _ = capture_graph(self._step, self.device, warmup=2, before=self._clear)
        torch.cuda.set_rng_state(rng, self.device)
        self._clear()

    def _clear(self) -> None:
        self.runtime.reset()
        for t in (self.pos, self.tokens, self.live):
            t.zero_()
