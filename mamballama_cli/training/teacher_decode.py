"""The teacher's side of `mamballama data generate`: the teacher loaded as a model the static decoder runs, the
batch size that fits, and :class:`BatchSampler`, which samples whole batches of prompts of unequal lengths."""

from __future__ import annotations

import numpy as np

from mamballama_cli.errors import MamballamaError


def load_generator(spec: str, device, dtype):
    """(hybrid on the device in eval mode, tokenizer, display name, stop ids) for the static decoder.

    A plain Transformer teacher is converted with every layer kept as attention: the same function, in the
    model class the static decoder runs.
    """
    import torch

    from mamballama_cli.convert.converter import convert_model
    from mamballama_cli.generation.fast import unsupported_reason
    from mamballama_cli.generation.result import stop_token_ids
    from mamballama_cli.models.modeling import MamballamaForCausalLM
    from mamballama_cli.training.models import load_frozen

    teacher, tok, name = load_frozen(spec, dtype, torch.device("cpu"), "teacher")
    if tok is None:
        raise MamballamaError(f"teacher {spec!r} has no tokenizer files; generating data needs one")
    stops = stop_token_ids(teacher, tok)
    if not isinstance(teacher, MamballamaForCausalLM):
        teacher, _ = convert_model(teacher, list(range(teacher.config.num_hidden_layers)), dtype=dtype,
                                   teacher_info={"name_or_path": name})
    why = unsupported_reason(teacher)
    if why:
        raise MamballamaError(f"teacher {spec!r}: the static decoder cannot run it ({why})")
    model = teacher.to(device).eval()
    model.requires_grad_(False)
    return model, tok, name, stops


def auto_batch_size(model, max_length: int, device, share: float = 0.4, most: int = 1024) -> int:
    """Rows for the static decoder on CUDA: the largest power of two up to ``most`` whose cache (K/V at full
    capacity, token history) takes at most ``share`` of the free device memory; 8 on CPU.

    Larger batches amortise the per-step cost (the default teacher on one H200: docs/data.md); the rest of the
    memory is left to the prefill's activations.
    """
    from mamballama_cli.generation.fast import available_bytes, static_cache_bytes

    if device.type != "cuda":
        return 8
    per_row = static_cache_bytes(model, 1, max_length)
    free = available_bytes(device) or 0
    batch = most
    while batch > 8 and batch * per_row > share * free:
        batch //= 2
    return batch


class BatchSampler:
    """Runs whole batches of prompts of unequal lengths on one :class:`StaticDecoder` (captured once)."""

    def __init__(self, model, stop_ids: list[int], sampling, batch_size: int, max_prompt_tokens: int,
                 sync_every: int | None = None, capture: bool | None = None):
        from mamballama_cli.generation.fast import StaticDecoder

        self.max_new = sampling.max_new_tokens
        self.batch_size = batch_size
        self.stops = np.asarray(stop_ids, dtype=np.int64)
        self.dec = StaticDecoder(model, batch_size, max_prompt_tokens + self.max_new, sampling, stop_ids,
                                 capture=capture, forcing=True)
        self.sync_every = sync_every or (64 if self.dec.capture else None)
        self.steps = 0  # decode steps run (prefill's first token included), for the benchmark's utilisation
        self.row_steps_used = 0  # of steps x rows: those that emitted a forced prompt token or a kept sample

    @property
    def engine(self) -> str:
        return self.dec.engine

    def run(self, prompts: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """(sequence, prompt length) per prompt: the prompt, then the sampled tokens up to and including the first
        stop token, at most ``max_new_tokens`` of them. Fewer prompts than the batch size are padded by repeats
        whose rows are dropped."""
        import torch

        real = len(prompts)
        rows = list(prompts) + [prompts[-1]] * (self.batch_size - real)
        lens = np.array([len(r) for r in rows])
        n0, F = int(lens.min()), int(lens.max() - lens.min())
        dev = self.dec.device
        ids = torch.from_numpy(np.stack([r[:n0] for r in rows]).astype(np.int64)).to(dev)
        forced = np.zeros((len(rows), max(F, 1)), dtype=np.int64)
        for i, r in enumerate(rows):
            forced[i, : len(r) - n0] = r[n0:]
        self.dec.prefill(ids, torch.from_numpy(forced).to(dev), torch.from_numpy(lens - n0).to(dev))
        self.steps += 1 + self.dec.decode(F + self.max_new - 1, sync_every=self.sync_every)
        hist = self.dec.tokens_so_far().cpu().numpy()  # (batch, steps): forced prompt tokens, then samples
        out = []
        for i in range(real):
            f = lens[i] - n0
            new = hist[i, f:f + self.max_new]
            hits = np.flatnonzero(np.isin(new, self.stops))
            if len(hits):
                new = new[: hits[0] + 1]
            out.append((np.concatenate([rows[i], new.astype(np.int32)]), int(lens[i])))
            self.row_steps_used += int(f) + len(new)
        return out
