"""Attack suite for what `gallop finetune` reads before anything loads: data files, option values and
config files (issue 17, cases 4 and 5).

The rules (`docs/design.md#finetune`): a data file is a regular file read line by line within
bounds (line length, JSON depth, integer length), every malformed line is reported with its file
and line; text is cut to what ``max_length`` tokens can cover before the tokenizer sees it; every
number option is checked against its range before anything loads, from the command line, a config
file or Python alike; bad input is one message, exit 2 (``ValueError`` in the API), nothing changed.
"""

from __future__ import annotations

import json
import os
import re
import threading

import pytest
from hypothesis import strategies as st

from attack_support import assert_same_tree, property_tests, tree_snapshot
from gallop_kernels import bounded_json
from gallop_kernels.finetune import config as config_module
from gallop_kernels.finetune.config import NUMBER_LIMITS, OPTION_BY_NAME, FinetuneConfig, check_number, check_options
from gallop_kernels.finetune.data import (
    DataError, Record, char_budget, clip_record, encode_record, load_jsonl, load_training_data, read_regular_text,
)
from gallop_kernels.toy import byte_tokenizer

# ---------------------------------------------------------------------------------------------
# Data files: regular files only, bounded lines, bounded JSON, every bad line named
# ---------------------------------------------------------------------------------------------


def test_a_device_is_refused_before_it_is_read():
    with pytest.raises(DataError, match="/dev/zero is a character device; give a regular file"):
        load_jsonl("/dev/zero")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = str(tmp_path / "data.jsonl")
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            load_jsonl(fifo)
        except BaseException as e:  # noqa: BLE001 (recorded for the assertion)
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "reading a FIFO hung"
    assert isinstance(outcome[0], DataError) and "is a FIFO" in str(outcome[0])


def test_a_folder_is_refused_and_a_link_to_a_file_is_followed(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_jsonl(tmp_path)
    (tmp_path / "real.jsonl").write_text('{"text": "hello"}\n')
    os.symlink(tmp_path / "real.jsonl", tmp_path / "link.jsonl")
    assert load_jsonl(tmp_path / "link.jsonl")[0].text == "hello"


@pytest.mark.parametrize("line, message", [
    ('{"text": "' + "x" * 5000 + '"}', "longer than 1,000 bytes (--max-line-bytes)"),
    ("[" * 100_000, "nested 100000 levels deep (at most 64)"),
    ('{"text": "a", "id": ' + "7" * 10_000 + "}", "an integer of 10000 digits (at most 100)"),
    ('{"text": "a", "id": -' + "7" * 101 + "}", "an integer of 101 digits"),
    ('{"messages": ' + "[" * 70 + "]" * 70 + "}", "nested 71 levels deep"),
    ('{"text": ', "invalid JSON (Expecting value at column 10)"),
])
def test_every_malformed_line_names_file_line_and_limit(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good"}\n' + line + '\n{"text": "also good"}\n')
    with pytest.raises(DataError) as caught:
        load_jsonl(path, max_line_bytes=1000 if "max-line-bytes" in message else 1 << 20)
    text = str(caught.value)
    assert text.startswith(f"{path}: 1 malformed line(s) of 3:"), text
    assert f"line 2: {message}" in text, text


def test_the_default_line_limit_stops_a_huge_line_without_holding_it(tmp_path):
    """A 17 MB line (over the 16 MiB default) is refused with the limit in the message; the lines
    after it are still read and checked."""
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "' + "y" * (17 << 20) + '"}\n{"text": ' + "\n")
    with pytest.raises(DataError) as caught:
        load_jsonl(path)
    assert "line 1: longer than 16,777,216 bytes (--max-line-bytes)" in str(caught.value)
    assert "line 2: invalid JSON" in str(caught.value)


def test_the_line_limit_is_an_option_and_reaches_the_reader(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "' + "z" * 300 + '"}\n')
    assert load_training_data([str(path)], max_line_bytes=400).train[0].text == "z" * 300
    with pytest.raises(DataError, match="longer than 200 bytes"):
        load_training_data([str(path)], max_line_bytes=200)
    assert OPTION_BY_NAME["max_line_bytes"].flag == "--max-line-bytes"


_JSON_ATOMS = st.sampled_from(['"text"', '"prompt"', '"response"', '"messages"', '"role"', '"content"',
                               '"assistant"', '"user"', "{", "}", "[", "]", ":", ",", "1", "-", "e999", "NaN",
                               '"', "\\", "\u00e9", " ", "null", "true", "9" * 120])


def _reader_never_fails_otherwise(data) -> None:
    """Any bytes: the reader returns records or raises DataError naming the file and, for every
    malformed line, its number; nothing else escapes (no RecursionError, no bare ValueError)."""
    import tempfile

    lines = data.draw(st.lists(st.one_of(
        st.builds("".join, st.lists(_JSON_ATOMS, max_size=30)),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
        st.sampled_from(['{"text": "ok"}', '{"prompt": "p", "response": "r"}', "[" * 200, ""]),
    ), min_size=1, max_size=6))
    raw = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "d.jsonl")
        with open(path, "wb") as f:
            f.write("\n".join(lines).encode("latin-1" if raw else "utf-8", "replace"))
        try:
            records = load_jsonl(path, max_line_bytes=100)
        except DataError as e:
            text = str(e)
            assert text.startswith(path), text
            assert all(re.match(r"line \d+: ", row.strip()) for row in text.splitlines()[1:]
                       if not row.strip().startswith("...")), text
        else:
            assert records and all(isinstance(r, Record) for r in records)


test_the_reader_refuses_or_reads_any_bytes, test_the_reader_refuses_or_reads_any_bytes_many = \
    property_tests(_reader_never_fails_otherwise)


# ---------------------------------------------------------------------------------------------
# Text is cut to what max_length tokens can cover, before tokenizing, without changing the result
# ---------------------------------------------------------------------------------------------

TOKENIZER = byte_tokenizer()
_TEXT = st.lists(st.sampled_from(list("ab é\n\t🐎<|>") + ["<|im_start|>", "  "]), max_size=300).map(
    lambda parts: "".join(parts) or "x")


def _record(data) -> Record:
    kind = data.draw(st.sampled_from(["text", "pair", "chat"]))
    if kind == "text":
        return Record(text=data.draw(_TEXT))
    if kind == "pair":
        return Record(prompt=data.draw(_TEXT), response=data.draw(_TEXT).strip() or "ok")
    turns = data.draw(st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=3))
    messages = []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer.strip() or "ok"}]
    return Record(messages=tuple(messages))


def _clipping_changes_nothing(data) -> None:
    record = _record(data)
    max_length = data.draw(st.integers(min_value=1, max_value=24))
    chat = record.kind == "chat" or data.draw(st.booleans())
    budget = char_budget(TOKENIZER, max_length)
    assert encode_record(clip_record(record, budget), TOKENIZER, max_length, chat) == \
        encode_record(record, TOKENIZER, max_length, chat)


test_clipping_text_before_tokenizing_changes_nothing, test_clipping_text_before_tokenizing_changes_nothing_many = \
    property_tests(_clipping_changes_nothing)


def test_the_tokenizer_never_sees_more_than_the_budget():
    """A 5-million-character line reaches the tokenizer as at most (max_length + 2) × the longest
    token's characters (here the byte tokenizer's longest token, a chat special)."""
    from gallop_kernels.finetune.data import encode_records

    seen: list[int] = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return self.inner(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    tok = Recording(byte_tokenizer(chat_template=False))
    encoded = encode_records([Record(text="w" * 5_000_000)], tok, max_length=16, chat_template="off")
    budget = char_budget(TOKENIZER, 16)
    assert len(encoded[0]["input_ids"]) == 16
    assert seen and max(seen) <= budget < 1000


# ---------------------------------------------------------------------------------------------
# Every number option's range, before anything loads
# ---------------------------------------------------------------------------------------------

HUGE = int("9" * 400)


@pytest.mark.parametrize("name, value", [
    ("lr", 1e300), ("max_steps", HUGE), ("max_steps", -2), ("epochs", 1e300), ("seed", 2**32), ("seed", -1),
    ("batch_size", 2**31), ("warmup_steps", HUGE), ("save_steps", HUGE), ("weight_decay", 1e39),
    ("max_grad_norm", float("inf")), ("max_length", 0), ("max_line_bytes", 0), ("eval_steps", HUGE),
    ("density", 1.5), ("calibration_fraction", float("nan")), ("grad_accum", 2.0), ("logging_steps", True),
])
def test_out_of_range_numbers_are_refused_in_the_api(tmp_path, name, value):
    cfg = FinetuneConfig(data=[str(tmp_path / "d.jsonl")], output=str(tmp_path / "out"), **{name: value})
    with pytest.raises(ValueError, match=re.escape(OPTION_BY_NAME[name].flag) + " must be"):
        check_options(cfg)


def _limits_hold(data) -> None:
    """Values just outside each option's range are refused naming the flag; its bounds and values
    inside are accepted."""
    name = data.draw(st.sampled_from(sorted(NUMBER_LIMITS)))
    limits = NUMBER_LIMITS[name]
    step = 1 if limits.integer else 1e-9 * max(1.0, abs(limits.high))
    inside = data.draw(st.integers(int(limits.low) + (1 if limits.low_open else 0),
                                   int(limits.high) - (1 if limits.high_open else 0)) if limits.integer
                       else st.floats(limits.low, limits.high, exclude_min=limits.low_open,
                                      exclude_max=limits.high_open))
    check_number(name, inside)
    outside = data.draw(st.sampled_from([
        limits.low - step if not limits.low_open else limits.low,
        limits.high + (step if not limits.high_open else 0),
        HUGE, -HUGE, float("nan"), "1", None, True,
    ]))
    if limits.integer and isinstance(outside, float) and outside.is_integer():
        outside = int(outside)
    with pytest.raises(ValueError, match=re.escape(OPTION_BY_NAME[name].flag)):
        check_number(name, outside)


test_every_number_option_keeps_its_range, test_every_number_option_keeps_its_range_many = property_tests(_limits_hold)


# ---------------------------------------------------------------------------------------------
# Through the command, from flags and config files: exit 2, one message, nothing loaded or changed
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def gallop(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io
    from unittest import mock

    from gallop_kernels.cli import main
    from gallop_kernels.finetune import pipeline

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            mock.patch.object(pipeline, "resolve_model", side_effect=AssertionError("a model was loaded")):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


CONFIG_CASES = [
    ("flags", ["--lr", "1e300"], "--lr must be a number > 0 and <= 3.40282e+38, got 1e+300"),
    ("flags", ["--max-steps", "9" * 400], "--max-steps must be an integer >= -1 and <= 2147483647, got 999999...999 "
                                          "(400 digits)"),
    ("flags", ["--seed", str(2**32)], "--seed must be an integer >= 0 and <= 4294967295"),
    ("flags", ["--epochs", "1e300"], "--epochs must be a number > 0"),
    ("run.yaml", "lr: 1.0e+300\n", "--lr must be a number > 0"),
    ("run.yaml", "max_steps: " + "9" * 400 + "\n", "--max-steps must be an integer"),
    ("run.yaml", "a: &x [1]\nb: *x\n", "aliases (*name) are not allowed in a config file"),
    ("run.yaml", "lr:\n" + "".join(" " * i + "- \n" for i in range(1, 40)), "nested"),
    ("run.yaml", "[" * 100_000, "nested too deeply"),
    ("run.json", '{"max_steps": 1e400}', "run.json: not a usable JSON config: the number 1e400 is beyond"),
    ("run.json", '{"max_steps": ' + "9" * 400 + "}", "run.json: not a usable JSON config: an integer of 400 digits"),
    ("run.json", '{"lr": NaN}', "NaN is not a finite number"),
    ("run.json", "[" * 100_000, "nested 100000 levels deep"),
    ("run.json", '{"target_modules": [["q_proj"]]}', "--target-modules must be"),
    ("run.json", '{"report_to": [["wandb"]]}', "--report-to must be"),
]


@pytest.mark.parametrize("where, content, message", CONFIG_CASES)
def test_bad_numbers_and_config_files_are_one_message_before_anything_loads(workdir, where, content, message):
    argv = ["finetune", "--data", "data.jsonl", "--output", "out", "--no-progress"]
    if where == "flags":
        argv += content
    else:
        (workdir / where).write_text(content)
        argv += ["--config", where]
    before = tree_snapshot(workdir)
    code, err = gallop(argv)
    assert code == 2 and "Traceback" not in err, err
    assert message in err, err
    assert_same_tree(before, tree_snapshot(workdir))


def test_a_config_file_must_be_a_small_regular_file(workdir):
    os.mkfifo(workdir / "fifo.yaml")
    code, err = gallop(["finetune", "--config", "fifo.yaml"])
    assert code == 2 and "config file fifo.yaml is a FIFO" in err, err
    (workdir / "big.yaml").write_text("# " + "x" * (config_module.MAX_CONFIG_BYTES + 1) + "\n")
    code, err = gallop(["finetune", "--config", "big.yaml"])
    assert code == 2 and "is larger than 1,048,576 bytes" in err, err
    with pytest.raises(DataError, match="is a character device"):
        read_regular_text("/dev/zero", "config file", 10)


def test_bounded_json_depth_ignores_brackets_inside_strings():
    assert bounded_json.depth('{"a": "[[[[[[", "b": [1, {"c": "]]]"}]}') == 3
    assert bounded_json.loads('{"a": "[[[["}', max_depth=1) == {"a": "[[[["}
    assert json.loads(json.dumps(bounded_json.loads('[1e308, -0.0]', max_depth=1))) == [1e308, -0.0]
