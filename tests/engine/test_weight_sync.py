"""Weight sync through versioned safetensors directories (`cispo.engine.weight_sync`): a trainer
engine publishes, an `HFSampler` built with other initial weights receives; the canary runs on
every load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import safetensors.torch
import torch

from cispo.datums import rl_datum
from cispo.engine.engine import Engine
from cispo.engine.sampler import HFSampler, compute_logprobs, weight_fingerprint
from cispo.engine.weight_sync import (
    Probe,
    WeightReceiver,
    WeightSyncError,
    latest_published,
    publish_weights,
    read_published,
    version_dir,
)
from cispo.types import AdamParams
from tests.train.helpers import random_datums, tiny_bundle, tiny_engine

PROBE = [[1, 20, 21, 22], [1, 23, 24]]


def _probe(engine: Engine, temperature: float = 1.0) -> Probe:
    """The trainer's logprobs of the probe's tokens 1..n (the engine's forward, not a sampler)."""
    datums = [rl_datum(seq[:1], seq[1:], [0.0] * (len(seq) - 1), 0.0) for seq in PROBE]
    out = engine.forward_backward(
        datums, "cross_entropy", forward_only=True, temperature=temperature
    )
    return Probe(PROBE, [o["logprobs"].tolist() for o in out.loss_fn_outputs], temperature)


def _step(engine: Engine, seed: int) -> None:
    engine.forward_backward(random_datums(4, seed=seed), "cispo")
    engine.optim_step(AdamParams(learning_rate=1e-2))


def _receiver_sampler() -> HFSampler:
    bundle = tiny_bundle(seed=7)  # other initial weights than the trainer's
    return HFSampler(copy.deepcopy(bundle.model), eos_token_id=None, pad_token_id=0)


def _publish(engine: Engine, root: Path) -> Path:
    return publish_weights(
        root, engine.version, engine.model.state_dict(), probe=_probe(engine, 0.7)
    )


def test_published_versions_increase_and_latest_names_the_newest(tmp_path: Path) -> None:
    engine = tiny_engine()
    paths = []
    for seed in range(3):
        _step(engine, seed)
        paths.append(_publish(engine, tmp_path))
    assert [p.name for p in paths] == ["v_00000001", "v_00000002", "v_00000003"]
    assert latest_published(tmp_path) == paths[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "v_00000002", "v_00000003"]
    with pytest.raises(WeightSyncError, match="versions must increase"):
        publish_weights(tmp_path, 3, engine.model.state_dict())
    assert latest_published(tmp_path) == paths[-1]  # the refused publish changed nothing


def test_a_sampler_receives_each_version_exactly_and_the_canary_passes(tmp_path: Path) -> None:
    """Probe from the trainer's forward (the engine's path): within float rounding (measured
    4.8e-7); probe from the sampler's own function on the trainer's weights: exactly 0.0."""
    engine, sampler = tiny_engine(), _receiver_sampler()
    receiver = WeightReceiver(sampler, threshold=1e-5)
    assert sampler.fingerprint() != weight_fingerprint(engine.model.state_dict())
    for seed in range(2):
        _step(engine, seed)
        metrics = receiver.load(_publish(engine, tmp_path / "engine_probe"))
        trainer = engine.model.state_dict()
        assert sampler.version == engine.version == metrics["weight_sync/version"]
        assert all(torch.equal(sampler.model.state_dict()[k], trainer[k]) for k in trainer)
        assert metrics["canary/max_abs_logprob_diff"] <= 1e-6
    exact = WeightReceiver(_receiver_sampler(), threshold=0.0)
    same_code = Probe(PROBE, compute_logprobs(engine.model, PROBE, temperature=0.7), 0.7)
    path = publish_weights(tmp_path / "same_code", engine.version, trainer, probe=same_code)
    assert exact.load(path)["canary/max_abs_logprob_diff"] == 0.0


def test_a_skipped_tensor_raises_and_leaves_the_sampler_alone(tmp_path: Path) -> None:
    engine, sampler = tiny_engine(), _receiver_sampler()
    _step(engine, 0)
    path = _publish(engine, tmp_path)
    weights = safetensors.torch.load_file(str(path / "model.safetensors"))
    skipped = "model.layers.0.mlp.down_proj.weight"
    del weights[skipped]
    safetensors.torch.save_file(weights, str(path / "model.safetensors"))
    before = sampler.fingerprint()
    with pytest.raises(WeightSyncError, match=skipped):
        WeightReceiver(sampler).load(path)
    assert sampler.fingerprint() == before and sampler.version == 0


def test_a_stale_version_raises_and_leaves_the_sampler_alone(tmp_path: Path) -> None:
    engine, sampler = tiny_engine(), _receiver_sampler()
    receiver = WeightReceiver(sampler, threshold=1e-5)
    _step(engine, 0)
    old = _publish(engine, tmp_path / "a")
    _step(engine, 1)
    receiver.load(_publish(engine, tmp_path / "b"))
    held = sampler.fingerprint()
    with pytest.raises(WeightSyncError, match=r"stale weights: version 1 .* version 2"):
        receiver.load(old)
    assert sampler.fingerprint() == held and sampler.version == 2


def test_weights_changed_after_publishing_fire_the_fingerprint_canary(tmp_path: Path) -> None:
    engine, sampler = tiny_engine(), _receiver_sampler()
    _step(engine, 0)
    path = _publish(engine, tmp_path)
    weights = safetensors.torch.load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"][0] += 1e-3  # same names, shapes and dtypes: only the canary sees
    safetensors.torch.save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(WeightSyncError, match="fingerprint"):
        WeightReceiver(sampler).load(path)


def test_a_probe_that_disagrees_fires_the_logprob_canary(tmp_path: Path) -> None:
    engine, sampler = tiny_engine(), _receiver_sampler()
    _step(engine, 0)
    probe = _probe(engine)
    wrong = Probe(probe.sequences, [[x + 1e-3 for x in row] for row in probe.logprobs])
    path = publish_weights(tmp_path, 1, engine.model.state_dict(), probe=wrong)
    with pytest.raises(WeightSyncError, match=r"probe logprobs differ .* by 0\.001"):
        WeightReceiver(sampler, threshold=1e-4).load(path)


def test_an_unfinished_publish_is_invisible(tmp_path: Path) -> None:
    engine = tiny_engine()
    _step(engine, 0)
    first = _publish(engine, tmp_path)
    (tmp_path / ".tmp-v_00000002").mkdir()  # a publisher killed mid-write
    assert latest_published(tmp_path) == first
    assert read_published(first).version == 1
    assert version_dir(tmp_path, 2).exists() is False
