"""The real tinker SDK's checkpoint lifecycle against a live server: TTL (stored and enforced by
the server), delete, weights_info, the user-wide checkpoint listing and the session listings."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

tinker = pytest.importorskip("tinker")
from server_harness import LiveServer, start_server  # noqa: E402
from tinker import types  # noqa: E402

RANK = 2
TEXT = "12+7=19"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("server"), ttl_sweep_seconds=0.1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def training(service: Any) -> Any:
    return service.create_lora_training_client("tiny", rank=RANK, seed=1).result()


@pytest.fixture(scope="module")
def rest(service: Any) -> Any:
    return service.create_rest_client()


def _listed(rest: Any, run_id: str) -> dict[str, Any]:
    return {c.tinker_path: c for c in rest.list_checkpoints(run_id).result().checkpoints}


def _on_disk(live: LiveServer, path: str) -> bool:
    run_id, kind, name = path[len("tinker://") :].split("/")
    return (live.root / "runs" / run_id.replace(":", "_") / kind / name).is_dir()


def test_a_checkpoint_ttl_is_enforced_by_the_server(
    live: LiveServer, training: Any, rest: Any, service: Any
) -> None:
    """save_state(ttl_seconds=3600) is listed with expires_at = save time + 3600; once the
    server's clock passes it, the server deletes it by itself (no request needed), it leaves the
    listings, and loading it is refused. A checkpoint without a TTL survives."""
    t0 = time.time()
    expiring = training.save_state("ttl-a", ttl_seconds=3600).result().path
    kept = training.save_state("ttl-keep").result().path
    listed = _listed(rest, training.model_id)
    expires_at = listed[expiring].expires_at
    assert expires_at is not None and listed[kept].expires_at is None
    assert expires_at.timestamp() == pytest.approx(t0 + 3600, abs=5)
    live.backend.store.clock = lambda: time.time() + 3601
    try:
        deadline = time.time() + 10
        while _on_disk(live, expiring) and time.time() < deadline:
            time.sleep(0.05)
        assert not _on_disk(live, expiring), "the sweeper did not delete the expired checkpoint"
        assert _on_disk(live, kept)
        listed = _listed(rest, training.model_id)
        assert expiring not in listed and kept in listed
        with pytest.raises(tinker.APIStatusError, match="ttl-a"):
            service.create_training_client_from_state(expiring).result(timeout=30)
    finally:
        live.backend.store.clock = time.time


def test_set_and_remove_a_ttl_then_delete(live: LiveServer, training: Any, rest: Any) -> None:
    path = training.save_weights_for_sampler("life-s").result().path
    assert _listed(rest, training.model_id)[path].expires_at is None
    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    expires = _listed(rest, training.model_id)[path].expires_at
    assert isinstance(expires, datetime)
    assert expires.timestamp() == pytest.approx(time.time() + 7200, abs=5)
    with pytest.raises(tinker.APIStatusError, match="ttl_seconds must be in"):
        rest.set_checkpoint_ttl_from_tinker_path(path, 60).result()
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    assert _listed(rest, training.model_id)[path].expires_at is None
    assert _on_disk(live, path)
    rest.delete_checkpoint_from_tinker_path(path).result()
    assert path not in _listed(rest, training.model_id) and not _on_disk(live, path)
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(path).result()


def test_weights_info_and_user_wide_listings(service: Any, training: Any, rest: Any) -> None:
    path = training.save_state("info").result().path
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == ("tiny", True, RANK)
    assert info.train_attn and info.train_mlp and info.train_unembed
    other = service.create_lora_training_client("tiny", rank=RANK, seed=2).result()
    newest = other.save_weights_for_sampler("other-s").result().path
    everything = rest.list_user_checkpoints(limit=100).result()
    paths = [c.tinker_path for c in everything.checkpoints]
    assert paths[0] == newest and path in paths  # newest first, across training runs
    assert everything.cursor.total_count == len(paths)
    assert (
        rest.list_user_checkpoints(limit=1, offset=1).result().checkpoints[0].tinker_path
        == (paths[1])
    )
    sessions = rest.list_sessions().result().sessions
    assert sessions
    session = rest.get_session(sessions[0]).result()
    assert {training.model_id, other.model_id} <= set(session.training_run_ids)


def _forward_lp(training: Any, ids: list[int]) -> torch.Tensor:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
    )
    out = training.forward([datum], "cross_entropy").result()
    return torch.tensor(out.loss_fn_outputs[0]["logprobs"].tolist())


@torch.no_grad()
def _hf_lp(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]


def _check_export(directory: Path, ids: list[int], want: torch.Tensor) -> None:
    """The merged HF model and the PEFT adapter (on its shipped base) each give the trained
    model's logprobs to 1e-5 (fp32); the base alone does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    assert (_hf_lp(merged, ids) - want).abs().max() <= 1e-5
    assert AutoTokenizer.from_pretrained(directory / "model").encode(TEXT) == ids
    base = AutoModelForCausalLM.from_pretrained(directory / "base", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, directory / "adapter")
    assert (_hf_lp(adapted, ids) - want).abs().max() <= 1e-5
    with adapted.disable_adapter():
        assert (_hf_lp(adapted, ids) - want).abs().max() > 1e-3


def test_save_weights_external_downloads_as_an_hf_model_and_a_peft_adapter(
    training: Any, rest: Any, tmp_path: Path
) -> None:
    """save_weights_external -> signed URLs (fetched without the API key, as the SDK's downloader
    does) -> the files load with from_pretrained / PeftModel and match the served model. The
    server's LoRA covers the LM head, which the tiny model ties to its input embeddings."""
    ids = list(training.get_tokenizer().encode(TEXT))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
    )
    training.forward_backward([datum], "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    want = _forward_lp(training, ids)
    path = training.save_weights_external("final").result().path
    assert path.endswith("/external_weights/final")
    listed = _listed(rest, training.model_id)[path]
    assert listed.checkpoint_type == "external" and (listed.size_bytes or 0) > 0
    urls = rest.get_external_weights_urls(path).result().urls
    assert {"model/config.json", "model/model.safetensors", "adapter/adapter_config.json"} <= set(
        urls
    )
    for name, url in urls.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as response:
            (tmp_path / name).write_bytes(response.read())
    _check_export(tmp_path, ids, want)
    tampered = next(iter(urls.values())).replace("sig=", "sig=0")
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(tampered, timeout=30)


def test_the_sdk_cli_downloads_a_training_checkpoint(
    live: LiveServer, training: Any, rest: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tinker checkpoint download tinker://.../weights/NAME`: the SDK loads the checkpoint into a
    new training run, exports it with save_weights_external(ttl), downloads it, renews its TTL,
    then deletes the temporary export. Every step runs against this server."""
    from click.testing import CliRunner
    from tinker.cli.__main__ import main_cli

    ids = list(training.get_tokenizer().encode(TEXT))
    want = _forward_lp(training, ids)
    path = training.save_state("for-download").result().path
    monkeypatch.setenv("TINKER_BASE_URL", live.base_url)
    result = CliRunner().invoke(
        main_cli, ["--format", "json", "checkpoint", "download", path, "--output", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (directory,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    _check_export(directory, ids, want)
    leftovers = [c for c in rest.list_user_checkpoints().result().checkpoints]
    assert not [
        c for c in leftovers if c.checkpoint_type == "external" and "download" in c.tinker_path
    ]


def test_cispo_export_of_a_server_checkpoint_directory(
    live: LiveServer, training: Any, tmp_path: Path
) -> None:
    """`cispo export` reads a server checkpoint (`--root/runs/<run>/weights/<name>`) directly, no
    server call needed, and writes the same layout as save_weights_external."""
    from cispo.cli import main

    ids = list(training.get_tokenizer().encode(TEXT))
    want = _forward_lp(training, ids)
    path = training.save_state("for-export").result().path
    run_id, kind, name = path[len("tinker://") :].split("/")
    directory = live.root / "runs" / run_id.replace(":", "_") / kind / name
    assert main(["export", str(directory), str(tmp_path / "out")]) == 0
    _check_export(tmp_path / "out", ids, want)
