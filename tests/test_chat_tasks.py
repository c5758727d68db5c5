"""The real-model tasks: right answers, disjoint deterministic splits, answer-only labels, exact match."""

from __future__ import annotations

import pytest
import torch

from gallop_kernels import chat_tasks as C
from gallop_kernels.chat import IGNORE
from gallop_kernels.reproduce.runner import OOD_TASKS
from gallop_kernels.toy import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


LABELS = {
    "category": {cat: cat for cat in C.CATEGORIES},
    "codes": {cat: code for cat, (code, _) in C.CATEGORIES.items()},
    "place": C.PLACES,
}


@pytest.mark.parametrize("name", sorted(C.ID_TASKS))
def test_id_rule_is_a_function_of_the_category(name):
    task = C.ID_TASKS[name]
    words = [w for _, ws in C.CATEGORIES.values() for w in ws]
    assert len(words) == len(set(words)), "a word in two categories would make its label ambiguous"
    labels = LABELS[name]
    assert len(set(labels.values())) == len(labels) == round(1 / task.chance)
    category_of = {w: cat for cat, (_, ws) in C.CATEGORIES.items() for w in ws}
    assert len(task.items) == len(words)
    for item in task.items:
        word = item.question.split('"')[1]
        assert item.answer == labels[category_of[word]] and item.key == word


@pytest.mark.parametrize("name", sorted(C.ID_TASKS))
def test_id_test_words_are_never_trained_on(name):
    task = C.ID_TASKS[name]
    parts = {p: {it.key for it in task.split(p)} for p in C.SPLITS}
    assert not parts["train"] & parts["test"] and not parts["train"] & parts["val"] and not parts["val"] & parts["test"]
    assert sum(len(v) for v in parts.values()) == len(task.items)
    # every label is in every split, so the test measures the rule on each category
    for split in C.SPLITS:
        assert {it.answer for it in task.split(split)} == set(LABELS[name].values()), split
    # deterministic: a hash of the word decides, not the order of the list
    reordered = C.ChatTask("x", "", tuple(reversed(task.items)))
    assert {it.key for it in reordered.split("test")} == parts["test"]
    with pytest.raises(ValueError, match="split"):
        task.split("dev")


@pytest.mark.parametrize("name", sorted(C.CANDIDATE_OOD))
def test_generated_ood_answers_are_right(name):
    task = C.CANDIDATE_OOD[name]()
    assert task.items and len({it.question for it in task.items}) == len(task.items)
    for it in task.items:
        assert it.answer.startswith(" ") and it.answer.strip(), it  # one space, then the answer word(s)
        if name == "addition":
            a, b = (int(x) for x in it.question[len("What is "):-1].split(" + "))
            assert int(it.answer) == a + b
        elif name == "next_number":
            assert int(it.answer) == int(it.question.split()[-1].rstrip("?")) + 1
        elif name == "next_letter":
            assert ord(it.answer.strip()) == ord(it.question.split()[-1].rstrip("?")) + 1
        elif name == "next_day":
            days = list(C.DAYS)
            assert days.index(it.answer.strip()) == (days.index(it.question.split()[-1].rstrip("?")) + 1) % 7


def test_reproduction_ood_tasks_exist():
    assert set(OOD_TASKS) <= set(C.CANDIDATE_OOD)


def test_encoding_labels_only_the_answer(tok):
    item = C.CANDIDATE_OOD["plurals"]().items[0]
    batch = C.encode_items([item, C.CATEGORY.items[0]], tok)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    for row in range(2):
        labelled = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        answer = [item, C.CATEGORY.items[0]][row].answer
        assert tok.decode(labelled) == answer
    # padding: no attention, no label
    assert ((batch.attention_mask == 0) <= (batch.labels == IGNORE)).all()
    train = C.training_items(C.CATEGORY, tok)
    assert all(it.answer.endswith(tok.eos_token) for it in train)  # training teaches the model to stop


class _Oracle(torch.nn.Module):
    """Predicts the true next token everywhere, except (optionally) at one position of one row."""

    def __init__(self, vocab: int, spoil_row: int | None = None):
        super().__init__()
        self.vocab, self.spoil_row = vocab, spoil_row

    def forward(self, input_ids, attention_mask=None):
        nxt = input_ids.roll(-1, 1)
        if self.spoil_row is not None and self.spoil_row < len(nxt):
            nxt[self.spoil_row, :] = 0  # wrong everywhere in that row
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


def test_exact_match_counts_whole_answers(tok):
    items = list(C.CATEGORY.split("test"))[:5]
    batch = C.encode_items(items, tok)
    assert C.exact_match(_Oracle(len(tok)), batch, chunk=2) == 1.0
    assert C.exact_match(_Oracle(len(tok), spoil_row=1), batch, chunk=8) == pytest.approx(4 / 5)
    assert C.correct(_Oracle(len(tok), spoil_row=0), batch).tolist() == [False, True, True, True, True]


class _Scripted(torch.nn.Module):
    """Predicts the true next token inside each answer, and ``after`` right after the answer."""

    def __init__(self, vocab: int, labels: torch.Tensor, after: int):
        super().__init__()
        self.vocab, self.labels, self.after = vocab, labels, after

    def forward(self, input_ids, attention_mask=None, **_):
        nxt = input_ids.roll(-1, 1)
        answer = self.labels[:len(input_ids)] != IGNORE
        last = answer.shape[1] - 1 - answer.flip(1).int().argmax(1)
        nxt[torch.arange(len(nxt)), last] = self.after
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


@pytest.mark.parametrize("after, continues", [("s", True), ("7", True), (".", False), (" ", False),
                                              ("</s>", False)])
def test_exact_match_is_wrong_when_the_next_token_lengthens_the_word(tok, after, continues):
    # Greedy decoding of "cat" then "s" says "cats": the answer is wrong although its tokens were right.
    items = [C.CATEGORY.split("test")[0], C.CANDIDATE_OOD["plurals"]().items[0]]
    batch = C.encode_items(items, tok)
    after_id = tok.convert_tokens_to_ids(after) if after == "</s>" else tok(after, add_special_tokens=False)["input_ids"][0]
    verdict = C.correct(_Scripted(len(tok), batch.labels, after_id), batch)
    assert verdict.tolist() == [not continues] * 2
    # an answer that ends in a non-word character (the training items end with EOS) never "continues"
    ended = [C.Item(it.question, it.answer + ".", it.prefix, it.key) for it in items]
    batch = C.encode_items(ended, tok)
    assert C.correct(_Scripted(len(tok), batch.labels, after_id), batch).tolist() == [True, True]


def test_word_start_table_reads_tokens_after_a_word(tok):
    table = C.word_start_table(tok)
    assert len(table) == len(tok) and C.word_start_table(tok) is table  # cached per tokenizer
    ids = {t: tok(t, add_special_tokens=False)["input_ids"][0] for t in ("s", "7", ".", " ", "\n")}
    assert [bool(table[ids[t]]) for t in ("s", "7", ".", " ", "\n")] == [True, True, False, False, False]
    assert not table[tok.eos_token_id] and not table[tok.pad_token_id]


def test_only_the_read_logits_are_computed_and_they_are_the_full_models():
    from gallop_kernels.toy import tiny_chat_model

    model, tok = tiny_chat_model(hidden_size=32)
    model.eval()
    items = list(C.CATEGORY.split("test"))[:3] + list(C.CANDIDATE_OOD["capitals"]().items)[:3]
    batch = C.encode_items(items, tok)
    rows, cols = C._answer_positions(batch.labels)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        picked = C._logits_at(model, batch, rows, cols)
    finally:
        handle.remove()
    assert seen == [torch.Size([len(rows), model.config.hidden_size])]  # the head ran on those rows only
    torch.testing.assert_close(picked, full[rows, cols], rtol=1e-5, atol=1e-6)
    # the loss is Hugging Face's causal-LM loss over the labelled tokens
    hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    torch.testing.assert_close(C.loss(model, batch), hf, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="encode_items"):
        C.correct(model, C.collate([it.encode(tok) for it in items], tok.pad_token_id))
