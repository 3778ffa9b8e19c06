"""`mamballama chat`: a conversation on stdin/stdout whose turns resume from the state the last turn left."""

import json
import re
import shutil

import pytest
import torch
from clihelp import run_cli
from helpers import tiny_hybrid, tiny_tokenizer

from mamballama_cli.generation.plain import generate
from mamballama_cli.generation.sampling import SamplingConfig
from mamballama_cli.generation.session import ChatSession

pytestmark = pytest.mark.usefixtures("one_thread")


def _turns(err: str) -> list[tuple[int, int, int]]:
    """(conversation tokens, of them from the kept state, new tokens) per turn, from the stderr lines."""
    return [tuple(int(x) for x in m) for m in
            re.findall(r"\[turn \d+: (\d+) conversation tokens, (\d+) of them from the kept state; (\d+) new", err)]


def test_chat_turns_resume_from_the_kept_state_and_answer_as_without_it(models, capsys, monkeypatch):
    talk = "hi there\nand what else\n/reset\nhi there\n"
    hot = run_cli(["chat", models["hybrid"], "-n", "6"], capsys, stdin=talk, monkeypatch=monkeypatch)
    assert hot.code == 0, hot.err
    answers = hot.out.splitlines()
    assert len(answers) == 3
    turns = _turns(hot.err)
    assert turns[0][1] == 0  # the first turn reads everything
    assert turns[1][1] > turns[0][0]  # the second resumes after the first turn's prompt and answer
    assert turns[2][1] == turns[0][0] and answers[2] == answers[0]  # after /reset: the same first turn, kept whole
    # the same conversation with nothing kept: the same answers, every turn read whole
    cold = run_cli(["chat", models["hybrid"], "-n", "6", "--prefix-cache-gb", "0"], capsys, stdin=talk,
                   monkeypatch=monkeypatch)
    assert cold.code == 0, cold.err
    assert cold.out.splitlines() == answers
    assert [t[1] for t in _turns(cold.err)] == [0, 0, 0] and [t[0] for t in _turns(cold.err)] == [t[0] for t in turns]
    # the first turn is `generate --chat`'s answer
    g = run_cli(["generate", models["hybrid"], "--chat", "--prompt", "hi there", "-n", "6"], capsys)
    assert g.code == 0 and answers[0] == g.out.rstrip("\n").replace("\n", " ")


def test_chat_with_a_teacher_repeats_seeded_answers_and_refuses_a_model_without_a_template(models, capsys,
                                                                                          monkeypatch, tmp_path):
    r = run_cli(["chat", models["teacher"], "-n", "4", "--seed", "3", "-t", "0.8"], capsys,
                stdin="hello\nmore\n", monkeypatch=monkeypatch)
    assert r.code == 0, r.err
    assert len(r.out.splitlines()) == 2 and len(_turns(r.err)) == 2
    again = run_cli(["chat", models["teacher"], "-n", "4", "--seed", "3", "-t", "0.8"], capsys,
                    stdin="hello\nmore\n", monkeypatch=monkeypatch)
    assert again.out == r.out  # seeded: the same conversation, the same answers
    bare = tmp_path / "bare"
    shutil.copytree(models["hybrid"], bare)
    cfg = bare / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    bad = run_cli(["chat", bare], capsys, stdin="hi\n", monkeypatch=monkeypatch)
    assert bad.code != 0 and "no chat template" in bad.err and len(bad.err.strip().splitlines()) == 1


def test_a_model_off_the_static_decoder_rereads_the_conversation_each_turn():
    """Mamba-1 hybrids decode through transformers' generate: each turn re-reads the whole conversation, and its
    answer is generate's on that conversation."""

    model, _ = tiny_hybrid(attn_layers=(1,), mixer="mamba1", seed=2)
    model.eval()
    tok = tiny_tokenizer()
    session = ChatSession(model, tok, SamplingConfig(max_new_tokens=5), max_context=256)
    assert session.engine.startswith("transformers")
    first = session.reply("hi there")
    second = session.reply("and more")
    assert first.cached_tokens == second.cached_tokens == 0 and second.prompt_tokens > first.prompt_tokens
    history = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": first.answer},
               {"role": "user", "content": "and more"}]
    ids = tok(tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    want = generate(model, tok, torch.tensor([ids]), SamplingConfig(max_new_tokens=5), engine="transformers")
    assert second.answer == want.text and second.prompt_tokens == len(ids)


def test_a_long_conversation_leaves_out_its_earliest_exchanges_to_fit_the_context():

    model, _ = tiny_hybrid(attn_layers=(1, 3), seed=2)
    model.eval()
    session = ChatSession(model, tiny_tokenizer(), SamplingConfig(max_new_tokens=4), max_context=90)
    turns = [session.reply(f"message number {i}") for i in range(5)]
    assert all(t.prompt_tokens + 4 <= 90 for t in turns)
    assert turns[0].dropped_turns == 0 and sum(t.dropped_turns for t in turns) >= 2
    assert session.messages[-2]["content"] == "message number 4"
    with pytest.raises(ValueError, match="the context holds 90"):
        session.reply("x" * 200)
    assert session.messages[-2]["content"] == "message number 4"  # the refused message did not join
