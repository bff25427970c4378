"""tinker-cookbook's `weights.download` against our server, for both path kinds it accepts.

`tinker://<run>/external_weights/<name>` (from save_weights_external) is fetched file by file from
the signed URLs; `tinker://<run>/weights/<name>` (from save_state) goes through a temporary export
encrypted to a key the cookbook generates (age, via pyrage on both sides), which it decrypts and
then deletes. Either way the files must load with from_pretrained and give the served model's
logprobs.

Needs tinker-cookbook 0.6.1 (`pip install --no-deps tinker-cookbook==0.6.1`) and pyrage,
blobfile, chz, termcolor (`pip install pyrage blobfile chz termcolor`); skipped without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("pyrage")
weights = pytest.importorskip("tinker_cookbook.weights")
from server_harness import LiveServer  # noqa: E402
from tinker import types  # noqa: E402

TEXT = "12+7=19"


def _forward_lp(training: Any, ids: list[int]) -> torch.Tensor:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
    )
    out = training.forward([datum], "cross_entropy").result()
    return torch.tensor(out.loss_fn_outputs[0]["logprobs"].tolist())


@torch.no_grad()
def _hf_lp(directory: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]


@pytest.mark.slow
def test_cookbook_weights_download_of_external_and_training_paths(
    live: LiveServer, service: Any, tmp_path: Path
) -> None:
    training = service.create_lora_training_client("tiny", rank=2, seed=4).result()
    ids = list(training.get_tokenizer().encode(TEXT))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
    )
    training.forward_backward([datum], "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    want = _forward_lp(training, ids)
    external = training.save_weights_external("final").result().path
    state = training.save_state("final").result().path
    for path, out in ((external, tmp_path / "external"), (state, tmp_path / "state")):
        weights.download(tinker_path=path, output_dir=str(out), base_url=live.base_url)
        assert not list(out.rglob("*.age"))
        assert (_hf_lp(out / "model", ids) - want).abs().max() <= 1e-5, path
    rest = service.create_rest_client()
    left = [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints]
    assert not [p for p in left if p.endswith("/external_weights/download")]  # it cleaned up
