"""Chat data through the tokenizer's own chat template, with the loss on assistant tokens only.

An instruct model is trained and queried in its chat format (for SmolLM2: ChatML,
``<|im_start|>user\\n...<|im_end|>``). Feeding it raw ``prompt + response`` text teaches a format it
never answers in. This module renders a conversation with ``tokenizer.apply_chat_template`` and
marks which tokens are the assistant's, so that the loss (and a teacher-forced evaluation) covers
exactly what the model is meant to say: each assistant message and its end-of-turn token.

How the assistant tokens are found, for any template: the characters of assistant message k span
``len(render(messages[:k], add_generation_prompt=True))`` to ``len(render(messages[:k + 1]))``; the
rendered text is tokenized once with offsets, and a token is labelled when it starts inside such a
span (up to and including the end-of-turn token; trailing newlines are not trained). Templates
whose rendering of a prefix is not a prefix of the whole conversation are refused with a clear
error rather than labelled wrongly.

Used by the demo and the reproduction (`gallop_kernels/chat_tasks.py`) and by ``gallop finetune``
(`gallop_kernels/finetune/data.py`: ``{"messages": [...]}`` lines, and prompt/response lines when
they go through the template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

IGNORE = -100  # the label Hugging Face causal-LM losses skip

Message = Mapping[str, str]


@dataclass(frozen=True)
class Encoded:
    """Token ids of one rendered conversation and their labels (``IGNORE`` where nothing is trained)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a mapping with string 'role' and 'content', got {m!r}")


def render(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False,
           continue_final_message: bool = False) -> str:
    """The conversation as text in the tokenizer's chat template (no tokenization)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; chat data needs one "
            "(set tokenizer.chat_template, or use plain prompt/response or text data)")
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message)


def _tokenize_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> Encoded:
    """Tokenize ``text`` once; label the tokens that start inside one of the character ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for i, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(lo <= start < hi for lo, hi in spans):
            labels[i] = ids[i]
    return Encoded(ids, labels)


def _checked_prefix(prefix: str, whole: str, what: str) -> int:
    if not whole.startswith(prefix):
        raise ValueError(
            f"the chat template is not prefix-stable ({what}): rendering part of the conversation does "
            "not give a prefix of the whole, so the assistant tokens cannot be located")
    return len(prefix)


def _trained_end(tokenizer: Any, text: str, start: int, end: int) -> int:
    """End of the trained part of an assistant segment: just after its end-of-turn token, if any."""
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        at = text.find(eos, start, end)
        if at >= 0:
            return at + len(eos)
    return len(text[:end].rstrip()) if text[start:end].strip() else end


def encode_conversation(tokenizer: Any, messages: Sequence[Message], *, max_length: int | None = None) -> Encoded:
    """A whole conversation; every assistant message (and its end-of-turn token) is trained.

    Raises ``ValueError`` for a malformed conversation, a tokenizer without a chat template, a
    template that is not prefix-stable, or a conversation without an assistant message.
    """
    _check_messages(messages)
    whole = render(tokenizer, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _checked_prefix(render(tokenizer, messages[:k], add_generation_prompt=True) if k else "",
                                whole, f"before assistant message {k}")
        end = _checked_prefix(render(tokenizer, messages[:k + 1]), whole, f"through assistant message {k}")
        spans.append((start, _trained_end(tokenizer, whole, start, end)))
    if not spans:
        raise ValueError("the conversation has no assistant message: nothing to train")
    return _truncate(_tokenize_spans(tokenizer, whole, spans), max_length)


def encode_prompt_response(tokenizer: Any, prompt: str, response: str, *, system: str | None = None,
                           max_length: int | None = None) -> Encoded:
    """A one-turn exchange (optional system message, user ``prompt``, assistant ``response``)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return encode_conversation(tokenizer, messages, max_length=max_length)


def encode_completion(tokenizer: Any, messages: Sequence[Message], completion: str, *,
                      max_length: int | None = None) -> Encoded:
    """``messages`` rendered for the assistant to speak next, then ``completion``; only it is labelled.

    When the last message is the assistant's, it is a prefix the answer continues (rendered with
    ``continue_final_message``, so no end-of-turn token follows it); otherwise the generation prompt
    opens a new assistant turn. This is what a teacher-forced evaluation of a short answer needs:
    the labelled tokens are exactly those greedy decoding must produce.
    """
    _check_messages(messages)
    if not completion:
        raise ValueError("completion is empty: nothing to label")
    if messages[-1]["role"] == "assistant":
        context = render(tokenizer, messages, continue_final_message=True)
    else:
        context = render(tokenizer, messages, add_generation_prompt=True)
    text = context + completion
    return _truncate(_tokenize_spans(tokenizer, text, [(len(context), len(text))]), max_length)


def _truncate(encoded: Encoded, max_length: int | None) -> Encoded:
    if max_length is None:
        return encoded
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return Encoded(encoded.input_ids[:max_length], encoded.labels[:max_length])


__all__ = ["IGNORE", "Encoded", "encode_completion", "encode_conversation", "encode_prompt_response", "render"]
