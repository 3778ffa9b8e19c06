"""Decode speed and memory of the hybrid against its teacher (``mamballama eval speed``).

Measured per model:

* **decode**: time to first token and decode tokens/s at several batch sizes for one prompt length;
* **context**: time to first token, decode tokens/s, peak memory and cache bytes against prompt length
  (1K .. 64K tokens by default), batch 1;
* **floor**: the memory-bandwidth floor of batch-1 decoding on this device: the weight bytes one step
  must read over the copy bandwidth measured here (a large device-to-device copy, bytes read + written).

Models: the hybrid decodes with the static decoder (generation/fast.py: static cache, CUDA-graph step,
on-device sampling). The teacher runs through transformers: an eager forward per token with its dynamic
cache, the fastest uncompiled transformers path (design.md section 5: generate with the dynamic cache
reaches 11.8 tok/s at 8B, with the static cache 4.6). ``teacher_engines`` may add "static": the teacher's
own layers run by the same static decoder (a hybrid whose layers all keep attention is exactly the
teacher), which separates the architecture's cost from the engine's.

Everything is greedy on random prompts with no stop token, so every run decodes exactly the tokens asked.
Peak memory is torch's peak allocation (weights + cache + activations) on CUDA; on CPU it is not
measured. Only one model is in memory at a time.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
import traceback
from dataclasses import dataclass, field

from mamballama_cli.errors import UsageError
from mamballama_cli.evaluation.speed_device import (copy_bandwidth, device_info, free_memory, peak_memory, reset_peak,
                                                    sync_device, weight_bytes)
from mamballama_cli.evaluation.speed_limit import summarise_max_batch
from mamballama_cli.evaluation.speed_models import SpeedModels
from mamballama_cli.ops.graph_timing import kernel_choices
from mamballama_cli.output import log

DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


@dataclass
class SpeedConfig:
    """Options of ``mamballama eval speed`` (flags of the same names; lists as comma-separated values)."""

    model: str | None = None  # hybrid checkpoint directory (or use shape)
    teacher: str | None = None  # teacher checkpoint (with model); default: the hybrid's recorded teacher
    shape: str | None = None  # named shape with random weights (evaluation/shapes.py)
    ratio: float = 0.25  # with shape: fraction of layers that keep attention
    attn_layers: str | None = None  # with shape: explicit attention layers, e.g. "3,7,11"
    gate: bool = True  # with shape: Mamba-2's z projection and gate (False: convert --no-gate's hybrid)
    dtype: str = "auto"
    device: str = "auto"
    prompt_tokens: int = 128
    new_tokens: int = 256
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    contexts: list[int] = field(default_factory=lambda: list(DEFAULT_CONTEXTS))
    context_new_tokens: int = 32
    teacher_new_tokens: int = 32  # an eager teacher decodes at a steady, launch-bound rate: fewer suffice
    models: list[str] = field(default_factory=lambda: ["hybrid", "teacher"])
    teacher_engines: list[str] = field(default_factory=lambda: ["transformers"])
    graphs: bool = True  # capture the hybrid's decode step in a CUDA graph (CUDA only)
    prefill_chunk: int | None = None  # static engine: prompt tokens per row read in one piece (None: automatic)
    max_batch: bool = False  # per context: the largest batch that fits, hybrid and teacher on the static engine
    max_batch_curve: bool = False  # with max_batch: double from batch 1, decoding at each (not the estimate first)
    memory_limit_gb: float | None = None  # with max_batch: the memory a run may use (default: what is free)
    seed: int = 0
    output: str | None = None

    def validate(self) -> None:
        if (self.model is None) == (self.shape is None):
            raise UsageError("pass exactly one of --model CHECKPOINT or --shape NAME (e.g. --shape llama3-8b)")
        if self.shape is not None:
            from mamballama_cli.evaluation.shapes import shape_kwargs

            shape_kwargs(self.shape)
            if not 0.0 <= self.ratio <= 1.0:
                raise UsageError(f"--ratio {self.ratio} is outside [0, 1]")
        elif not self.gate:
            raise UsageError("--no-gate shapes the random hybrid of --shape; a --model checkpoint's own config "
                             "says whether it has a gate (drop --no-gate)")
        if self.memory_limit_gb is not None and self.memory_limit_gb <= 0:
            raise UsageError(f"--memory-limit {self.memory_limit_gb}: give a positive number of GB")
        if self.max_batch and not self.contexts:
            raise UsageError("--max-batch searches per context length: give --contexts, e.g. 4k,32k")
        if self.max_batch_curve and not self.max_batch:
            raise UsageError("--max-batch-curve shapes --max-batch's search: add --max-batch")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise UsageError(f"--prefill-chunk {self.prefill_chunk}: give a positive number of tokens")
        for name in ("prompt_tokens", "new_tokens", "context_new_tokens", "teacher_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_sizes", "contexts"):
            values = getattr(self, name)
            if any((not isinstance(v, int)) or v < 1 for v in values):
                raise UsageError(f"--{name.replace('_', '-')}: {values} must be positive integers")
        for m in self.models:
            if m not in ("hybrid", "teacher"):
                raise UsageError(f"--models: {m!r} is not 'hybrid' or 'teacher'")
        for e in self.teacher_engines:
            if e not in ("transformers", "static"):
                raise UsageError(f"--teacher-engines: {e!r} is not 'transformers' or 'static'")


def _int_with_k(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    """"1,8,32" -> [1, 8, 32]; "1k,32k" -> [1024, 32768]; None stays None (not given)."""
    if text is None:
        return None
    try:
        values = [_int_with_k(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated integers, e.g. 1,8,32 or 1k,32k") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    return values


# ------------------------------------------------------------------------------------------------
# Runners: one measurement = prefill (time to first token) + a timed run of decode steps
# ------------------------------------------------------------------------------------------------
def _prompt(vocab: int, batch: int, length: int, device, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed * 1000003 + batch * 7919 + length)
    return torch.randint(3, vocab, (batch, length), generator=gen).to(device)


SYNTHETIC_PROMPT = 64  # tokens really prefilled before a synthetic context (run_static(synthetic=True))


def run_static(model, batch: int, prompt_len: int, new_tokens: int, graphs: bool, seed: int,
               prefill_chunk: int | None = None, synthetic: bool = False) -> dict:
    """The static decoder (CUDA graph on CUDA when ``graphs``): prefill, then new_tokens - 1 steps.

    ``synthetic``: decode at a context of ``prompt_len`` without reading a prompt that long: a short prompt is
    prefilled, then the decoder's position jumps to ``prompt_len`` (the K/V it skipped are zeros). A decode step
    costs the same whatever the cached values are, so decode tokens/s are those of a real context; time to first
    token is not measured. ``--max-batch`` probes this way: a real 32K prefill of ~100 rows took minutes per
    probe on the H200."""
    from mamballama_cli.generation.fast import StaticDecoder

    device = model.lm_head.weight.device
    real_len = min(prompt_len, SYNTHETIC_PROMPT) if synthetic else prompt_len
    ids = _prompt(model.config.vocab_size, batch, real_len, device, seed)
    reset_peak(device)
    dec = StaticDecoder(model, batch, prompt_len + new_tokens, capture=graphs and device.type == "cuda",
                        prefill_chunk=prefill_chunk)
    # Warm-up at the same length: records the graph and compiles every kernel. Triton specialises
    # integer arguments (== 1, multiple of 16: the chunk count of the scan, say), so a shorter warm-up
    # prompt can leave a compilation inside the timed prefill.
    dec.prefill(ids)
    dec.decode(2, sync_every=2)
    sync_device(device)
    t0 = time.perf_counter()
    first = dec.prefill(ids)
    first.tolist()  # the first token is on the host
    t1 = time.perf_counter()
    if synthetic and prompt_len > real_len:
        dec.jump(prompt_len)  # the next token's K/V go at prompt_len; the step attends over all before it
        sync_device(device)
        t1 = time.perf_counter()
    dec.decode(new_tokens - 1, sync_every=1 << 30)
    sync_device(device)
    t2 = time.perf_counter()
    mem = dec.cache.memory_bytes()
    row = _row(batch, prompt_len, new_tokens, t0, t1, t2, device)
    row.update(engine=dec.engine, kv_bytes=mem["kv_bytes"], state_bytes=mem["state_bytes"],
               backends=dict(dec.backends))
    row.update(kernel_choices())  # which shapes the gemv and fused norm/SwiGLU kernels won, and the timings
    if synthetic:
        row.update(synthetic_context=True, ttft_s=None)
    del dec
    return row


def _cache_name(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_transformers(model, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    """A transformers model, eager: one forward per token with its dynamic cache, greedy, no stop token."""
    import torch

    device = model.get_output_embeddings().weight.device
    ids = _prompt(model.config.vocab_size, batch, prompt_len, device, seed)
    kw = _cache_name(model)

    def run(prompt, steps):
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        first = nxt.tolist()  # host sync: time to first token
        t_first = time.perf_counter()
        cache = out[kw]
        for _ in range(steps):
            out = model(input_ids=nxt, use_cache=True, **{kw: cache})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out[kw]
        sync_device(device)
        return first, t_first, cache

    with torch.no_grad():
        run(ids[:, : min(prompt_len, 64)], 2)  # warm-up
        reset_peak(device)
        t0 = time.perf_counter()
        _, t1, cache = run(ids, new_tokens - 1)
        t2 = time.perf_counter()
    cfg = model.config
    elt = model.get_output_embeddings().weight.element_size()
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    # K/V for prompt + new tokens, the capacity the static decoder allocates, so the two compare alike
    kv = cfg.num_hidden_layers * 2 * batch * n_kv * (prompt_len + new_tokens) * hd * elt
    row = _row(batch, prompt_len, new_tokens, t0, t1, t2, device)
    row.update(engine="transformers-eager", kv_bytes=kv, state_bytes=0)
    del cache
    return row


def _row(batch, prompt_len, new_tokens, t0, t1, t2, device) -> dict:
    decode_s = t2 - t1
    per_seq = (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else float("nan")
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "ttft_s": t1 - t0, "decode_s": decode_s, "decode_tok_s": per_seq,
            "aggregate_tok_s": per_seq * batch, "peak_mem_bytes": peak_memory(device)}


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------
def _guarded(rows: list, base: dict, fn, *args) -> None:
    """Run one measurement; an error (out of memory at a long context, say) is recorded, not fatal."""
    try:
        row = fn(*args)
    except Exception as exc:  # keep the other measurements
        log(f"  failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        traceback.print_exc(file=sys.stderr)
        row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            row["error"] = "out of memory"
    rows.append({**base, **row})
    free_memory(base["_device"])


def _measure_model(rows, cfg: SpeedConfig, label: str, engine: str, model, device) -> None:
    static = engine == "static"
    new_batch = cfg.new_tokens if (static or label == "hybrid") else min(cfg.new_tokens, cfg.teacher_new_tokens)
    new_ctx = cfg.context_new_tokens
    for b in cfg.batch_sizes:
        log(f"[{label}/{engine}] batch {b}: prompt {cfg.prompt_tokens}, {new_batch} new tokens")
        base = {"section": "decode", "model": label, "_device": device}
        if static:
            _guarded(rows, base, run_static, model, b, cfg.prompt_tokens, new_batch, cfg.graphs, cfg.seed,
                     cfg.prefill_chunk)
        else:
            _guarded(rows, base, run_transformers, model, b, cfg.prompt_tokens, new_batch, cfg.seed)
    for n in cfg.contexts:
        log(f"[{label}/{engine}] context {n}: batch 1, {new_ctx} new tokens")
        base = {"section": "context", "model": label, "_device": device}
        if static:
            _guarded(rows, base, run_static, model, 1, n, new_ctx, cfg.graphs, cfg.seed, cfg.prefill_chunk)
        else:
            _guarded(rows, base, run_transformers, model, 1, n, new_ctx, cfg.seed)


def run_speed(cfg: SpeedConfig) -> dict:
    import torch

    from mamballama_cli.loading import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        if device.index is None:  # memory statistics want an explicit index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    models = SpeedModels(cfg, device, dtype)
    result: dict = {"machine": device_info(device), "config": {k: v for k, v in vars(cfg).items()},
                    "dtype": str(dtype).replace("torch.", ""), "rows": [], "floor": {}}
    log(f"device {result['machine'].get('name')} ({device}), {result['dtype']}")
    bw = copy_bandwidth(device)
    result["floor"]["copy_bandwidth_bytes_per_s"] = bw
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows: list = result["rows"]

    def floor_of(label, model):
        wb = weight_bytes(model)
        result["floor"][label] = {"weight_bytes": wb["total"], "read_bytes_per_token": wb["read_per_token"],
                                  "tok_s_all_weights": bw / wb["total"],
                                  "tok_s_read_weights": bw / wb["read_per_token"]}

    if cfg.max_batch:
        with torch.no_grad():
            _max_batch_sweep(result, cfg, models, device, floor_of)
        result["summary"] = summarise_max_batch(rows, result["floor"])
        return result
    with torch.no_grad():
        if "hybrid" in cfg.models:
            model = models.hybrid()
            floor_of("hybrid", model)
            _measure_model(rows, cfg, "hybrid", "static", model, device)
            del model
            free_memory(device, collect=True)
        if "teacher" in cfg.models:
            if "transformers" in cfg.teacher_engines:
                model = models.teacher()
                if model is None:
                    log("no teacher: pass --teacher PATH (the hybrid records no local teacher)")
                else:
                    floor_of("teacher", model)
                    _measure_model(rows, cfg, "teacher", "transformers", model, device)
                    del model
                    free_memory(device, collect=True)
            if "static" in cfg.teacher_engines:
                model = models.teacher_as_hybrid()
                if model is not None:
                    floor_of("teacher", model)
                    _measure_model(rows, cfg, "teacher", "static", model, device)
                    del model
                    free_memory(device, collect=True)
    for row in rows:
        row.pop("_device", None)
    result["models"] = models.describe
    result["summary"] = summarise(result, cfg)
    return result


def _max_batch_sweep(result: dict, cfg: SpeedConfig, models, device, floor_of) -> None:
    """Per model (the teacher on the hybrid's static engine: same engine) and context: the largest batch that
    fits (evaluation/speed_limit.py) and its decode throughput. The JSON is rewritten after every row."""
    from mamballama_cli.evaluation.speed_limit import estimate_largest, fits_attempt, largest_batch
    from mamballama_cli.generation.fast import available_bytes

    limit = int(cfg.memory_limit_gb * 1e9) if cfg.memory_limit_gb else None
    for label in ("hybrid", "teacher"):
        if label not in cfg.models:
            continue
        model = models.hybrid() if label == "hybrid" else models.teacher_as_hybrid()
        if model is None:
            continue
        floor_of(label, model)
        free_memory(device, collect=True)
        weights = weight_bytes(model)["total"]
        budget = limit - weights if limit is not None else available_bytes(device)
        for n in cfg.contexts:
            log(f"[{label}/static] context {n}: the largest batch that fits ({cfg.context_new_tokens} new tokens)")

            def run(b, n=n, model=model):  # called in this iteration only (fits_attempt)
                row: list = []
                _guarded(row, {"_device": device}, run_static, model, b, n, cfg.context_new_tokens, cfg.graphs,
                         cfg.seed, cfg.prefill_chunk, True)
                if row[0].get("error") is None:
                    log(f"  batch {b}: {row[0]['aggregate_tok_s']:.1f} tok/s in all")
                else:
                    log(f"  batch {b}: {row[0]['error']}")
                free_memory(device, collect=True)
                row[0].pop("_device", None)
                return row[0]

            attempt = fits_attempt(run, model, n, cfg.context_new_tokens, cfg.prefill_chunk, budget, limit,
                                   lambda r: r.get("peak_mem_bytes"))
            start = None if cfg.max_batch_curve else estimate_largest(model, n, cfg.context_new_tokens,
                                                                       cfg.prefill_chunk, budget)
            best, row, probes = largest_batch(attempt, start=start)
            base = {"section": "max-batch", "model": label, "prompt_tokens": n, "probes": probes,
                    "budget_bytes": budget}
            if best:
                result["rows"].append({**row, **base})
                log(f"  batch {best}: {row['aggregate_tok_s']:.1f} tok/s in all")
            else:
                why = next(p["error"] for p in probes if p["batch"] == 1)
                result["rows"].append({**base, "batch": 0, "error": f"batch 1 does not fit: {why}"})
                log(f"  batch 1 does not fit: {why}")
            if cfg.output:
                write_result({**result, "partial": True}, cfg.output)
        attempt = run = None  # they hold the model too: gone before the next is built (its budget is measured)
        del model
        free_memory(device, collect=True)


def _pick(rows, section, model, engine_prefix, **match):
    for r in rows:
        if r.get("section") == section and r.get("model") == model and "error" not in r \
                and str(r.get("engine", "")).startswith(engine_prefix) \
                and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def summarise(result: dict, cfg: SpeedConfig) -> dict:
    rows, floor = result["rows"], result["floor"]
    out: dict = {}
    h1 = _pick(rows, "decode", "hybrid", "static", batch=1)
    if h1 and "hybrid" in floor:
        out["hybrid_batch1_decode_tok_s"] = h1["decode_tok_s"]
        out["hybrid_fraction_of_floor_all_weights"] = h1["decode_tok_s"] / floor["hybrid"]["tok_s_all_weights"]
        out["hybrid_fraction_of_floor_read_weights"] = h1["decode_tok_s"] / floor["hybrid"]["tok_s_read_weights"]
    if cfg.shape == "llama3-8b" and h1:
        out["target_tok_s"] = 200
        out["target_met"] = bool(h1["decode_tok_s"] >= 200)
    ctx = 32768 if 32768 in cfg.contexts else (max(cfg.contexts) if cfg.contexts else None)
    if ctx is not None:
        h = _pick(rows, "context", "hybrid", "static", prompt_tokens=ctx)
        t = _pick(rows, "context", "teacher", "transformers", prompt_tokens=ctx) or \
            _pick(rows, "context", "teacher", "static", prompt_tokens=ctx)
        if h and t:
            out["context"] = ctx
            out["hybrid_cache_bytes"] = h["kv_bytes"] + h["state_bytes"]
            out["teacher_kv_bytes"] = t["kv_bytes"]
            out["cache_ratio"] = out["hybrid_cache_bytes"] / t["kv_bytes"] if t["kv_bytes"] else float("nan")
            out["hybrid_decode_tok_s"] = h["decode_tok_s"]
            out["teacher_decode_tok_s"] = t["decode_tok_s"]
    return out


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _fmt(v, spec) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"# mamballama eval speed: {m.get('name')} ({m.get('device')}), {result['dtype']}, "
                 f"torch {m.get('torch')}, transformers {m.get('transformers')}, {m.get('date')}")
    fl = result["floor"]
    lines.append(f"copy bandwidth: {fl['copy_bandwidth_bytes_per_s'] / 1e12:.3f} TB/s (read + write)")
    for label in ("hybrid", "teacher"):
        if label in fl:
            f = fl[label]
            lines.append(f"memory floor, {label}: {_fmt_bytes(f['weight_bytes'])} of weights -> "
                         f"{f['tok_s_all_weights']:.1f} tok/s; {_fmt_bytes(f['read_bytes_per_token'])} read per "
                         f"token -> {f['tok_s_read_weights']:.1f} tok/s (batch 1)")
    header = (f"{'section':8} {'model':8} {'engine':19} {'batch':>5} {'prompt':>7} {'new':>5} {'TTFT s':>8} "
              f"{'tok/s/seq':>10} {'tok/s all':>10} {'peak mem':>10} {'K/V':>10} {'state':>10}")
    lines += ["", header, "-" * len(header)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['section']:8} {r['model']:8} {'':19} {r.get('batch', 1):>5} "
                         f"{r.get('prompt_tokens', ''):>7}  error: {r['error']}")
            continue
        lines.append(
            f"{r['section']:8} {r['model']:8} {r['engine']:19} {r['batch']:>5} {r['prompt_tokens']:>7} "
            f"{r['new_tokens']:>5} {_fmt(r['ttft_s'], '8.3f')} {_fmt(r['decode_tok_s'], '10.1f')} "
            f"{_fmt(r['aggregate_tok_s'], '10.1f')} {_fmt_bytes(r['peak_mem_bytes']):>10} "
            f"{_fmt_bytes(r['kv_bytes']):>10} {_fmt_bytes(r['state_bytes']):>10}"
        )
    s = result.get("summary", {})
    if s:
        lines.append("")
        if "hybrid_batch1_decode_tok_s" in s:
            lines.append(f"hybrid, batch 1: {s['hybrid_batch1_decode_tok_s']:.1f} tok/s = "
                         f"{100 * s['hybrid_fraction_of_floor_all_weights']:.1f}% of the floor over all weights, "
                         f"{100 * s['hybrid_fraction_of_floor_read_weights']:.1f}% of the floor over the weights "
                         "read")
        if "target_tok_s" in s:
            lines.append(f"target >= {s['target_tok_s']} tok/s: {'met' if s['target_met'] else 'NOT met'}")
        for ctx, cell in s.get("max_batch", {}).items():
            parts = [f"{m} batch {c['batch']} -> {_fmt(c['aggregate_tok_s'], '.1f')} tok/s"
                     for m, c in cell.items() if isinstance(c, dict)]
            ratio = f"; hybrid {cell['hybrid_over_teacher']:.2f}x the teacher" if "hybrid_over_teacher" in cell else ""
            if "bytes_bound_over_teacher" in cell:  # what the bytes moved per step allow (speed_limit.py)
                ratio += f" (its bytes allow {cell['bytes_bound_over_teacher']:.2f}x)"
            lines.append(f"largest batch at {ctx} tokens: {', '.join(parts)}{ratio}")
        if "cache_ratio" in s:
            lines.append(f"at {s['context']} tokens: hybrid K/V + state {_fmt_bytes(s['hybrid_cache_bytes'])} = "
                         f"{100 * s['cache_ratio']:.1f}% of the teacher's K/V {_fmt_bytes(s['teacher_kv_bytes'])}; "
                         f"decode {s['hybrid_decode_tok_s']:.1f} vs {s['teacher_decode_tok_s']:.1f} tok/s")
    return "\n".join(lines)


def write_result(result: dict, path: str) -> None:
    from mamballama_cli.io import write_json_atomic

    write_json_atomic(path, result)
