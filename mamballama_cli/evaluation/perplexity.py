"""Perplexity of student and teacher on the same text, plus how closely the student tracks the teacher.

Text is cut into non-overlapping windows of ``max_length`` tokens (each window starts fresh, so every
model sees exactly the same contexts); every token after the first of a window is predicted. Per
window and model: the summed negative log-likelihood; with a teacher also, per position, whether the
two argmax tokens agree and KL(teacher || student) of the next-token distributions.

    perplexity = exp(sum NLL / predicted tokens)
    agreement  = fraction of positions whose argmax tokens are equal
    KL         = mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v))   (nats per token)

Standard errors treat tokens as independent (they are not quite): se(mean NLL) = std / sqrt(n), and
se(perplexity) = perplexity * se(mean NLL) (delta method).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mamballama_cli.errors import UsageError
from mamballama_cli.io import read_jsonl


def load_documents(path: str, field: str = "text") -> list[str]:
    """A .jsonl file gives one document per line (``field``); any other file is one document."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--ppl-data {path}: no such file; pass .txt or .jsonl files")
    if p.suffix.lower() != ".jsonl":
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise UsageError(f"--ppl-data {path} is empty")
        return [text]
    docs = []
    hint = f'; each line must be an object like {{"{field}": "..."}}'
    for n, obj in read_jsonl(p, f"--ppl-data {path}", hint):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise UsageError(f"--ppl-data {path} line {n} has no string field {field!r}; set --ppl-field")
        docs.append(obj[field])
    if not docs:
        raise UsageError(f"--ppl-data {path} holds no documents")
    return docs


def token_windows(tokenizer, docs: list[str], max_length: int, max_tokens: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``max_length`` tokens, per document, ``max_tokens`` in all."""
    windows, total = [], 0
    for doc in docs:
        ids = tokenizer(doc)["input_ids"]
        for start in range(0, len(ids), max_length):
            win = ids[start:start + max_length]
            win = win[: max(0, max_tokens - total)]
            if len(win) < 2:
                break
            windows.append(win)
            total += len(win)
        if total >= max_tokens:
            break
    return windows


@torch.inference_mode()
def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """(seqlen - 1, vocab) float32 log-probabilities of each next token."""
    logits = model(input_ids=ids[None]).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def _moments(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate_windows(windows: list[list[int]], student, teacher=None, on_window=None) -> dict:
    """Per-token statistics over all windows for the student (and teacher, agreement, KL when given).
    ``on_window(done, total)`` is called after each window (progress)."""
    nll = {"student": [], "teacher": []}
    agree: list[float] = []
    kl: list[float] = []
    device = next(student.parameters()).device
    for done, win in enumerate(windows, 1):
        ids = torch.tensor(win, device=device)
        target = ids[1:]
        lp_s = _log_probs(student, ids)  # (seqlen - 1, vocab)
        nll["student"] += (-lp_s.gather(-1, target[:, None])[:, 0]).tolist()
        if teacher is not None:
            lp_t = _log_probs(teacher, ids.to(next(teacher.parameters()).device)).to(device)
            if lp_t.shape[-1] != lp_s.shape[-1]:
                raise UsageError(f"teacher and student vocabularies differ ({lp_t.shape[-1]} vs {lp_s.shape[-1]}); "
                                 "agreement and KL need the same tokenizer")
            nll["teacher"] += (-lp_t.gather(-1, target[:, None])[:, 0]).tolist()
            agree += (lp_t.argmax(-1) == lp_s.argmax(-1)).float().tolist()
            kl += (lp_t.exp() * (lp_t - lp_s)).sum(-1).tolist()
        if on_window is not None:
            on_window(done, len(windows))
    out = {"windows": len(windows), "tokens": len(nll["student"])}
    for role, values in nll.items():
        if not values:
            continue
        mean, se = _moments(values)
        ppl = math.exp(mean)
        out[role] = {"nll_per_token": mean, "perplexity": ppl, "perplexity_stderr": ppl * se}
    if teacher is not None:
        a, a_se = _moments(agree)
        k, k_se = _moments(kl)
        out["agreement"] = {"value": a, "stderr": a_se}
        out["kl_teacher_student"] = {"value": k, "stderr": k_se}
    return out
