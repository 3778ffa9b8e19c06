"""Decoding state of a hybrid model.

Attention layers keep K/V in buffers of a fixed capacity (batch, n_kv, capacity, head_dim) written at
``seqlen``; Mamba layers keep a conv window and an SSM state whose size does not depend on the context.
Everything is allocated up front when ``max_length`` is known (what CUDA graphs need) and grows by
doubling otherwise (plain ``generate``). Rolling back attention is moving ``seqlen``; Mamba layers
roll back through their mixers' replay windows (``inference_state(cache, window)``, models/step.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


class HybridCache:
    is_compileable = False  # transformers asks; we capture our own graphs instead of torch.compile

    def __init__(
        self,
        model_or_config,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        max_length: int | None = None,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        model = model_or_config if hasattr(model_or_config, "config") else None
        if model is not None:
            ref = next(model.parameters())
            dtype = dtype or ref.dtype
            device = device or ref.device
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype or torch.float32
        self.device = torch.device(device or "cpu")
        self.growable = max_length is None
        self.capacity = max_length if max_length is not None else 256
        self.seqlen = 0
        self.key: dict[int, Tensor] = {}
        self.value: dict[int, Tensor] = {}
        self.mamba: dict[int, dict[str, Tensor]] = {}
        n_kv, hd = config.num_key_value_heads, config.head_dim
        for i in range(config.num_hidden_layers):
            if config.is_attention_layer(i):
                shape = (batch_size, n_kv, self.capacity, hd)
                self.key[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                self.value[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if model is not None:
            base = getattr(model, "model", model)
            for i, layer in enumerate(base.layers):
                if not config.is_attention_layer(i):
                    self.mamba[i] = layer.mamba.allocate_state(batch_size, self.dtype, self.device)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen

    def advance(self, n: int) -> None:
        self.seqlen += n

    def reset(self) -> None:
        self.seqlen = 0
        for state in self.mamba.values():
            for t in state.values():
                t.zero_()

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if not self.growable:
            raise RuntimeError(
                f"cache holds at most {self.capacity} tokens but {needed} were needed; "
                "allocate it with a larger max_length"
            )
        new_cap = max(needed, 2 * self.capacity)
        for d in (self.key, self.value):
            for i, buf in d.items():
                grown = buf.new_zeros(*buf.shape[:2], new_cap, buf.shape[-1])
                grown[:, :, : self.seqlen] = buf[:, :, : self.seqlen]
                d[i] = grown
        self.capacity = new_cap

    # --- attention layers --------------------------------------------------------------------------------
    def kv_update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (batch, n_kv, q_len, head_dim) at ``seqlen``; return all K/V up to the new end."""
        q_len = k.shape[2]
        end = self.seqlen + q_len
        self._ensure_capacity(end)
        kb, vb = self.key[layer_idx], self.value[layer_idx]
        kb[:, :, self.seqlen : end] = k.to(kb.dtype)
        vb[:, :, self.seqlen : end] = v.to(vb.dtype)
        return kb[:, :, :end], vb[:, :, :end]

    # --- mamba layers ------------------------------------------------------------------------------------
    def mamba_state(self, layer_idx: int) -> dict[str, Tensor]:
        return self.mamba[layer_idx]

    def memory_bytes(self) -> dict[str, int]:
        kv = sum(t.numel() * t.element_size() for d in (self.key, self.value) for t in d.values())
        st = sum(t.numel() * t.element_size() for s in self.mamba.values() for t in s.values())
        return {"kv_bytes": kv, "state_bytes": st}

    def copy_row(self, src: HybridCache, src_row: int, dst_row: int, n: int) -> None:
        """Row ``dst_row`` of this cache takes row ``src_row`` of ``src``: the first ``n`` positions of every
        attention layer's K/V and every Mamba layer's whole state (in place: views of this cache stay valid). One
        ``_foreach_copy_`` call for all of them: a prefix cache's restore copies some 60 tensors, whose launches
        one by one cost more host time than the copies take on a GPU."""
        dst, srcs = [], []
        for i in self.key:
            dst += [self.key[i][dst_row, :, :n], self.value[i][dst_row, :, :n]]
            srcs += [src.key[i][src_row, :, :n], src.value[i][src_row, :, :n]]
        for i, state in self.mamba.items():
            for name, t in state.items():
                dst.append(t[dst_row])
                srcs.append(src.mamba[i][name][src_row])
        torch._foreach_copy_(dst, srcs)

    def select_batch(self, index: Tensor) -> None:
        """Keep/reorder batch rows (beam search, dropping finished rows)."""
        for d in (self.key, self.value):
            for i in d:
                d[i] = d[i].index_select(0, index.to(self.device))
        for s in self.mamba.values():
            for k in s:
                s[k] = s[k].index_select(0, index.to(self.device))
        self.batch_size = int(index.numel())

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.select_batch(beam_idx)
