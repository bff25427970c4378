"""Text ↔ tokens for prompts and completions, for both the project's character tokenizer and real
chat models (a chat template is applied when the tokenizer has one)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt tokens, starting with BOS (character tokenizer) or rendered by the chat template."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
        )
        # transformers 5 returns a BatchEncoding (a Mapping, not a dict); 4.x a plain list.
        ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
        return [int(t) for t in ids]
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + [int(t) for t in ids]


def encode_answer(tokenizer: Any, text: str) -> list[int]:
    """Supervised completion tokens: the answer followed by EOS."""
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None else [])


def decode_completion(tokenizer: Any, tokens: list[int]) -> str:
    """Completion text without special tokens (EOS, padding)."""
    return str(tokenizer.decode(tokens, skip_special_tokens=True))
