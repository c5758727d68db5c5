"""`gallop finetune` data: every line format validated with its line number, chat encoding with
assistant-only labels, the chat-template switch for prompt/response lines, mixtures, the eval split."""

from __future__ import annotations

import json

import pytest
import torch

from gallop_kernels.chat import IGNORE, encode_prompt_response
from gallop_kernels.finetune.data import (
    DataError,
    DataSource,
    Record,
    encode_records,
    load_jsonl,
    load_records,
    load_training_data,
    mix,
    mixture_counts,
    parse_source,
    parse_sources,
)
from gallop_kernels.toy import byte_tokenizer


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def chat(user, answer, system=None):
    return {"messages": ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_malformed_lines_of_every_format_are_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "a", "response": "b"},                                        # 1 ok
        "{not json",                                                             # 2
        "",                                                                      # 3 blank: skipped
        {"prompt": "only a prompt"},                                             # 4
        "[1, 2]",                                                                # 5
        {"text": ""},                                                            # 6
        {"text": "x", "prompt": "y", "response": "z"},                           # 7
        {"foo": 1},                                                              # 8
        {"text": "fine"},                                                        # 9 ok
        {"messages": []},                                                        # 10
        {"messages": [{"role": "user", "content": "hi"}]},                       # 11
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},  # 12
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},  # 13
        {"messages": [{"role": "user", "content": "q"}], "text": "t"},           # 14
        {"prompt": "p", "completion": "c"},                                      # 15 ok: TRL's name
        {"prompt": "p", "response": "r", "completion": "c"},                     # 16
        {"text": "t", "system": "s"},                                            # 17
        {"prompt": "p", "response": "r", "system": 3},                           # 18
        chat("q", "a", system="be brief"),                                       # 19 ok
    ])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    msg = str(err.value)
    assert "14 malformed line(s) of 19" in msg
    for n, why in [(2, "invalid JSON"), (4, "missing 'response'"), (5, "expected a JSON object"),
                   (6, "'text' must be a non-empty"), (7, "has both"), (8, "needs 'messages', 'text'"),
                   (10, "non-empty list"), (11, "no 'assistant' message"), (12, "message 0 (user) needs a string 'content'"),
                   (13, "every 'assistant' message is empty"), (14, "has both 'messages' and 'text'"),
                   (16, "both 'response' and 'completion'"), (17, "'system' goes with a prompt/response"),
                   (18, "'system' must be a string")]:
        line = next((x for x in msg.splitlines() if x.strip().startswith(f"line {n}: ")), "")
        assert why in line, (n, msg)
    for ok in (1, 3, 9, 15, 19):
        assert f"line {ok}:" not in msg


def test_good_lines_become_records_that_remember_their_line(tmp_path):
    path = write_jsonl(tmp_path / "good.jsonl", [
        chat("2+2=", "4"), {"prompt": "p", "completion": "c", "id": 7}, "", {"text": "t"}])
    records = load_jsonl(path)
    assert [r.kind for r in records] == ["chat", "pair", "text"]
    assert records[1].response == "c"  # "completion" is read as the response; other keys are ignored
    assert [r.where for r in records] == [f"{path} line 1", f"{path} line 2", f"{path} line 4"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="empty"):
        load_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))


def test_a_byte_that_is_not_utf8_is_reported_at_its_line(tmp_path):
    # past the text decoder's first read chunk, so a chunk-level error would name the wrong line
    good = b'{"text": "' + b"x" * 100 + b'"}\n'
    (tmp_path / "latin1.jsonl").write_bytes(good * 300 + b'{"text": "caf\xe9"}\n' + good + b'{"text": "\xff"}\n')
    with pytest.raises(DataError) as err:
        load_jsonl(tmp_path / "latin1.jsonl")
    msg = str(err.value)
    assert "2 malformed line(s) of 303" in msg
    assert "line 301: not UTF-8 text (byte 0xe9 at column 14)" in msg
    assert "line 303: not UTF-8 text (byte 0xff at column 11)" in msg


def test_chat_lines_train_the_assistant_tokens_only():
    tok = byte_tokenizer()
    record = Record(messages=(
        {"role": "system", "content": "S"}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "1"}, {"role": "user", "content": "two"},
        {"role": "assistant", "content": "2"}), where="x line 1")
    ds = encode_records([record], tok, max_length=256)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert tok.decode(ids).startswith("<s>system\nS</s>\n<s>user\none</s>")  # the template was applied
    trained = [i for i, label in zip(ids.tolist(), labels.tolist()) if label != IGNORE]
    assert tok.decode(trained) == "1</s>2</s>"  # both answers and their end-of-turn tokens, nothing else
    assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()


def test_prompt_response_lines_follow_the_chat_template_switch():
    tok = byte_tokenizer()
    pair = Record(prompt="3+4=", response="7", where="p line 1")
    templated = encode_prompt_response(tok, "3+4=", "7")
    for mode in ("auto", "on"):
        ex = encode_records([pair], tok, 64, chat_template=mode)[0]
        assert ex["input_ids"].tolist() == templated.input_ids and ex["labels"].tolist() == templated.labels
    raw = encode_records([pair], tok, 64, chat_template="off")
    assert not raw.chat_template
    n_prompt = len(tok("3+4=")["input_ids"])
    assert raw[0]["input_ids"].tolist() == tok("3+4=")["input_ids"] + tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (raw[0]["labels"][:n_prompt] == IGNORE).all() and raw[0]["labels"][n_prompt:].tolist() == raw[0]["input_ids"][n_prompt:].tolist()

    plain = byte_tokenizer(chat_template=False)
    assert not encode_records([pair], plain, 64, chat_template="auto").chat_template  # auto: raw without a template
    with pytest.raises(DataError, match="--chat-template on, but the tokenizer has no chat template"):
        encode_records([pair], plain, 64, chat_template="on")
    with pytest.raises(DataError, match=r"1 'messages' example\(s\) \(first: c line 3\) need the tokenizer's chat template"):
        encode_records([Record(messages=({"role": "assistant", "content": "a"},), where="c line 3")], plain, 64)
    with pytest.raises(DataError, match="s line 2: 'system' needs the chat template"):
        encode_records([Record(prompt="p", response="r", system="s", where="s line 2")], tok, 64, chat_template="off")
    text = encode_records([Record(text="hi", where="t")], tok, 64)[0]  # text lines are never templated
    assert text["input_ids"].tolist() == tok("hi")["input_ids"] + [tok.eos_token_id]


def test_examples_cut_off_by_max_length_are_skipped_and_named():
    tok = byte_tokenizer()
    long_prompt = Record(prompt="x" * 50, response="y", where="d line 2")
    ok = Record(prompt="a", response="b", where="d line 1")
    ds = encode_records([ok, long_prompt], tok, max_length=20, chat_template="off")
    assert len(ds) == 1 and ds.skipped == ["d line 2"]
    assert all(len(ex["input_ids"]) <= 20 for ex in ds)
    with pytest.raises(DataError, match="cut off by max_length 20"):
        encode_records([long_prompt], tok, max_length=20, chat_template="off")


def test_sources_parse_with_weights():
    assert parse_source("a.jsonl") == DataSource("a.jsonl")
    assert parse_source("a.jsonl:0.7") == DataSource("a.jsonl", 0.7)
    assert parse_source({"path": "b.jsonl", "weight": 3}) == DataSource("b.jsonl", 3)
    assert parse_source("owner/name:config") == DataSource("owner/name:config")  # not a number: no weight
    assert parse_sources("a.jsonl") == [DataSource("a.jsonl")]
    with pytest.raises(ValueError, match="every --data a weight"):
        parse_sources(["a.jsonl:1", "b.jsonl"])
    for bad in ("a.jsonl:0", "a.jsonl:-1", "a.jsonl:inf"):
        with pytest.raises(ValueError, match="positive number"):
            parse_source(bad)
    with pytest.raises(ValueError, match="'path'"):
        parse_source({"file": "a.jsonl"})


def test_a_file_whose_name_ends_in_a_number_is_a_file(tmp_path):
    path = write_jsonl(tmp_path / "odd:5", [{"text": "t"}])
    assert parse_source(path) == DataSource(path)


def test_mixture_keeps_the_total_and_follows_the_weights():
    assert mixture_counts([10, 7], None) == [10, 7]
    assert mixture_counts([10, 7], [0.7, 0.3]) == [12, 5]  # 11.9 and 5.1 of 17
    assert mixture_counts([10, 7], [7, 3]) == [12, 5]  # weights are relative
    assert mixture_counts([5, 5, 5], [1, 1, 1]) == [5, 5, 5]
    a = [Record(text=f"a{i}") for i in range(10)]
    b = [Record(text=f"b{i}") for i in range(7)]
    mixed, counts = mix([a, b], [0.7, 0.3], seed=0)
    assert counts == [12, 5] and len(mixed) == 17
    from_a = [r for r in mixed if r.text.startswith("a")]
    assert len(from_a) == 12 and set(from_a) == set(a)  # every example once, two of them twice
    from_b = [r for r in mixed if r.text.startswith("b")]
    assert len(set(from_b)) == 5  # a subset without repeats
    assert mix([a, b], [0.7, 0.3], seed=0)[0] == mixed and mix([a, b], [0.7, 0.3], seed=1)[0] != mixed
    assert mix([a, b], None, seed=0)[0] == a + b


def test_eval_split_holds_out_every_source_before_mixing(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    data = load_training_data([f"{a}:0.5", f"{b}:0.5"], eval_split=0.1, seed=3)
    evals = {r.text for r in data.eval}
    assert len(data.eval) == 3 and sum(t.startswith("a") for t in evals) == 2  # 10% of each file
    assert not evals & {r.text for r in data.train}  # no eval line is trained on
    assert len(data.train) == 27 and "drawn from" in data.describe()
    again = load_training_data([f"{a}:0.5", f"{b}:0.5"], eval_split=0.1, seed=3)
    assert again.train == data.train and again.eval == data.eval
    with pytest.raises(DataError, match="leaves none to train on"):
        load_training_data([write_jsonl(tmp_path / "one.jsonl", [{"text": "x"}])], eval_split=0.5)
    files = load_training_data([a], eval_data=[b])
    assert len(files.train) == 20 and len(files.eval) == 10
    with pytest.raises(ValueError, match="--eval-data takes no weights"):
        load_training_data([a], eval_data=[f"{b}:2"])


def test_collator_pads_and_masks():
    from gallop_kernels.finetune.data import CausalLMCollator

    batch = CausalLMCollator(0)([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
                                 {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
