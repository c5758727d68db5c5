"""Chat encoding: the template is applied, and exactly the assistant's tokens are labelled."""

from __future__ import annotations

import pytest

from gallop_kernels.chat import IGNORE, encode_completion, encode_conversation, encode_prompt_response, render
from gallop_kernels.toy import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _labelled_text(tok, enc) -> list[str]:
    """The labelled stretches of an encoding, decoded (one string per contiguous run)."""
    runs, current = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE:
            assert label == i  # labels are the tokens themselves (the model shifts them)
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_conversation_labels_every_assistant_turn_and_its_end(tok):
    messages = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Bye now."}]
    enc = encode_conversation(tok, messages)
    assert tok.decode(enc.input_ids) == render(tok, messages)  # the template, tokenized once
    assert _labelled_text(tok, enc) == ["Hello.</s>", "Bye now.</s>"]  # content + end of turn, no newline


def test_prompt_response_is_a_two_message_conversation(tok):
    enc = encode_prompt_response(tok, "What is 2+2?", "4", system="Answer briefly.")
    same = encode_conversation(tok, [{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": "What is 2+2?"},
                                     {"role": "assistant", "content": "4"}])
    assert enc == same
    assert _labelled_text(tok, enc) == ["4</s>"]
    assert enc.num_trained == 2  # "4" and "</s>"


def test_completion_continues_an_assistant_prefix_without_closing_it(tok):
    messages = [{"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "It is"}]
    enc = encode_completion(tok, messages, " cold")
    text = tok.decode(enc.input_ids)
    assert text.endswith("<s>assistant\nIt is cold")  # no end-of-turn between prefix and answer
    assert _labelled_text(tok, enc) == [" cold"]
    opened = encode_completion(tok, messages[:1], "cold")  # no prefix: a new assistant turn
    assert tok.decode(opened.input_ids).endswith("<s>assistant\ncold")
    assert _labelled_text(tok, opened) == ["cold"]


def test_truncation_keeps_ids_and_labels_aligned(tok):
    enc = encode_prompt_response(tok, "q" * 20, "a" * 20, max_length=30)
    assert len(enc.input_ids) == len(enc.labels) == 30


def test_bad_input_is_refused(tok):
    with pytest.raises(ValueError, match="no assistant"):
        encode_conversation(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="at least one"):
        encode_conversation(tok, [])
    with pytest.raises(ValueError, match="role"):
        encode_conversation(tok, [{"role": "user"}])
    with pytest.raises(ValueError, match="empty"):
        encode_completion(tok, [{"role": "user", "content": "hi"}], "")
    plain = byte_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt_response(plain, "hi", "there")


def test_a_template_that_is_not_prefix_stable_is_refused():
    tok = byte_tokenizer()
    # renders the number of messages first: a prefix of the conversation is not a prefix of its text
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    with pytest.raises(ValueError, match="prefix-stable"):
        encode_prompt_response(tok, "hi", "there")
