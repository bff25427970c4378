"""Launched by tests/distributed/test_weight_sync.py under `torchrun --nproc-per-node 2`: rank 0 is
a trainer (a plain model and AdamW, no engine), rank 1 a sampler with other initial weights;
weights go by `broadcast_weights` / `BroadcastReceiver`. Writes OUT/results.json (rank 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cispo import distributed
from cispo.engine.sampler import HFSampler, compute_logprobs, weight_fingerprint
from cispo.engine.weight_sync import BroadcastReceiver, WeightSyncError
from cispo.models import build_tiny_model, tiny_model_config

PROBE = [[1, 20, 21, 22], [1, 23, 24]]


def _raises(fn: Any) -> str | None:
    try:
        fn()
    except WeightSyncError as error:
        return str(error)
    return None


def main() -> None:
    out = Path(sys.argv[1])
    info = distributed.init_from_env()
    config = tiny_model_config(40, hidden=32, layers=2, heads=2)
    model = build_tiny_model(config, seed=0 if info.rank == 0 else 7)
    sampler = None if info.rank == 0 else HFSampler(model, eos_token_id=None, pad_token_id=0)
    template = {k: v.detach() for k, v in model.state_dict().items()}
    receiver = BroadcastReceiver(sampler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2) if info.rank == 0 else None
    results: dict[str, Any] = {"fingerprints": [], "probe_diffs": []}
    for version in (1, 2):
        if optimizer is not None:  # one training step on rank 0
            ids = torch.tensor([[1, 5, 6, 7, 8]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights = dict(model.state_dict()) if info.rank == 0 else None
        receiver.receive(weights, version, template)
        sent = distributed.broadcast_object(
            (weight_fingerprint(model.state_dict()), compute_logprobs(model, PROBE))
            if info.rank == 0
            else None
        )
        assert sent is not None
        if sampler is not None:
            mine = sampler.compute_logprobs(PROBE)
            diff = max(
                abs(a - b)
                for r, s in zip(mine, sent[1], strict=True)
                for a, b in zip(r, s, strict=True)
            )
            results["fingerprints"].append(sampler.fingerprint() == sent[0])
            results["probe_diffs"].append(diff)
            results["version"] = sampler.version
    stale = _raises(lambda: receiver.receive(dict(model.state_dict()), 1, template))
    skipped_weights = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    skipped = _raises(lambda: receiver.receive(skipped_weights, 3, template))
    gathered = distributed.gather_objects(
        {"stale": stale, "skipped": skipped, **results}
        if info.rank == 1
        else {"stale": stale, "skipped": skipped}
    )
    if info.rank == 0:
        (out / "results.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
