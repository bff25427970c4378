"""Overhead of the HTTP server: forward_backward + optim_step through the tinker SDK vs in process.

Same model (the "tiny" architecture at the sizes below, full fine-tuning on both sides), same
datums (64 by default), same process and run: the server runs in a background thread on loopback,
and the two paths alternate step by step so that machine noise hits both alike. Reports the median
seconds per step of each path and their ratio (goal: HTTP <= 1.15x in-process).

    OMP_NUM_THREADS=1 python benchmarks/server_overhead.py --steps 10 --datums 64
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tinker
import torch
import uvicorn
from tinker import types

from cispo.client import AdamParams, Datum, ModelInput, ServiceClient
from cispo.server.app import create_app
from cispo.server.runtime import ServerConfig

API_KEY = "tml-benchmark"


def _serve(root: Path, overrides: dict[str, int]) -> tuple[str, uvicorn.Server]:
    config = ServerConfig(root=root, api_key=API_KEY, model_overrides=overrides, full_finetune=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--datums", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--loss", default="cispo")
    args = parser.parse_args()
    overrides = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": 4}

    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.datums):
        tokens = torch.randint(4, 90, (args.seq_len + 1,), generator=gen).tolist()
        n = args.seq_len
        rows.append(
            {
                "tokens": tokens[:-1],
                "inputs": {
                    "target_tokens": tokens[1:],
                    "logprobs": [-4.5] * n,
                    "advantages": [float(torch.randn(1, generator=gen))] * n,
                },
            }
        )
    ours = [
        Datum(model_input=ModelInput.from_ints(r["tokens"]), loss_fn_inputs=r["inputs"])
        for r in rows
    ]
    theirs = [
        types.Datum(model_input=types.ModelInput.from_ints(r["tokens"]), loss_fn_inputs=r["inputs"])
        for r in rows
    ]

    with tempfile.TemporaryDirectory() as tmp:
        local = ServiceClient(checkpoint_root=Path(tmp) / "local").create_lora_training_client(
            "tiny", rank=0, model_overrides=overrides
        )
        base_url, server = _serve(Path(tmp) / "server", overrides)
        service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
        remote = service.create_lora_training_client("tiny", rank=8).result()
        adam = {"learning_rate": 1e-4}

        def step_local() -> float:
            t0 = time.perf_counter()
            fwd = local.forward_backward(ours, args.loss)
            opt = local.optim_step(AdamParams(**adam))
            fwd.result(), opt.result()
            return time.perf_counter() - t0

        def step_http() -> float:
            t0 = time.perf_counter()
            fwd = remote.forward_backward(theirs, args.loss)
            opt = remote.optim_step(types.AdamParams(**adam))
            fwd.result(), opt.result()
            return time.perf_counter() - t0

        step_local(), step_http()  # warm-up
        local_s, http_s = [], []
        for _ in range(args.steps):
            local_s.append(step_local())
            http_s.append(step_http())
        service.close("success").result()
        server.should_exit = True
        local.close()

    a, b = statistics.median(local_s), statistics.median(http_s)
    print(
        f"model: tiny hidden={args.hidden} layers={args.layers}, full fine-tuning; "
        f"{args.datums} datums x {args.seq_len} tokens, loss={args.loss}, "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"in-process  median {a * 1e3:8.1f} ms/step  (min {min(local_s) * 1e3:.1f})")
    print(f"SDK + HTTP  median {b * 1e3:8.1f} ms/step  (min {min(http_s) * 1e3:.1f})")
    print(f"ratio {b / a:.3f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
