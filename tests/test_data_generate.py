"""`mamballama data generate` (teacher-sampled token shards) and training on shards and local data sets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clihelp import one_line_error, run_cli
from helpers import save_teacher, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DATA = Path(__file__).parent / "data"
PROMPTS = f"{DATA / 'prompts.jsonl'},{DATA / 'text.jsonl'}"  # chat prompts, and texts for continuations
GEN = ["--max-new-tokens", "12", "--batch-size", "4", "--device", "cpu"]
FAST = ["--template", "none", "--steps", "1", "--seq-len", "96", "--micro-batch-size", "2"]
ROOT = Path(__file__).resolve().parent.parent


def shard_arrays(out: Path) -> list[dict]:
    from safetensors.numpy import load_file

    manifest = json.loads((out / "manifest.json").read_text())
    return [load_file(str(out / e["file"])) for e in manifest["shards"]]


def generate(capsys, teacher, out, *args):
    r = run_cli(["data", "generate", teacher, "--output", out, *GEN, *args], capsys)
    assert r.code == 0, r.err
    return json.loads(r.out)


# --- data generate -----------------------------------------------------------------------------------------------
def test_generate_writes_shards_and_manifest_and_distill_trains_on_them(models, tmp_path, capsys):
    import hashlib

    out = tmp_path / "shards"
    summary = generate(capsys, models["teacher"], out, "--tokens", "1500", "--shard-tokens", "300", "--seed", "3",
                       "--prompts", f"builtin,{DATA / 'prompts.jsonl'}")
    manifest = json.loads((out / "manifest.json").read_text())
    tok = tiny_tokenizer()
    stop, im_start = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")
    gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert manifest["tokens"] == summary["tokens"] >= 1500 and manifest["complete"]
    # Shards of whole batches (nothing sampled is dropped) of at least 300 tokens; the last one stops at the
    # sequence that reaches 1500 in all.
    for i, (entry, arrays) in enumerate(zip(manifest["shards"], shard_arrays(out))):
        assert entry["file"] == f"shard-{i:05d}.safetensors"
        if i + 1 < len(manifest["shards"]):
            assert entry["tokens"] >= 300 and len(arrays["prompt_lens"]) % 4 == 0  # batches of 4 rows
    assert manifest["tokens"] - 1500 < int(np.diff(shard_arrays(out)[-1]["offsets"])[-1])
    assert len(manifest["shards"]) >= 2
    assert manifest["tokenizer"]["vocab_size"] == 96 and manifest["sampling"]["max_new_tokens"] == 12
    assert manifest["config"]["batch_size"] == 4 and manifest["seed"] == 3 and manifest["engine"] == "static-eager"
    kinds = {"chat": 0, "continuation": 0}
    total = sampled = 0
    for entry, arrays in zip(manifest["shards"], shard_arrays(out)):
        assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
        tokens, offsets, plens = arrays["tokens"], arrays["offsets"], arrays["prompt_lens"]
        assert tokens.dtype == np.int32 and offsets.dtype == np.int64 and plens.dtype == np.int32
        assert offsets[0] == 0 and offsets[-1] == len(tokens) == entry["tokens"]
        for i in range(len(plens)):
            seq = tokens[offsets[i]:offsets[i + 1]]
            prompt, new = seq[: plens[i]], seq[plens[i]:]
            assert 1 <= len(new) <= 12
            # ends at the first stop token (included), or after max_new_tokens without one
            assert (new[-1] == stop and stop not in new[:-1]) or (len(new) == 12 and stop not in new)
            if prompt[0] == im_start:  # chat: the template's generation prompt ends the prompt
                kinds["chat"] += 1
                assert prompt[-len(gen_prompt):].tolist() == gen_prompt
            else:  # free continuation: 16-64 tokens of plain text, no template
                kinds["continuation"] += 1
                assert 16 <= len(prompt) <= 64 and im_start not in prompt
            sampled += len(new)
        total += len(tokens)
    assert total == manifest["tokens"] and sampled == manifest["sampled_tokens"]
    assert kinds["chat"] > 0 and kinds["continuation"] > 0
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    # Sequences whose prompt fills --seq-len leave nothing to learn: dropped, the rest all read.
    plens = np.concatenate([a["prompt_lens"] for a in shard_arrays(out)])
    kept = int((plens < 96).sum())
    assert 0 < kept < len(plens) == manifest["sequences"]
    r = run_cli(["distill", models["hybrid"], "--data", out, "-o", tmp_path / "run", "--json", *FAST], capsys)
    assert r.code == 0, r.err
    assert f"distill: {kept} rows from {out}" in r.err
    assert f"{len(plens) - kept} example(s) have no response token within --seq-len 96" in r.err
    # The default recipe (templates/distill-default.yaml: best-fit rows, loss on every position) on shards.
    r = run_cli(["distill", models["hybrid"], "--data", out, "-o", tmp_path / "run2", "--json", "--steps", "1",
                 "--seq-len", "128", "--micro-batch-size", "2"], capsys)
    assert r.code == 0, r.err
    assert "packing fit (whole examples best-fit" in r.err
    assert json.loads(r.out)["steps"] == 3  # align, kd-mixers, kd-all: one step each


def test_generate_builtin_prompts_and_greedy_is_reproducible(models, tmp_path, capsys):
    """--prompts builtin (the packaged text `data build` reads); the same seed writes the same shards."""
    args = ["--tokens", "150", "--prompts", "builtin", "--temperature", "0", "--continuation-fraction", "0.5"]
    a = generate(capsys, models["teacher"], tmp_path / "a", *args)
    b = generate(capsys, models["teacher"], tmp_path / "b", *args)
    assert a["tokens"] == b["tokens"] >= 150
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["prompts"]["sources"] == ["builtin"] and manifest["prompts"]["texts"] > 10
    assert [s["sha256"] for s in manifest["shards"]] == [
        s["sha256"] for s in json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"]]


def test_generate_takes_a_data_build_folder_as_its_prompts(models, tmp_path, capsys):
    """--prompts DIR of `data build`: its train split's prompts (chats) and texts (continuations), counted as the
    folder's manifest counts them."""
    data = tmp_path / "data"
    assert run_cli(["data", "build", "--sources", "pydoc", "--output", data], capsys).code == 0
    files = json.loads((data / "manifest.json").read_text())["files"]
    g = generate(capsys, models["teacher"], tmp_path / "g", "--tokens", "60", "--prompts", str(data))
    prompts = json.loads((tmp_path / "g" / "manifest.json").read_text())["prompts"]
    assert prompts["chat_prompts"] + prompts["chat_prompts_too_long"] == files["prompts-train.jsonl"]["records"]
    assert prompts["sources"] == [str(data)] and g["tokens"] >= 60
    assert prompts["texts"] == files["text-train.jsonl"]["records"]


def test_generate_resumes_after_a_kill_and_matches_an_uninterrupted_run(models, tmp_path, capsys):
    args = ["--prompts", PROMPTS, "--tokens", "2400", "--shard-tokens", "300", "--seed", "7", *GEN]
    full = tmp_path / "full"
    r = run_cli(["data", "generate", models["teacher"], "--output", full, *args], capsys)
    assert r.code == 0, r.err

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mamballama_cli", "data", "generate", str(models["teacher"]),
                             "--output", str(out), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())["shards"]:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert 1 <= len(manifest["shards"]) < 8 and not manifest["complete"]
    # What a kill during a write leaves: a temporary file, and a shard renamed but not yet in the manifest.
    (out / ".shard-00007.safetensors.tmp-12345").write_bytes(b"partial")
    (out / "shard-00007.safetensors").write_bytes(b"not listed")

    r = run_cli(["data", "generate", models["teacher"], "--output", out, *args], capsys)
    one_line_error(r, "not empty", "--resume")
    r = run_cli(["data", "generate", models["teacher"], "--output", out, *args, "--resume"], capsys)
    assert r.code == 0, r.err
    assert "removed 2 partial file(s)" in r.err
    assert json.loads(r.out)["tokens_this_run"] < json.loads(r.out)["tokens"]
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (full, out))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["tokens"] == b["tokens"] and b["complete"]
    for x, y in zip(shard_arrays(full), shard_arrays(out)):
        assert all(np.array_equal(x[k], y[k]) for k in ("tokens", "offsets", "prompt_lens"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())


def test_generate_bad_input(models, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    r = run_cli(["data", "generate", models["teacher"], "--output", full, "--tokens", "10", *GEN], capsys)
    one_line_error(r, str(full), "not empty", "--force")
    assert [p.name for p in full.iterdir()] == ["keep.txt"] and (full / "keep.txt").read_text() == "precious"
    r = run_cli(["data", "generate", models["teacher"], "--output", full, "--tokens", "10", *GEN, "--resume"], capsys)
    one_line_error(r, "--resume", "manifest.json", "--force")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    out = tmp_path / "s"
    same = ["--prompts", PROMPTS, "--shard-tokens", "150", *GEN]
    generate(capsys, models["teacher"], out, "--tokens", "300", *same)
    r = run_cli(["data", "generate", models["teacher"], "--output", out, "--tokens", "600", *same,
                 "--temperature", "0.5", "--resume"], capsys)
    line = one_line_error(r, "other options", "temperature: 1.0 -> 0.5")
    assert "shard_tokens" not in line
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4] + b"XXXX")
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    r = run_cli(["data", "generate", models["teacher"], "--output", out, "--tokens", "600", *same, "--resume"], capsys)
    one_line_error(r, "shard-00001.safetensors", "corrupt", "sha256")
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before
    r = run_cli(["distill", models["hybrid"], "--data", out, "-o", tmp_path / "run", *FAST], capsys)
    one_line_error(r, "shard-00001.safetensors", "corrupt")

    r = run_cli(["data", "generate", models["teacher"], "--output", tmp_path / "x", "--tokens", "0", *GEN], capsys)
    one_line_error(r, "--tokens 0")
    r = run_cli(["data", "generate", models["teacher"], "--output", tmp_path / "x", "--tokens", "10", *GEN,
                 "--prompts", str(DATA / "text.jsonl"), "--continuation-fraction", "0.2"], capsys)
    one_line_error(r, "no chat prompt", "--continuation-fraction 1")
    assert not (tmp_path / "x").exists()


def test_shards_of_another_tokenizer_are_refused(models, tmp_path, capsys):
    """Shards written by a teacher with another vocabulary: the student would read other tokens."""
    other = save_teacher(tmp_path / "t90", model=tiny_llama(vocab=90))
    shards = tmp_path / "s90"
    generate(capsys, other, shards, "--prompts", PROMPTS, "--tokens", "100")
    r = run_cli(["distill", models["hybrid"], "--data", shards, "-o", tmp_path / "o", *FAST], capsys)
    line = one_line_error(r, "vocabulary 90", "vocabulary 96", str(other), str(models["teacher"]))
    assert "data generate" in line
    assert not (tmp_path / "o" / "checkpoints").exists()


# --- training on local data sets ---------------------------------------------------------------------------------
def test_distill_and_sft_read_datasets_folders_parquet_and_arrow(models, tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in (DATA / "chat_train.jsonl").read_text().splitlines()]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    texts = [{"id": i, "body": json.loads(x)["text"]} for i, x in enumerate((DATA / "text.jsonl").read_text().splitlines())]
    pq.write_table(pa.Table.from_pylist(texts), tmp_path / "t.parquet")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa.schema(
            [("id", pa.int64()), ("body", pa.string())])) as writer:
        writer.write_table(pa.Table.from_pylist(texts))

    r = run_cli(["distill", models["hybrid"], "--data", folder, "-o", tmp_path / "r1", *FAST], capsys)
    assert r.code == 0, r.err
    assert f"distill: {len(rows)} rows from {folder}" in r.err
    spec = f"{tmp_path / 't.parquet'},{tmp_path / 't.arrow'}"
    r = run_cli(["sft", models["hybrid"], "--data", spec, "--text-field", "body", "-o", tmp_path / "r2", *FAST],
                capsys)
    assert r.code == 0, r.err
    assert f"sft: {2 * len(texts)} rows from {spec}" in r.err
    # shards and JSONL, concatenated
    shards = tmp_path / "shards"
    generate(capsys, models["teacher"], shards, "--prompts", PROMPTS, "--tokens", "120")
    n_seq = json.loads((shards / "manifest.json").read_text())["sequences"]
    spec = f"{shards},{DATA / 'chat_train.jsonl'}"
    r = run_cli(["distill", models["hybrid"], "--data", spec, "-o", tmp_path / "r3", *FAST], capsys)
    assert r.code == 0, r.err
    assert f"distill: {n_seq + len(rows)} rows from {spec}" in r.err


def test_local_data_set_without_the_named_field(models, tmp_path, capsys):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 3).save_to_disk(str(folder))
    r = run_cli(["distill", models["hybrid"], "--data", folder, "--text-field", "body", "-o", tmp_path / "o", *FAST],
                capsys)
    one_line_error(r, str(folder), "no field 'body'", "question, answer", "--text-field")
    r = run_cli(["distill", models["hybrid"], "--data", folder, "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "expected 'messages', 'text'", "'question'")
    empty = tmp_path / "notdata"
    empty.mkdir()
    (empty / "x.txt").write_text("x")
    r = run_cli(["distill", models["hybrid"], "--data", empty, "-o", tmp_path / "o", *FAST], capsys)
    one_line_error(r, "neither a shard folder", "save_to_disk")
    assert not (tmp_path / "o").exists()


def test_default_batch_size_fills_a_share_of_the_free_gpu_memory(monkeypatch):
    """On CUDA the default batch is the largest power of two up to 1024 whose cache fits 40% of the free memory."""
    from mamballama_cli.generation import fast
    from mamballama_cli.training.generate_data import auto_batch_size
    from helpers import tiny_hybrid

    model, _ = tiny_hybrid()
    per_row = fast.static_cache_bytes(model, 1, 1536)
    cuda = torch.device("cuda")
    for free, want in ((10**15, 1024), (per_row * 300 / 0.4, 256), (per_row * 512 / 0.4, 512), (0, 8)):
        monkeypatch.setattr(fast, "available_bytes", lambda device, free=free: free)
        assert auto_batch_size(model, 1536, cuda) == want
    assert auto_batch_size(model, 1536, torch.device("cpu")) == 8
