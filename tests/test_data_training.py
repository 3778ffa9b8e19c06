"""Training data: chat templating and response masks, packing that keeps sequences apart, the batch order."""

import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_hybrid, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def decoded_targets(tok, ex):
    return "".join(tok.convert_ids_to_tokens([i for i, m in zip(ex.ids, ex.mask) if m]))


def test_chat_mask_covers_exactly_the_assistant_turns(tok):
    from mamballama_cli.training.data import encode_chat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"},
            {"role": "assistant", "content": "No."}]
    ex = encode_chat(tok, msgs)
    assert len(ex.ids) == len(ex.mask) and not ex.mask[0]
    # Both answers with their end-of-turn token (and the template's newline after it), nothing of the prompts.
    def as_tokens(text):
        return "".join(tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]))

    assert decoded_targets(tok, ex) == as_tokens("Hello.<|im_end|>\n") + as_tokens("No.<|im_end|>\n")
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert ex.ids == tok(full, add_special_tokens=False)["input_ids"]


def test_text_and_prompt_response_records(tok):
    from mamballama_cli.training.data import Record, encode_record

    ex = encode_record(tok, Record("x", 1, {"text": "abc"}))
    assert ex.mask == [False] + [True] * (len(ex.ids) - 1) and ex.ids[-1] == tok.eos_token_id
    ex = encode_record(tok, Record("x", 1, {"prompt": "Q?", "response": "A."}))
    assert decoded_targets(tok, ex).startswith("A.<|im_end|>")


def test_records_from_files_and_builtin():
    from mamballama_cli.training.data import read_records

    recs = read_records(str(DATA / "chat_train.jsonl"))
    assert len(recs) == 48 and recs[0].line == 1 and "messages" in recs[0].data
    assert len(read_records(str(DATA / "text.jsonl"))) == 16
    assert len(read_records(str(DATA / "pairs.jsonl"), kind="preference")) == 16
    builtin = read_records("builtin:pydoc-topics")
    assert len(builtin) > 50 and builtin[0].data["messages"][1]["role"] == "assistant"


def test_bad_lines_name_file_and_line(tmp_path):
    from mamballama_cli.training.data import DataError, read_records

    f = tmp_path / "d.jsonl"
    good = json.dumps({"text": "fine"})
    f.write_text(f"{good}\n{{not json\n{good}\n[1, 2]\n{json.dumps({'foo': 1})}\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON"):
        read_records(str(f))
    recs = read_records(str(f), skip_bad=True)
    assert [r.line for r in recs] == [1, 3]
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(DataError, match="line 1: 'messages' has no assistant turn"):
        read_records(str(f))


def test_packed_rows_keep_sequences_apart_in_a_transformer():
    """Packing is only used where the model honours it: equal logits packed and alone; hybrids refuse."""
    from mamballama_cli.training.data import Example, collate, pack
    from mamballama_cli.training.models import model_inputs, packing_support

    model = tiny_llama(layers=2)
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(5, 90, (n,), generator=g).tolist(), [False] + [True] * (n - 1)) for n in (7, 5, 9)]
    rows = pack(exs, seq_len=16)
    assert [len(r) for r in rows] == [12, 9]
    assert rows[0].positions == list(range(7)) + list(range(5))
    batch = collate(rows, pad_id=0)
    # The first token of a packed example is never a target of the token before it.
    assert not batch["target_mask"][0, 6] and batch["target_mask"][0, 7]
    with torch.no_grad():
        packed = model(**model_inputs(batch, "cpu")).logits
        for (r, start), ex in zip([(0, 0), (0, 7), (1, 0)], exs):
            alone = model(torch.tensor([ex.ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[r, start:start + len(ex.ids)], alone, atol=1e-5, rtol=1e-5)
    assert packing_support(model) == (True, "")
    hybrid, _ = tiny_hybrid()
    ok, why = packing_support(hybrid)
    assert not ok and "Mamba" in why


def test_right_padding_is_exact_for_the_hybrid():
    """Unpacked hybrid batches are right-padded without a mask: real tokens see nothing of the padding."""
    from mamballama_cli.training.data import Example, as_items, collate
    from mamballama_cli.training.models import model_inputs

    model, _ = tiny_hybrid()
    a = Example(list(range(5, 25)), [False] + [True] * 19)
    b = Example(list(range(30, 37)), [False] + [True] * 6)
    batch = collate(as_items([a, b]), pad_id=0)
    assert batch["position_ids"] is None and batch["input_ids"].shape == (2, 20)
    with torch.no_grad():
        padded = model(**model_inputs(batch, "cpu")).logits
        alone = model(torch.tensor([b.ids])).logits
    torch.testing.assert_close(padded[1, :7], alone[0], atol=1e-5, rtol=1e-5)


def test_batch_plan_is_a_function_of_seed_stage_and_step():
    from mamballama_cli.training.data import BatchPlan, split_global_batch

    p = BatchPlan(10, 4, seed=3, stage=0)
    first = [p.global_indices(s) for s in range(5)]
    assert first == [BatchPlan(10, 4, seed=3, stage=0).global_indices(s) for s in range(5)]
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))  # epoch 0 is a permutation
    assert BatchPlan(10, 4, seed=3, stage=1).global_indices(0) != first[0]
    lengths = [3, 9, 1, 7, 5, 2, 8, 6, 4, 10]
    one = split_global_batch(first[0], lengths, micro=2, accum=2, world=1, rank=0)
    two = [split_global_batch(first[0], lengths, micro=2, accum=1, world=2, rank=r) for r in (0, 1)]
    # The same micro-batches, however the global batch is spread over processes.
    assert sorted(map(tuple, one)) == sorted(tuple(m) for r in two for m in r)
    assert sorted(i for m in one for i in m) == sorted(first[0])


def test_unreachable_hub_dataset_fails_with_its_name(monkeypatch):
    from mamballama_cli.training.data import DataError, read_records

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="someorg/no-such-dataset"):
        read_records("someorg/no-such-dataset")


def test_shard_examples_are_views_with_sampled_targets_and_collate_like_lists(tmp_path):
    """Pre-tokenised shards: no copy per sequence, loss on the sampled tokens only, the same batches as lists."""
    import numpy as np

    from mamballama_cli.shards import Shard
    from mamballama_cli.training.data import Example, ShardRecord, as_items, collate, pack, pack_concat

    g = np.random.default_rng(0)
    seqs = [(g.integers(5, 90, n).astype(np.int32), p) for n, p in ((9, 4), (5, 5), (12, 1), (30, 3))]
    rec = ShardRecord("s/shard-00000.safetensors", Shard.from_sequences(seqs), {})
    exs = rec.examples(seq_len=10)
    assert len(exs) == 3  # the second has no sampled token; the last is cut to 10 tokens
    assert [len(e.ids) for e in exs] == [9, 10, 10]
    assert [e.mask.tolist() for e in exs] == [[False] * 4 + [True] * 5, [False] + [True] * 9,
                                             [False] * 3 + [True] * 7]
    assert all(np.shares_memory(e.ids, rec.shard.tokens) for e in exs)
    as_lists = [Example(e.ids.tolist(), e.mask.tolist()) for e in exs]
    for a, b in ((collate(as_items(exs), 0), collate(as_items(as_lists), 0)),
                 (collate(pack(exs, 20), 0), collate(pack(as_lists, 20), 0)),
                 (collate(pack_concat(exs, 8), 0), collate(pack_concat(as_lists, 8), 0))):
        for k in ("input_ids", "targets", "target_mask", "position_ids", "valid"):
            assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k
    assert [it.n_targets for it in as_items(exs)] == [5, 9, 7]
    assert isinstance(pack(exs, 20)[0].ids, np.ndarray) and isinstance(pack_concat(exs, 8)[0].ids, np.ndarray)
    assert not pack_concat(exs, 8)[1].mask[0] and exs[0].mask[8]  # a row starts without a target; shard untouched


def test_a_large_shard_folder_loads_as_views(tmp_path):
    """Two million tokens in 8k sequences: items are views into one array per shard (bounded memory)."""
    import numpy as np

    from mamballama_cli.io import write_json_atomic
    from mamballama_cli.shards import FORMAT, Shard, shard_name, tokenizer_identity, write_shard
    from mamballama_cli.training.data import as_items, encode_records, read_records

    tok = tiny_tokenizer()
    g = np.random.default_rng(0)
    entries = []
    for i in range(2):
        lens = g.integers(64, 192, 4000)
        tokens = g.integers(5, 90, int(lens.sum())).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        shard = Shard(tokens, offsets, g.integers(1, 32, 4000).astype(np.int32))
        entries.append({"file": shard_name(i), "tokens": shard.n_tokens, "sha256": write_shard(tmp_path / shard_name(i),
                                                                                               shard)})
    write_json_atomic(tmp_path / "manifest.json", {"format": FORMAT, "version": 1, "complete": True,
                                                   "shards": entries, "tokenizer": tokenizer_identity(tok)})
    records = read_records(str(tmp_path))
    items = as_items(encode_records(tok, records, seq_len=128))
    assert len(items) == 8000
    assert all(np.shares_memory(items[i].ids, records[i // 4000].shard.tokens) for i in range(0, 8000, 997))
    assert sum(it.n_targets for it in items) == sum(
        int(np.minimum(np.diff(r.shard.offsets), 128).sum() - r.shard.prompt_lens.sum()) for r in records)
