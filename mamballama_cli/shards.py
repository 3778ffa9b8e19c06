"""Token shards: what `mamballama data generate` writes and `distill` / `sft` read (docs/data.md).

A shard directory holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... and ``manifest.json``.
Each shard is a safetensors file (no pickle) of three flat arrays:

    tokens       int32 (n_tokens,)         every sequence, one after the other
    offsets      int64 (n_sequences + 1,)  sequence i is tokens[offsets[i]:offsets[i + 1]]; offsets[0] = 0
    prompt_lens  int32 (n_sequences,)      how many leading tokens of sequence i were prompt (not sampled)

The manifest lists the complete shards with their token counts and sha256, the sampling settings, the seed,
the teacher and the identity of its tokenizer (name, vocabulary size, a hash of the vocabulary). Shards and
the manifest are written under a temporary name and renamed, so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mamballama_cli.errors import MamballamaError

FORMAT = "mamballama-shards"
VERSION = 1
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def tokenizer_identity(tok) -> dict:
    """What must agree between the tokenizer that wrote shards and the one that trains on them."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"name_or_path": str(getattr(tok, "name_or_path", "") or ""), "vocab_size": len(vocab),
            "vocab_sha256": digest}


def same_tokenizer(a: dict, b: dict) -> bool:
    return a.get("vocab_size") == b.get("vocab_size") and a.get("vocab_sha256") == b.get("vocab_sha256")


def describe_tokenizer(ident: dict) -> str:
    name = ident.get("name_or_path") or "unnamed"
    return f"{name} (vocabulary {ident.get('vocab_size')}, hash {ident.get('vocab_sha256')})"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Shard:
    """One shard in memory: flat arrays (see the module docstring)."""

    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lens: np.ndarray

    @property
    def n_sequences(self) -> int:
        return len(self.prompt_lens)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_sampled(self) -> int:
        return self.n_tokens - int(self.prompt_lens.sum())

    @classmethod
    def from_sequences(cls, seqs: list[tuple[np.ndarray, int]]) -> Shard:
        """From (token ids, prompt length) pairs."""
        lens = np.array([len(s) for s, _ in seqs], dtype=np.int64)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        tokens = (np.concatenate([np.asarray(s, dtype=np.int32) for s, _ in seqs]) if seqs
                  else np.zeros(0, dtype=np.int32))
        return cls(tokens, offsets, np.array([p for _, p in seqs], dtype=np.int32))


def write_shard(path: Path, shard: Shard) -> str:
    """Write atomically (temporary name, then rename); return the file's sha256."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # One metadata key: safetensors writes a metadata map in no fixed order, and equal shards should hash equal.
    save_file({"tokens": shard.tokens, "offsets": shard.offsets, "prompt_lens": shard.prompt_lens}, str(tmp),
              metadata={"format": f"{FORMAT}/{VERSION}"})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def read_shard(path: Path) -> Shard:
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
        shard = Shard(arrays["tokens"], arrays["offsets"], arrays["prompt_lens"])
    except Exception as exc:
        raise MamballamaError(f"shard {path} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); "
                              "regenerate it with `mamballama data generate ... --force`") from exc
    if (shard.tokens.dtype != np.int32 or len(shard.offsets) != shard.n_sequences + 1 or shard.offsets[0] != 0
            or shard.n_tokens != len(shard.tokens)):
        raise MamballamaError(f"shard {path} is malformed (tokens, offsets and prompt_lens disagree); regenerate it")
    return shard


def is_shard_dir(path: Path) -> bool:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise MamballamaError(f"{path} holds no {MANIFEST}: it is not a shard folder; pass a folder written by "
                              "`mamballama data generate`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise MamballamaError(f"{path / MANIFEST} cannot be read ({exc}); regenerate the shards") from exc
    if manifest.get("format") != FORMAT:
        raise MamballamaError(f"{path / MANIFEST} is not a shard manifest from `mamballama data generate`")
    if int(manifest.get("version", 0)) > VERSION:
        raise MamballamaError(f"{path} holds shards of format version {manifest['version']}; this mamballama "
                              f"reads up to version {VERSION}: upgrade mamballama")
    return manifest


def verify_shard(root: Path, entry: dict) -> Path:
    """The shard's path, after checking it exists and matches the manifest's sha256."""
    path = Path(root) / entry["file"]
    if not path.is_file():
        raise MamballamaError(f"shard {path} is listed in {Path(root) / MANIFEST} but missing; regenerate the "
                              "shards (`mamballama data generate ... --force`)")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise MamballamaError(f"shard {path} is corrupt: its sha256 {digest[:16]}... differs from the manifest's "
                              f"{entry['sha256'][:16]}...; delete the folder and regenerate, or pass --force")
    return path
