"""Passkey retrieval and needle-in-a-haystack on a grid of context lengths x needle depths.

Each (length, depth) cell holds several trials, each with its own random key drawn from a seeded
generator, so the teacher and the student see exactly the same prompts. A prompt is

    intro | filler before | needle sentence with the key | filler after | question

sized in the model's own tokens to the target length (the filler is whole sentences, so the real
length lands a few tokens short of the target; the real length is recorded). Depth is the fraction
of the filler placed before the needle: 0 = right after the intro, 1 = right before the question.

The prompt ends mid-sentence ("... The pass key is") so that base and chat models alike answer by
continuing it; the first integer of the greedy continuation is compared with the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from collections.abc import Callable

from mamballama_cli.errors import UsageError

PASSKEY, NEEDLE = "passkey", "needle"

_PASSKEY_INTRO = ("Somewhere in the long text below there is a pass key. Read all of it and remember the pass key; "
                  "you will be asked for it at the end.\n\n")
_PASSKEY_FILLER = [
    "The hills are quiet and the fields are wide. ",
    "A cart rolls slowly down the lane. ",
    "Clouds drift over the valley and move on. ",
    "Nothing much changes from one hour to the next. ",
    "The well in the village square is full of cold water. ",
]
_PASSKEY_NEEDLE = "Here is the pass key: {key}. Remember it: the pass key is {key}. "
_PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

_NEEDLE_INTRO = ("Below is a long document. One sentence in it states a special magic number. Read the whole "
                 "document, then answer the question after it.\n\nDocument:\n")
_NEEDLE = "The special magic number hidden in this document is {key}. "
_NEEDLE_QUESTION = ("\n\nQuestion: What is the special magic number hidden in the document?\n"
                    "Answer: The special magic number is")

PROMPT_VERSION = 1  # bump when the wording changes: cached cells then no longer match
_NUMBER = re.compile(r"\d+")


@dataclass
class Trial:
    kind: str
    length: int  # target tokens
    depth: float
    index: int
    key: str
    prompt: str
    n_tokens: int  # real tokens of the prompt (with the tokenizer's special tokens)
    needle_at: float  # where the needle actually landed, as a fraction of the filler tokens


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


class PromptBuilder:
    """Builds trials for one task and one tokenizer; sentence token counts are measured once."""

    def __init__(self, kind: str, tokenizer, haystack_sentences: list[str] | None = None):
        if kind not in (PASSKEY, NEEDLE):
            raise ValueError(kind)
        self.kind, self.tok = kind, tokenizer
        if kind == PASSKEY:
            self.intro, self.needle, self.question = _PASSKEY_INTRO, _PASSKEY_NEEDLE, _PASSKEY_QUESTION
            self.sentences = list(_PASSKEY_FILLER)
        else:
            self.intro, self.needle, self.question = _NEEDLE_INTRO, _NEEDLE, _NEEDLE_QUESTION
            if not haystack_sentences:
                raise UsageError("the needle task needs a haystack text with sentences")
            self.sentences = haystack_sentences
        # Token counts without special tokens: each sentence's share of the final prompt.
        # (max 1: a sentence that tokenises to nothing must still use up budget, or filling would never stop)
        ids = tokenizer(self.sentences, add_special_tokens=False)["input_ids"]  # one batched call
        self.counts = [max(1, len(x)) for x in ids]

    def fixed_tokens(self, key: str) -> int:
        return _count(self.tok, self.intro + self.needle.format(key=key) + self.question)

    def draw_key(self, rng: random.Random) -> str:
        return str(rng.randint(10000, 99999)) if self.kind == PASSKEY else str(rng.randint(1000000, 9999999))

    def build(self, length: int, depth: float, index: int, seed: int) -> Trial:
        rng = random.Random(f"{seed}/{self.kind}/{length}/{depth:.4f}/{index}")
        key = self.draw_key(rng)
        budget = length - self.fixed_tokens(key)
        if budget < 0:
            raise UsageError(f"--lengths {length}: shorter than the {self.kind} prompt without filler "
                             f"({length - budget} tokens); use longer lengths")
        start = rng.randrange(len(self.sentences))
        chosen: list[int] = []
        used = 0
        i = start
        while True:  # whole sentences, cycling through the text, until the next would overflow the budget
            c = self.counts[i % len(self.sentences)]
            if used + c > budget:
                break
            chosen.append(i % len(self.sentences))
            used += c
            i += 1
        # Needle after the sentence where the running token count first reaches depth * used.
        cut, running = 0, 0
        target = depth * used
        while cut < len(chosen) and running + self.counts[chosen[cut]] / 2 <= target:
            running += self.counts[chosen[cut]]
            cut += 1
        before = "".join(self.sentences[j] for j in chosen[:cut])
        after = "".join(self.sentences[j] for j in chosen[cut:])
        prompt = self.intro + before + self.needle.format(key=key) + after + self.question
        return Trial(self.kind, length, depth, index, key, prompt, _count(self.tok, prompt),
                     running / used if used else 0.0)


def shortest_prompt(kind: str, tokenizer) -> int:
    """Tokens of a prompt with no filler at all: lengths below this cannot be built."""
    intro, needle, question = ((_PASSKEY_INTRO, _PASSKEY_NEEDLE, _PASSKEY_QUESTION) if kind == PASSKEY
                               else (_NEEDLE_INTRO, _NEEDLE, _NEEDLE_QUESTION))
    return _count(tokenizer, intro + needle.format(key="9" * (5 if kind == PASSKEY else 7)) + question)


def first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def score_trials(trials: list[Trial], answer: Callable[[str], str]) -> dict:
    """Run ``answer(prompt) -> continuation`` on each trial; exact match of the first integer with the key."""
    rows = []
    for t in trials:
        text = answer(t.prompt)
        got = first_number(text)
        rows.append({"index": t.index, "key": t.key, "answer": text[:80], "parsed": got, "correct": got == t.key,
                     "n_tokens": t.n_tokens, "needle_at": round(t.needle_at, 4)})
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else float("nan"),
            "mean_tokens": sum(r["n_tokens"] for r in rows) / n if n else 0, "trials": rows}


def greedy_answerer(model, tokenizer, max_new_tokens: int) -> Callable[[str], str]:
    """answer(prompt) with the model's greedy continuation (no chat template: the prompt is a completion)."""
    from mamballama_cli.generation.plain import generate
    from mamballama_cli.generation.sampling import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    def answer(prompt: str) -> str:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        return generate(model, tokenizer, ids, sampling).text

    return answer


def trial_summary(t: Trial) -> dict:
    d = asdict(t)
    d.pop("prompt")
    return d
