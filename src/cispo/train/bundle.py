"""Resolve a model name to a model + tokenizer, the way a client's `base_model` string is resolved.

"tiny" builds the embedded default (a small transformer from a transformers config with the
project's character tokenizer; sized by `overrides`); anything else goes to
`cispo.models.load_model` (a local HF directory, or "smollm2-135m"). `lora_rank > 0` wraps the model
with PEFT LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cispo.models import apply_lora, build_tiny_model, load_model, tiny_model_config
from cispo.tokenizer import build_char_tokenizer

TINY = "tiny"


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Any
    spec: str
    overrides: dict[str, Any] = field(default_factory=dict)


def load_bundle(
    spec: str,
    *,
    lora_rank: int = 0,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> ModelBundle:
    extra = dict(overrides or {})
    if spec == TINY:
        tokenizer: Any = build_char_tokenizer()
        config = tiny_model_config(
            len(tokenizer),
            hidden=int(extra.get("hidden_size", 128)),
            layers=int(extra.get("num_layers", 2)),
            heads=int(extra.get("num_heads", 4)),
            family=str(extra.get("family", "llama")),
        )
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        model: nn.Module = build_tiny_model(config, seed=seed)
    else:
        torch.manual_seed(seed)
        model, tokenizer = load_model(spec)
    if lora_rank > 0:
        torch.manual_seed(seed)
        model = apply_lora(model, r=lora_rank, alpha=2 * lora_rank)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelBundle(model=model, tokenizer=tokenizer, spec=spec, overrides=extra)
