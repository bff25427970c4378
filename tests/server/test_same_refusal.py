"""The in-process client and the server refuse a bad datum with the same message: both run the
engine's one check (`cispo.engine.validation.validate_datums`), the server before it queues the
request (a 400 through the real tinker SDK), the in-process client inside `Engine.forward_backward`
(a `DatumError`). The cases are tests/engine/test_validation.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

tinker = pytest.importorskip("tinker")
from server_harness import TINY  # noqa: E402
from tests.engine.test_validation import REFUSALS, Refusal, datums_of  # noqa: E402
from tinker import types  # noqa: E402

from cispo.client import ServiceClient  # noqa: E402
from cispo.engine import DatumError  # noqa: E402
from cispo.engine.validation import context_length, vocab_size  # noqa: E402

TIMEOUT = 30.0


def _sdk_datums(specs: list[dict[str, Any]]) -> list[types.Datum]:
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(list(spec["ids"])),
            loss_fn_inputs={
                k: types.TensorData.from_torch(v) for k, v in spec.items() if k != "ids"
            },
        )
        for spec in specs
    ]


def _detail(error: Exception) -> str:
    body = getattr(error, "body", None)
    return str(body["detail"]) if isinstance(body, dict) else str(error)


@pytest.fixture(scope="module")
def remote(service: Any) -> Any:
    return service.create_lora_training_client("tiny", rank=4, seed=3).result()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Any:
    service = ServiceClient(checkpoint_root=tmp_path_factory.mktemp("client"))
    return service.create_lora_training_client("tiny", rank=4, model_overrides=TINY)


# The SDK refuses an empty list itself ("No data provided"), so no_datums never reaches a server.
@pytest.mark.parametrize(
    "case", [c for c in REFUSALS if c.name != "no_datums"], ids=lambda c: c.name
)
def test_a_bad_datum_gets_the_same_message_in_process_and_from_the_server(
    remote: Any, local: Any, case: Refusal
) -> None:
    model = local.engine.model
    specs = case.build(vocab_size(model), context_length(model) or 0)
    with pytest.raises(DatumError) as in_process:
        local.forward_backward(datums_of(specs), case.loss_fn).result()
    with pytest.raises(tinker.BadRequestError) as over_http:
        remote.forward_backward(_sdk_datums(specs), case.loss_fn).result(timeout=TIMEOUT)
    assert _detail(over_http.value) == str(in_process.value)


def test_the_server_still_trains_after_every_refusal(remote: Any, tmp_path: Path) -> None:
    """Each refusal consumed its seq_id: a valid call on the same client completes."""
    ids = [5, 6, 7, 8, 9]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
    )
    out = remote.forward_backward([datum], "cross_entropy").result(timeout=TIMEOUT)
    assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == 4
