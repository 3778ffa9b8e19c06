"""What the benchmark scripts share: a character-level ChatML tokenizer for random teachers, and the facts
and file writing of a result (imported by scripts run as ``python benchmarks/NAME.py``, whose folder is then
first on sys.path)."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer(chars: list[str]):
    """A word-level tokenizer of ``SPECIALS`` then one token per character of ``chars`` (ids in that order),
    with ChatML specials and template: (the tokenizer, its vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE
    return tok, len(vocab)


def run_facts(argv) -> dict:
    """The versions, the date and the command line of a result (``argv``: main's, None for sys.argv)."""
    import torch

    return {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }


def write_result(result: dict, json_out: str | None) -> None:
    """Write ``result`` as JSON to ``json_out`` (its folder made), when given."""
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def finish(result: dict, summary: str, json_out: str | None) -> dict:
    """Print a result's one-line summary, write the result (:func:`write_result`) and return it."""
    print(summary, flush=True)
    write_result(result, json_out)
    return result


def write_profile(step, sync, path: str, what: str = "one step") -> None:
    """torch.profiler's table of one call of ``step`` (then ``sync``), sorted by total device time where there is
    a GPU (CPU time otherwise; the CPU ops are in it either way, with their self time: host overhead shows), to
    ``path``."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        sync()
    averages = prof.key_averages()
    tables = [averages.table(sort_by="device_time_total" if torch.cuda.is_available() else "cpu_time_total",
                             row_limit=60, max_name_column_width=90)]
    if torch.cuda.is_available():  # where the host spends its time (launch overhead, allocation, copies)
        tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n\n".join(tables) + "\n")
    print(f"profile of {what} written to {path}", file=sys.stderr)
