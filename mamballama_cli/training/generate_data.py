"""`mamballama data generate`: the teacher writes training data at scale, as resumable token shards.

Rows are chat prompts (rendered with the teacher's chat template and a generation prompt; the teacher answers)
and, for ``continuation_fraction`` of them, free continuations: a window of 16-64 tokens of packaged plain text
that the teacher continues without any template. Sampling runs on the static batched decoder
(generation/fast.py: the step captured in a CUDA graph on CUDA, eager on CPU); a plain Transformer teacher is
first converted at ratio 1.0 (every layer keeps attention), which computes exactly the same function.

The decoder needs one prompt length per batch: a batch prefills its shortest prompt and reads the rest of the
longer ones as forced tokens. Rows are drawn a window of several batches at a time and sorted by length, so
the prompts of one batch are of similar length and few steps go to forced tokens.

Shard ``k`` is a pure function of (seed, k) and the options: its row choices come from a numpy generator
seeded with [seed, k] and its samples from ``torch.manual_seed`` of a hash of the same, so a resumed run writes
what an uninterrupted one would have (on CPU; CUDA kernels are deterministic here too, but that is not
promised). Output format: mamballama_cli/shards.py and docs/data.md. The teacher's side (loading it for the
static decoder, the batch size, :class:`BatchSampler`) is in training/teacher_decode.py.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log
from mamballama_cli.training.teacher_decode import BatchSampler, auto_batch_size, load_generator

BUILTIN = "builtin"
CONTINUATION_TOKENS = (16, 64)  # window of plain text a free continuation starts from (inclusive)
WINDOW_BATCHES = 8  # rows are sorted by length over this many batches at a time
WINDOW_CHARS = 12 * CONTINUATION_TOKENS[1]  # characters tokenised for one continuation window (ample for 64 tokens)
MIN_TEXT_CHARS = 64  # shorter texts (fewer than ~16 tokens of prose) are not used for continuations

# Options that decide what the shards hold: a resumed run must use the same ones.
CONTENT_KEYS = ("teacher", "prompts", "continuation_fraction", "temperature", "top_p", "top_k", "max_new_tokens",
                "max_prompt_tokens", "batch_size", "shard_tokens", "seed", "dtype", "data_split", "text_field",
                "skip_bad_lines")


@dataclass
class GenerateDataConfig:
    """Options of `mamballama data generate` (also readable from --config FILE)."""

    teacher: str = "default"
    prompts: str = BUILTIN  # 'builtin', or comma-separated JSONL files / local data sets (prompts, messages, text)
    tokens: int = 0  # stop once this many tokens (prompt + sampled) are written
    output: str = ""
    continuation_fraction: float = 0.5
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    max_prompt_tokens: int = 1024  # longer chat prompts are left out
    batch_size: int | None = None  # default: on CUDA as many rows as fit (up to 1024), 8 on CPU
    shard_tokens: int = 1_000_000
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    sync_every: int | None = None  # decode steps between host checks for "all rows finished" (64 on CUDA)
    data_split: str = "train"  # split of a saved DatasetDict given in --prompts
    text_field: str | None = None  # field of --prompts records holding the prompt (string or message list)
    skip_bad_lines: bool = False
    resume: bool = False
    force: bool = False

    def validate(self) -> None:
        if not self.output:
            raise UsageError("--output is required: the folder to write the shards and manifest.json to")
        if self.tokens < 1:
            raise UsageError(f"--tokens {self.tokens} must be at least 1: how many tokens to write in all")
        if self.resume and self.force:
            raise UsageError("--force and --resume contradict each other: --force starts over, --resume continues")
        if not 0.0 <= self.continuation_fraction <= 1.0:
            raise UsageError(f"--continuation-fraction {self.continuation_fraction} must be in [0, 1]")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UsageError("--temperature must be >= 0 (0 = greedy), --top-p in (0, 1] and --top-k >= 0")
        for name in ("max_new_tokens", "shard_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.max_prompt_tokens < CONTINUATION_TOKENS[1] + 2:
            raise UsageError(f"--max-prompt-tokens {self.max_prompt_tokens} must be at least "
                             f"{CONTINUATION_TOKENS[1] + 2}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if self.sync_every is not None and self.sync_every < 1:
            raise UsageError(f"--sync-every {self.sync_every} must be at least 1")


# ================================================================================================
# Prompts
# ================================================================================================
@dataclass
class PromptPool:
    """Token ids of everything a row can start from."""

    chat: list[np.ndarray]  # rendered chat prompts, generation prompt included
    texts: list[str]  # plain-text documents that continuation windows are cut from (tokenised when drawn)
    prefix: list[int]  # what the tokenizer puts before plain text (a BOS token, or nothing)
    tok: object = None
    info: dict = field(default_factory=dict)

    def windows(self, specs: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """Per (doc, start, n): the prefix, then ``n`` tokens of text ``doc`` from the first word boundary at or
        after character ``start`` (fewer near the end of a short text). One tokenizer call for all."""
        pieces = []
        for doc, start, _ in specs:
            text = self.texts[doc]
            if start > 0:
                space = text.find(" ", start, start + 200)
                start = space + 1 if space >= 0 else start
            pieces.append(text[start:start + WINDOW_CHARS])
        encoded = self.tok(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        return [np.asarray(self.prefix + list(ids[:n]), dtype=np.int32) for ids, (_, _, n) in zip(encoded, specs)]


def _builtin_records() -> tuple[list[list[dict]], list[str]]:
    """Chat prompts and plain texts of the packaged sources `data build` uses, held-out split excluded."""
    from mamballama_cli.corpus import BUILDERS, DataBuildConfig, is_heldout

    dcfg = DataBuildConfig(output="-")
    chats, texts = [], []
    for build in BUILDERS.values():
        try:
            records = list(build(dcfg))
        except ImportError:  # the source's package is not installed
            continue
        for rec in records:
            if is_heldout(rec.id, dcfg.heldout_fraction, dcfg.seed):
                continue
            if rec.kind == "prompt":
                chats.append([{"role": "user", "content": rec.body}])
            else:
                texts.append(rec.body)
    return chats, texts


def _file_records(spec: str, cfg: GenerateDataConfig) -> tuple[list[list[dict]], list[str]]:
    """Chat prompts ('prompt' or 'messages') and texts ('text') of a JSONL file or local data set; of a `data build`
    folder, its train split's prompts, texts and recall documents."""
    from mamballama_cli.corpus import folder_files
    from mamballama_cli.training.records import DataError, load_records

    files = folder_files(Path(spec), ("prompts", "text", "recall"), "train") if Path(spec).is_dir() else None
    if files is not None:
        log(f"prompts {spec}: the train split of a `data build` folder: {', '.join(f.name for f in files)}")
        chats, texts = [], []
        for f in files:
            c, t = _file_records(str(f), cfg)
            chats += c
            texts += t
        return chats, texts
    chats, texts, bad = [], [], []
    for rec in load_records(spec, split=cfg.data_split, skip_bad=cfg.skip_bad_lines, text_field=cfg.text_field,
                            string_key="prompt"):
        d = rec.data
        if isinstance(d.get("prompt"), str) and d["prompt"].strip():
            chats.append([{"role": "user", "content": d["prompt"]}])
        elif isinstance(d.get("messages"), list) and d["messages"]:
            msgs = [dict(m) for m in d["messages"] if isinstance(m, dict)]
            while msgs and msgs[-1].get("role") == "assistant":  # the teacher writes the answer
                msgs.pop()
            if msgs and all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
                chats.append(msgs)
            else:
                bad.append(f"{rec.where}: 'messages' needs a turn before the answer, each with 'role' and 'content'")
        elif isinstance(d.get("text"), str) and d["text"].strip():
            texts.append(d["text"])
        else:
            bad.append(f"{rec.where}: expected a 'prompt' string, a 'messages' list or a 'text' string, found "
                       f"{sorted(d)[:6]}")
        if bad and not cfg.skip_bad_lines:
            raise DataError(f"{bad[0]} (fix it, or pass --skip-bad-lines to skip such records)")
    if bad:
        log(f"warning: skipped {len(bad)} bad record(s) in {spec}; first: {bad[0]}")
    return chats, texts


def build_pool(cfg: GenerateDataConfig, tok) -> PromptPool:
    """Read and tokenise every prompt source of ``--prompts``."""
    chats: list[list[dict]] = []
    texts: list[str] = []
    parts = [p.strip() for p in cfg.prompts.split(",") if p.strip()]
    if not parts:
        raise UsageError("--prompts names nothing: pass 'builtin' or JSONL files / data sets, comma-separated")
    for part in parts:
        c, t = _builtin_records() if part == BUILTIN else _file_records(part, cfg)
        chats += c
        texts += t
    note = None
    if cfg.continuation_fraction > 0 and not texts and BUILTIN not in parts:
        texts = _builtin_records()[1]
        note = "no 'text' records in --prompts: free continuations start from the packaged text (builtin)"
        log(f"note: {note}")
    need_chat, need_text = cfg.continuation_fraction < 1, cfg.continuation_fraction > 0
    if need_chat and not chats:
        raise MamballamaError(f"--prompts {cfg.prompts} holds no chat prompt ('prompt' or 'messages' records); "
                              "add some, or pass --continuation-fraction 1 for free continuations only")
    if need_chat and not getattr(tok, "chat_template", None):
        raise MamballamaError("the teacher's tokenizer has no chat template, so chat prompts cannot be rendered; "
                              "pass --continuation-fraction 1 for free continuations only")

    chat_ids, too_long = [], 0
    if need_chat:
        rendered = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
        for ids in tok(rendered, add_special_tokens=False)["input_ids"]:
            if len(ids) > cfg.max_prompt_tokens:
                too_long += 1
            elif ids:
                chat_ids.append(np.asarray(ids, dtype=np.int32))
        if too_long:
            log(f"note: {too_long} chat prompt(s) longer than --max-prompt-tokens {cfg.max_prompt_tokens} left out")
        if not chat_ids:
            raise MamballamaError(f"every chat prompt is longer than --max-prompt-tokens {cfg.max_prompt_tokens}; "
                                  "raise it")
    long_texts = [t for t in texts if len(t) >= MIN_TEXT_CHARS] if need_text else []
    if need_text and not long_texts:
        raise MamballamaError(f"no plain text of at least {MIN_TEXT_CHARS} characters to start free continuations "
                              "from; add 'text' records to --prompts or pass --continuation-fraction 0")
    prefix = list(tok("", add_special_tokens=True)["input_ids"])  # e.g. [bos] for Llama tokenizers, [] for ChatML
    info = {"sources": parts, "chat_prompts": len(chat_ids), "chat_prompts_too_long": too_long,
            "texts": len(long_texts), "text_chars": int(sum(len(t) for t in long_texts)),
            "continuation_prefix": prefix}
    if note:
        info["note"] = note
    return PromptPool(chat_ids, long_texts, prefix, tok, info)


def shard_batches(pool: PromptPool, cfg: GenerateDataConfig, index: int, batch_size: int):
    """Endless batches of prompts (token ids) for shard ``index``.

    Rows are drawn a window of WINDOW_BATCHES batches at a time and sorted by length, so that one batch holds
    prompts of similar lengths; the window's batches then come in a seeded order, so that where a shard ends
    (mid-window) does not favour short or long prompts.

    A pure function of (seed, index): chat prompts come in seeded permutations (each used once before any
    repeats), continuation windows of a seeded 16-64 tokens at seeded positions of seeded texts (a window
    starts at a word boundary; one near the end of a short text may hold fewer tokens).
    """
    rng = np.random.default_rng([cfg.seed, index])
    perm, cursor = np.zeros(0, dtype=np.int64), 0
    lo, hi = CONTINUATION_TOKENS
    while True:
        rows: list = []
        specs, slots = [], []
        for _ in range(batch_size * WINDOW_BATCHES):
            if pool.texts and (not pool.chat or rng.random() < cfg.continuation_fraction):
                doc = int(rng.integers(len(pool.texts)))
                n = int(rng.integers(lo, hi + 1))
                start = int(rng.integers(0, max(1, len(pool.texts[doc]) - WINDOW_CHARS)))
                specs.append((doc, start, n))
                slots.append(len(rows))
                rows.append(None)
            else:
                if cursor == len(perm):
                    perm, cursor = rng.permutation(len(pool.chat)), 0
                rows.append((pool.chat[int(perm[cursor])], False))
                cursor += 1
        for i, ids in zip(slots, pool.windows(specs)):
            rows[i] = (ids, True)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # stable: ties keep their draw order
        batches = [[rows[i][0] for i in order[b:b + batch_size]] for b in range(0, len(order), batch_size)]
        for b in rng.permutation(len(batches)):
            yield batches[int(b)]


def prefetched(iterator, depth: int = 1):
    """Iterate ``iterator`` on a background thread, ``depth`` items ahead: the next rows are drawn and tokenised
    while the device decodes the current batch. Same items in the same order."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterator:
                if not put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer
            put((None, exc))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            yield item
    finally:
        stop.set()
        worker.join()  # the tokenizer is not shared between two threads: the next shard's worker waits for this one


def torch_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") & (2**63 - 1)


# ================================================================================================
# Shards
# ================================================================================================
def make_shard(sampler: BatchSampler, pool: PromptPool, cfg: GenerateDataConfig, index: int, target: int,
               limit: int, on_tokens: Callable[[int], None] | None = None):
    """Shard ``index``: whole batches until ``target`` tokens are reached (no sampled sequence is thrown away),
    except that it stops at the sequence that reaches ``limit`` (what the run still has to write)."""
    import torch

    from mamballama_cli.shards import Shard

    torch.manual_seed(torch_seed(cfg.seed, index))
    seqs: list[tuple[np.ndarray, int]] = []
    total = 0
    for batch in prefetched(shard_batches(pool, cfg, index, sampler.batch_size)):
        before = total
        for seq, plen in sampler.run(batch):
            seqs.append((seq, plen))
            total += len(seq)
            if total >= limit:
                break
        if on_tokens is not None:
            on_tokens(total - before)
        if total >= target:
            return Shard.from_sequences(seqs)
    raise AssertionError("unreachable: shard_batches is endless")


# ================================================================================================
# The command
# ================================================================================================
def content_config(cfg: GenerateDataConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in CONTENT_KEYS}


def prepare_output(cfg: GenerateDataConfig, content: dict) -> tuple[Path, dict | None]:
    """Check the output folder before any expensive work: (folder, manifest to resume from or None)."""
    from mamballama_cli.io import check_output_dir
    from mamballama_cli.shards import MANIFEST, read_manifest, verify_shard

    out = Path(cfg.output)
    if not cfg.resume or not (out.is_dir() and any(out.iterdir())):
        if out.is_dir() and any(out.iterdir()) and not cfg.force:
            raise UsageError(f"--output {out} exists and is not empty; pass --resume to continue it, --force to "
                             "replace it, or choose another folder")
        check_output_dir(out, cfg.force)
        return out, None
    if not (out / MANIFEST).is_file():
        raise UsageError(f"--resume: {out} holds no {MANIFEST}, so it is not a `data generate` output; choose "
                         "another --output or pass --force to replace it")
    manifest = read_manifest(out)
    old = manifest.get("config") or {}
    if content["batch_size"] is None:  # not given: the batch size the run was started with
        content["batch_size"] = cfg.batch_size = old.get("batch_size")
    diffs = [f"{k}: {old.get(k)!r} -> {content[k]!r}" for k in CONTENT_KEYS if old.get(k) != content[k]]
    if diffs:
        raise UsageError(f"--resume: {out} was generated with other options ({'; '.join(diffs)}); resume with the "
                         "same ones or pass --force to start over")
    for entry in manifest.get("shards", []):
        verify_shard(out, entry)
    return out, manifest


def remove_partial_files(out: Path, keep: set[str]) -> list[str]:
    """Temporary files of a killed run, and shard files the manifest does not list (written, not recorded)."""
    removed = []
    for p in out.iterdir():
        partial = p.name.startswith(".") and ".tmp-" in p.name
        unlisted = p.name.startswith("shard-") and p.name.endswith(".safetensors") and p.name not in keep
        if p.is_file() and (partial or unlisted):
            p.unlink()
            removed.append(p.name)
    return removed


def run_generate(cfg: GenerateDataConfig, on_progress: Callable[[int, int], None] | None = None,
                 generator=None, sampler: BatchSampler | None = None) -> dict:
    """Write shards until ``cfg.tokens`` tokens are on disk; returns the summary (the manifest's totals).

    ``on_progress(tokens_written, tokens_wanted)`` is called after every batch. ``generator`` (model, tokenizer,
    name, stop ids) skips loading the teacher and ``sampler`` building (and capturing) the decoder: the
    benchmark passes random weights and a warmed-up sampler this way.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from mamballama_cli.generation.sampling import SamplingConfig
    from mamballama_cli.io import write_json_atomic
    from mamballama_cli.loading import resolve_device, resolve_dtype
    from mamballama_cli.shards import FORMAT, MANIFEST, VERSION, shard_name, tokenizer_identity, write_shard

    hf_logging.disable_progress_bar()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    cfg.dtype = str(dtype).replace("torch.", "")
    out, manifest = prepare_output(cfg, content_config(cfg))
    if generator is None:
        generator = load_generator(cfg.teacher, device, dtype)
    model, tok, name, stops = generator
    if cfg.batch_size is None:
        cfg.batch_size = auto_batch_size(model, cfg.max_prompt_tokens + cfg.max_new_tokens, device)
    if sampler is not None and (sampler.batch_size != cfg.batch_size or sampler.max_new != cfg.max_new_tokens):
        raise ValueError("the sampler passed in was built for another batch size or --max-new-tokens")
    pool = build_pool(cfg, tok)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k)
    ident = tokenizer_identity(tok)
    if manifest is not None and manifest.get("tokenizer") != ident:
        raise UsageError(f"--resume: the teacher's tokenizer is not the one {out} was written with; pass --force "
                         "to start over")
    if manifest is None:
        if out.exists() and cfg.force:
            import shutil

            shutil.rmtree(out)
        manifest = {"format": FORMAT, "version": VERSION, "complete": False, "target_tokens": cfg.tokens,
                    "tokens": 0, "sampled_tokens": 0, "sequences": 0, "shards": []}
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_partial_files(out, {e["file"] for e in manifest["shards"]})
    if removed:
        log(f"note: removed {len(removed)} partial file(s) of an interrupted run: {', '.join(sorted(removed)[:4])}")
    manifest.update({
        "target_tokens": cfg.tokens, "teacher": name, "tokenizer": ident, "seed": cfg.seed,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                     "max_new_tokens": cfg.max_new_tokens, "stop_token_ids": stops},
        "continuation_fraction": cfg.continuation_fraction, "prompts": pool.info,
        "device": str(device), "dtype": cfg.dtype, "config": asdict(cfg),
    })
    already = int(manifest["tokens"])
    log(f"data generate: {name} on {device} ({cfg.dtype}), batch {cfg.batch_size}, "
        f"{'greedy' if sampling.greedy else f'temperature {cfg.temperature}'}, up to {cfg.max_new_tokens} new tokens; "
        f"{pool.info['chat_prompts']} chat prompt(s), {pool.info['texts']} text(s) for continuations "
        f"({cfg.continuation_fraction:.0%}); {already:,} of {cfg.tokens:,} tokens already written -> {out}")
    t0 = time.perf_counter()
    written_now = 0

    def progress(n: int) -> None:
        nonlocal written_now
        written_now += n
        if on_progress is not None:
            on_progress(already + written_now, cfg.tokens)

    if on_progress is not None:
        on_progress(already, cfg.tokens)
    while manifest["tokens"] < cfg.tokens:
        if sampler is None:
            sampler = BatchSampler(model, stops, sampling, cfg.batch_size, cfg.max_prompt_tokens, cfg.sync_every)
        index = len(manifest["shards"])
        left = cfg.tokens - manifest["tokens"]
        with torch.no_grad():
            shard = make_shard(sampler, pool, cfg, index, min(cfg.shard_tokens, left), left, progress)
        fname = shard_name(index)
        digest = write_shard(out / fname, shard)
        manifest["shards"].append({"file": fname, "tokens": shard.n_tokens, "sampled_tokens": shard.n_sampled,
                                   "sequences": shard.n_sequences, "sha256": digest})
        manifest["tokens"] += shard.n_tokens
        manifest["sampled_tokens"] += shard.n_sampled
        manifest["sequences"] += shard.n_sequences
        manifest["complete"] = manifest["tokens"] >= cfg.tokens
        manifest["engine"] = sampler.engine
        write_json_atomic(out / MANIFEST, manifest)
    seconds = time.perf_counter() - t0
    fresh = manifest["tokens"] - already
    return {
        "output": str(out), "complete": manifest["complete"], "tokens": manifest["tokens"],
        "sampled_tokens": manifest["sampled_tokens"], "sequences": manifest["sequences"],
        "shards": len(manifest["shards"]), "tokens_this_run": fresh, "seconds": round(seconds, 2),
        "tokens_per_s": round(fresh / seconds, 1) if seconds > 0 and fresh else None,
        "teacher": name, "device": str(device), "dtype": cfg.dtype, "batch_size": cfg.batch_size,
        "engine": sampler.engine if sampler else manifest.get("engine"),
    }
