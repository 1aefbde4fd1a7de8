"""Prompts as the model sees them: the chat template, applied in one place, and token ids."""

from __future__ import annotations

from collections.abc import Sequence

Messages = Sequence[dict]  # [{"role": ..., "content": ...}, ...]


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: str | Messages, answer_prefix: str = "") -> str:
    """The text of a conversation (a user message, or OpenAI-style messages) under the tokenizer's chat
    template, ready for the assistant's turn, followed by `answer_prefix` (the start of its answer)."""
    if not has_template(tokenizer):
        raise ValueError("this tokenizer has no chat template")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    head = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return head + answer_prefix.lstrip()


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of text that `render_chat` made (the template holds its special tokens already)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def is_conversation(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def encode_prompt(tokenizer, prompt: str | Sequence[int] | Messages, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt: token ids as they are, a conversation (OpenAI-style messages) under the chat
    template, text under the chat template (chat=True) or as it is (chat=False). chat=None, the default of
    every entry point (Python, CLI), applies the template where the tokenizer has one: an instruct model gets
    its chat format, a base model its plain text."""
    if chat is None:
        chat = has_template(tokenizer)
    if is_conversation(prompt):
        return encode_rendered(tokenizer, render_chat(tokenizer, prompt))
    if not isinstance(prompt, str):
        return list(prompt)
    if chat:
        if not has_template(tokenizer):
            raise ValueError("chat=True, but this tokenizer has no chat template")
        return encode_rendered(tokenizer, render_chat(tokenizer, prompt))
    return tokenizer(prompt)["input_ids"]
