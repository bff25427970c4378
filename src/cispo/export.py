"""Trained weights out in the formats the rest of the ecosystem loads.

`export_checkpoint(CHECKPOINT, OUT)` turns any `cispo.checkpoint` directory (a `cispo train` run's,
the in-process client's `save_state`, or a `cispo serve` checkpoint) into:

    OUT/model/     a Hugging Face model directory: config.json, model.safetensors,
                   generation_config.json, the tokenizer files; LoRA merged into the weights.
                   `AutoModelForCausalLM.from_pretrained(OUT/model)` loads it.
    OUT/adapter/   (LoRA checkpoints) a PEFT adapter directory: adapter_config.json +
                   adapter_model.safetensors; `PeftModel.from_pretrained(base, OUT/adapter)`.
    OUT/base/      (LoRA checkpoints) the exact base model the adapter was trained on (a "tiny"
                   base is seeded random weights, so it ships with the adapter); the adapter's
                   `base_model_name_or_path` points here.

The checkpoint's `trainer_state` names the base model ("tiny" + size overrides, a local HF
directory, or "smollm2-135m"); LoRA is read from the weights themselves (the `lora_A` keys give
the target modules and the rank; alpha is the project's 2·rank, as `models.load_bundle` and the
server create it). Every export is checked before it is reported: the written model directory is
loaded back and its logprobs on a probe sequence compared with the checkpoint's model.

GGUF: SmolLM2-135M comes as a GGUF file that transformers dequantizes on load; the export writes
ordinary float safetensors (`_serializable`).

Tied embeddings: when the LM head carries a LoRA adapter (the server's `train_unembed`) and the
base ties it to the input embeddings, merging in place would also change the input embeddings;
the head is untied first, and the merged model is saved with `tie_word_embeddings=False`.

`save_weights_external` on the server and `cispo export` call the same `export_state`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cispo.checkpoint import is_complete, is_sharded, latest_named_state, load_checkpoint
from cispo.distributed.checkpoint import read_sharded_model_state
from cispo.models import apply_lora, load_bundle

_LORA_KEY = re.compile(r"^(?P<prefix>.*)\.(?P<module>[^.]+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
_PEFT_PREFIX = "base_model.model."
VERIFY_TOLERANCE = 1e-4
"""Largest |logprob| difference the load-back check accepts (fp32 reorderings are ~1e-6)."""


@dataclass(frozen=True)
class Export:
    model_dir: Path
    """The HF model directory (LoRA merged)."""
    adapter_dir: Path | None
    """The PEFT adapter directory, for LoRA checkpoints."""
    base_dir: Path | None
    """The base model the adapter applies to, for LoRA checkpoints."""
    base_model: str
    lora_rank: int
    max_logprob_diff: float
    """Load-back check: max |logprob| difference, written model vs the checkpoint's model."""


@dataclass(frozen=True)
class LoraLayout:
    rank: int
    targets: list[str]
    """Module names (q_proj, ..., lm_head) carrying adapters."""


def lora_layout(model_state: Mapping[str, Tensor]) -> LoraLayout | None:
    """The LoRA rank and target modules of a PEFT state dict, or None for a plain model."""
    targets: set[str] = set()
    ranks: set[int] = set()
    for key, value in model_state.items():
        match = _LORA_KEY.match(key)
        if match is not None:
            targets.add(match["module"])
            ranks.add(int(value.shape[0]))
    if not targets:
        return None
    if len(ranks) != 1:
        raise ValueError(f"LoRA adapters of different ranks {sorted(ranks)} are not supported")
    return LoraLayout(rank=ranks.pop(), targets=sorted(targets))


def _base_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The base model's own state dict out of a PEFT one (adapters dropped)."""
    out = {}
    for key, value in model_state.items():
        if ".lora_" in key:
            continue
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        out[name.replace(".base_layer.", ".")] = value
    return out


@torch.no_grad()
def _logprobs(model: nn.Module, ids: Sequence[int]) -> Tensor:
    """[T-1] log pi(ids[t+1] | ids[:t+1]) in float32."""
    x = torch.tensor([list(ids)])
    logits = model(input_ids=x).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]


def _untie_lm_head(model: Any) -> None:
    """Give a LoRA-adapted LM head its own weight when it is tied to the input embeddings."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    head = base.get_output_embeddings()
    layer = getattr(head, "base_layer", head)
    if layer.weight is base.get_input_embeddings().weight:
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", lambda: None)()
        if text is not None and text is not config:
            text.tie_word_embeddings = False


def _serializable(model: Any) -> Any:
    """A model loaded from a GGUF file (SmolLM2) holds dequantized float weights but keeps
    transformers' gguf quantizer marker, which makes `save_pretrained` refuse it. The weights are
    plain tensors, so drop the marker: the saved directory is an ordinary float checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(quantizer.quantization_config, "quant_method", None)
        if getattr(method, "value", method) != "gguf":
            raise ValueError(f"cannot export a model quantized with {method}")
        model.hf_quantizer = None
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    return model


def _probe(tokenizer: Any, vocab: int) -> list[int]:
    ids = [int(i) for i in tokenizer.encode("12+7=19\n3+4=7 hello", add_special_tokens=False)]
    ids = [i for i in ids if 0 <= i < vocab] or list(range(min(vocab, 16)))
    return ids[:64] if len(ids) >= 2 else [0, min(1, vocab - 1)]


def _write_atomic(out: Path, write: Any) -> None:
    """Run `write(tmp)` into a temporary sibling directory, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            trash = out.with_name(f".trash-{out.name}-{os.getpid()}")
            os.replace(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_state(
    model_state: Mapping[str, Tensor],
    base_model: str,
    out: str | Path,
    *,
    model_overrides: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> Export:
    """Write the model of `model_state` (a plain or PEFT state dict) as an HF directory, plus
    a PEFT adapter and its base for LoRA. `out` is replaced atomically."""
    out = Path(out)
    layout = lora_layout(model_state)
    bundle = load_bundle(base_model, lora_rank=0, seed=0, overrides=model_overrides)
    tokenizer = bundle.tokenizer
    report: dict[str, float] = {}

    def write(tmp: Path) -> None:
        model: nn.Module = _serializable(bundle.model)
        if layout is None:
            model.load_state_dict(dict(model_state), strict=True)
            trained = model
        else:
            base_dir = tmp / "base"
            base = _serializable(
                load_bundle(base_model, lora_rank=0, seed=0, overrides=model_overrides).model
            )
            base.load_state_dict(_base_state(model_state), strict=True)
            base.save_pretrained(base_dir)
            tokenizer.save_pretrained(str(base_dir))
            trained = apply_lora(
                model, r=layout.rank, alpha=2 * layout.rank, target_modules=layout.targets
            )
            trained.load_state_dict(dict(model_state), strict=True)
            trained.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
            trained.save_pretrained(str(tmp / "adapter"))
        trained.eval()
        probe = _probe(tokenizer, int(trained.get_output_embeddings().weight.shape[0]))  # type: ignore[operator]
        reference = _logprobs(trained, probe)
        if layout is not None:
            _untie_lm_head(trained)
            merged: nn.Module = trained.merge_and_unload()  # type: ignore[operator]
        else:
            merged = trained
        merged.save_pretrained(tmp / "model")  # type: ignore[operator]
        tokenizer.save_pretrained(str(tmp / "model"))
        if verify:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32)
            diff = float((_logprobs(loaded, probe) - reference).abs().max())
            if not diff <= VERIFY_TOLERANCE:
                raise RuntimeError(
                    f"the exported model's logprobs differ from the checkpoint's by {diff:.3g} "
                    f"(> {VERIFY_TOLERANCE}); nothing was written to {out}"
                )
            report["diff"] = diff
        (tmp / "cispo_export.json").write_text(
            json.dumps(
                {
                    "base_model": base_model,
                    "model_overrides": dict(model_overrides or {}),
                    "lora_rank": 0 if layout is None else layout.rank,
                    "lora_targets": [] if layout is None else layout.targets,
                    "lora_alpha": None if layout is None else 2 * layout.rank,
                    "max_logprob_diff": report.get("diff"),
                },
                indent=1,
            )
        )

    _write_atomic(out, write)
    return Export(
        model_dir=out / "model",
        adapter_dir=None if layout is None else out / "adapter",
        base_dir=None if layout is None else out / "base",
        base_model=base_model,
        lora_rank=0 if layout is None else layout.rank,
        max_logprob_diff=report.get("diff", float("nan")),
    )


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory (its newest)."""
    path = Path(path)
    if is_complete(path):
        return path
    candidates = [
        found
        for root in [
            path,
            *sorted(path.glob("*")),
            path / "checkpoints",
            *sorted((path / "checkpoints").glob("*")),
        ]
        if root.is_dir() and (found := latest_named_state(root)) is not None
    ]
    if not candidates:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint directory (model.safetensors, optimizer.pt, rng.pt, "
            "state.json) nor a run directory with checkpoints"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, verify: bool = True) -> Export:
    """Export a `cispo.checkpoint` directory, or the newest checkpoint of a run directory."""
    directory = find_checkpoint(checkpoint)
    if is_sharded(directory):  # a run trained under torchrun (docs/distributed.md)
        model_state, state = read_sharded_model_state(directory)
    else:
        loaded = load_checkpoint(directory)
        model_state, state = loaded.model_state, loaded.trainer_state
    return export_state(
        model_state,
        str(state.get("base_model", "tiny")),
        out,
        model_overrides=state.get("model_overrides") or {},
        verify=verify,
    )


def export_hint(run_dir: str | Path) -> str:
    """The line `cispo train` ends with: how to get the trained model out."""
    return (
        f"export the trained model (HF directory, + PEFT adapter for LoRA): "
        f"cispo export {run_dir} {Path(run_dir) / 'export'}"
    )


def describe(result: Export) -> str:
    lines = [f"HF model (from_pretrained): {result.model_dir}"]
    if result.adapter_dir is not None:
        lines.append(f"PEFT adapter (rank {result.lora_rank}): {result.adapter_dir}")
        lines.append(f"its base model: {result.base_dir}")
    lines.append(f"load-back check: max |logprob diff| {result.max_logprob_diff:.2e}")
    return "\n".join(lines)
