"""The core of `mamballama generate TARGET --speculative --draft DRAFT`: options, the draft, the run, the summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from collections.abc import Callable

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.generation.runners import as_hybrid, is_hybrid
from mamballama_cli.generation.sampling import SamplingConfig
from mamballama_cli.generation.speculative import speculative_generate

# What `--speculative` alone decodes with: the context lookup, speculating only from 2-token matches. It needs no
# model or file; on the default teacher's 50% student it decoded 2.21x plain decoding at K = 6 on an H100, and the
# gate keeps prompts with little to copy near plain speed (docs/speculative.md).
DEFAULT_DRAFT = "lookup:3:gate=2"


def default_k(draft: str) -> int:
    """-k when none is given: 6 for a lookup draft (its proposals cost nothing; on an H100 K = 6 was its best
    window, 1.88x plain decoding against 1.74x at K = 4 and 1.85x at K = 7), 4 for a draft model."""
    return 6 if draft.partition(":")[0] == "lookup" else 4


@dataclass
class SpeculativeConfig:
    """Options of `generate --speculative` (the plain generate options plus these)."""

    target: str = ""
    draft: str = ""  # checkpoint dir, or a registered draft provider: NAME or NAME:ARG; empty: DEFAULT_DRAFT
    k: int | None = None  # draft tokens per round; None: default_k(draft)
    adaptive_k: bool = False  # -k is then the largest window; each round's follows the acceptance so far
    round_graph: bool = False  # the whole round on the device (generation/captured_round.py)
    prompt: str = ""
    chat: bool = False
    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    cuda_graphs: bool | None = None  # None = on CUDA
    compare_plain: bool = True  # also time the target's plain decoding in the same run
    draft_runner: str = "auto"

    def validate(self) -> None:
        self.draft = self.draft or DEFAULT_DRAFT
        if self.k is None:
            self.k = default_k(self.draft)
        if self.k < 1:
            raise UsageError(f"-k {self.k}: the draft must propose at least one token per round; use -k 4")
        if self.k > 32:
            raise UsageError(f"-k {self.k} is larger than 32; acceptance falls geometrically, use -k 4 to 8")
        if self.draft_runner not in ("auto", "hybrid", "transformers", "refeed"):
            raise UsageError(f"--draft-runner {self.draft_runner!r} is not one of auto, hybrid, transformers, refeed")


def resolve_draft(spec: str):
    """("dir", spec) for a checkpoint directory (or 'default'), else ("provider", DraftSpec, arg) for a
    provider of the mamballama.drafts group named NAME[:ARG]. Cheap: call it before loading anything."""
    from pathlib import Path

    from mamballama_cli import plugins

    if Path(spec).expanduser().is_dir() or spec == "default":
        return ("dir", spec)
    name, _, arg = spec.partition(":")
    provider = plugins.drafts.get(name)
    if provider is None:
        known = ", ".join(plugins.drafts.names())
        raise UsageError(f"--draft {spec!r} is neither a checkpoint directory nor a draft provider ({known}); "
                         "pass a directory from `convert --draft-layers` or e.g. --draft self")
    return ("provider", provider, arg or None)


def load_draft(spec: str, target, target_path, dtype: str, device: str):
    """(model, tokenizer or None, description) for a --draft value (see :func:`resolve_draft`)."""
    from mamballama_cli.loading import load_causal_lm

    where = resolve_draft(spec)
    if where[0] == "dir":
        model, tok, _ = load_causal_lm(spec, dtype=dtype, device=device)
        return model, tok, f"path:{spec}"
    _, provider, arg = where
    model = provider.load(target, path=arg, arg=arg, target_path=str(target_path))
    if isinstance(model, tuple):
        model = model[0]
    ref = next(target.parameters())
    if hasattr(model, "to"):
        model = model.to(device=ref.device, dtype=ref.dtype).eval()
    return model, None, f"{provider.name}:{arg}" if arg else provider.name


def check_same_tokenizer(target_tok, draft_tok, target, draft) -> None:
    tv = getattr(target.config, "vocab_size", None)
    dv = getattr(getattr(draft, "config", None), "vocab_size", tv)
    if tv != dv:
        raise MamballamaError(f"the draft's vocabulary ({dv} tokens) differs from the target's ({tv}); a draft "
                              "must share the target's tokenizer")
    if target_tok is not None and draft_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab():
        raise MamballamaError("the draft's tokenizer differs from the target's; a draft must share the tokenizer")
    table = getattr(draft, "loaded", None)  # a lookup draft's n-gram table records the tokenizer of its text
    if table is not None and table.tokenizer and target_tok is not None:
        from mamballama_cli.shards import same_tokenizer, tokenizer_identity

        if not same_tokenizer(table.tokenizer, tokenizer_identity(target_tok)):
            raise MamballamaError(f"--draft {draft}: the n-gram table was built from text of another tokenizer "
                                  f"than the target's; build it from `data generate` shards of this target")


def prepare_pair(target, tok, target_path, name: str, draft_spec: str, dtype: str, device: str):
    """(target as a hybrid, draft, draft description) for speculative decoding: a plain Llama-family target
    runs through the same static-cache runner; the draft must share the target's tokenizer."""
    if not is_hybrid(target):
        converted = as_hybrid(target)
        if converted is None:
            raise MamballamaError(f"target {name!r} ({type(target).__name__}) is not a mamballama hybrid nor "
                                  "a Llama-family model; speculative decoding needs one of those as target")
        target = converted
    draft, draft_tok, draft_name = load_draft(draft_spec, target, target_path, dtype, device)
    check_same_tokenizer(tok, draft_tok, target, draft)
    return target, draft, draft_name


def run_speculative(cfg: SpeculativeConfig, on_text: Callable[[str], None] | None = None) -> dict:
    """Load target and draft, decode speculatively (streaming text), optionally time plain decoding of the
    same prompt and length, and return the statistics."""
    from mamballama_cli.generation.plain import check_request, encode_prompt, generate
    from mamballama_cli.generation.result import TextStream, stop_token_ids
    from mamballama_cli.loading import load_causal_lm

    resolve_draft(cfg.draft)  # a bad --draft fails before any weights are read
    target, tok, target_path = load_causal_lm(cfg.target, dtype=cfg.dtype, device=cfg.device)
    if tok is None:
        raise MamballamaError(f"model {cfg.target!r} has no tokenizer files; convert it again or copy the teacher's")
    target, draft, draft_name = prepare_pair(target, tok, target_path, cfg.target, cfg.draft, cfg.dtype, cfg.device)
    ids = encode_prompt(tok, cfg.prompt, cfg.chat, cfg.system).to(next(target.parameters()).device)
    check_request(target, ids.shape[1], cfg.max_new_tokens, "transformers")  # empty prompt, context length
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, seed=cfg.seed)
    stops = stop_token_ids(target, tok)
    stream = TextStream(tok, on_text)
    shown = [0]

    def on_tokens(tokens: list[int]) -> None:
        stream.push(tokens[shown[0]:])
        shown[0] = len(tokens)

    if ids.device.type == "cuda" and cfg.compare_plain:
        # Warm-up, as for the plain run below: the first call compiles the Triton kernels (tens of seconds),
        # which would otherwise sit inside the timed run and swamp the speedup.
        speculative_generate(target, draft, ids, k=cfg.k, max_new_tokens=2 * (cfg.k + 1), sampling=sampling,
                             stop_tokens=stops, seed=cfg.seed, cuda_graphs=cfg.cuda_graphs,
                             draft_runner=cfg.draft_runner, captured_round=cfg.round_graph)
    result = speculative_generate(
        target, draft, ids, k=cfg.k, max_new_tokens=cfg.max_new_tokens, sampling=sampling, stop_tokens=stops,
        seed=cfg.seed, cuda_graphs=cfg.cuda_graphs, draft_runner=cfg.draft_runner, on_tokens=on_tokens,
        adaptive=cfg.adaptive_k, captured_round=cfg.round_graph,
    )
    text = stream.finish()
    s = result.stats
    stats = {"mode": "speculative", "target": str(target_path), "draft": draft_name, **s.as_dict(), **result.extra,
             "sampling": asdict(sampling), "device": str(ids.device),
             "dtype": str(next(target.parameters()).dtype).replace("torch.", "")}
    if cfg.compare_plain:
        plain_cfg = replace(sampling, max_new_tokens=max(1, s.new_tokens))
        generate(target, tok, ids, SamplingConfig(max_new_tokens=2))  # warm-up: kernels compiled, caches hot
        plain = generate(target, tok, ids, plain_cfg)
        stats["plain"] = {"new_tokens": plain.new_tokens, "total_s": round(plain.total_s, 4),
                          "time_to_first_token_s": round(plain.time_to_first_token_s, 4),
                          "decode_tokens_per_s": round(plain.decode_tokens_per_s, 2),
                          "tokens_per_s": round(plain.new_tokens / plain.total_s, 2) if plain.total_s > 0 else None}
        if plain.new_tokens and s.new_tokens and plain.total_s > 0:
            plain_rate = plain.new_tokens / plain.total_s
            stats["speedup"] = round(s.tokens_per_s / plain_rate, 3)
            if math.isfinite(plain.decode_tokens_per_s) and math.isfinite(s.decode_tokens_per_s):
                stats["decode_speedup"] = round(s.decode_tokens_per_s / plain.decode_tokens_per_s, 3)
        if sampling.greedy:
            n = min(len(plain.token_ids), len(result.tokens[0]))
            stats["matches_plain_greedy"] = plain.token_ids[:n] == result.tokens[0][:n]
    stats["text"] = text
    return stats


def format_stats(stats: dict) -> str:
    def num(key, fmt):
        v = stats.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    # The target's calls are the prefill plus one verify call per round: the same count as target_calls in the
    # statistics JSON (tokens/call is per verify call, as tokens_per_call).
    kinfo = f"k<={stats['k']} adaptive" if stats.get("adaptive_k") else f"k={stats['k']}"
    kinfo = f"draft {stats['draft']}, {kinfo}" if stats.get("draft") else kinfo
    steps = stats.get("step_rounds") or 0  # a gated lookup draft's one-token rounds (host rounds, as rounds)
    calls = f"{stats['rounds'] - steps} verify, {steps} one-token" if "step_rounds" in stats else \
        f"{stats['rounds']} verify"
    line = (f"[speculative {kinfo}: {stats['new_tokens']} new tokens in {stats['target_calls']} target calls "
            f"(prefill + {calls}); "
            f"acceptance {num('acceptance_rate', '.3f')}, {num('tokens_per_call', '.2f')} tokens/call (verify), "
            f"{num('tokens_per_s', '.1f')} tok/s")
    if "plain" in stats:
        line += (f"; plain {stats['plain']['tokens_per_s']} tok/s, speedup {stats.get('speedup', float('nan'))}x "
                 f"(decode only: {stats.get('decode_speedup', float('nan'))}x)")
    if "matches_plain_greedy" in stats:
        line += f"; greedy output {'matches' if stats['matches_plain_greedy'] else 'DIFFERS FROM'} plain decoding"
    return line + f"; {stats['device']} {stats['dtype']}]"
