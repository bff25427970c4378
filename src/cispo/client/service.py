"""An in-process client with Tinker's programming model.

ServiceClient → TrainingClient / SamplingClient:

    service = ServiceClient()
    training = service.create_lora_training_client("tiny", rank=0)
    sampler = training.save_weights_and_get_sampling_client()
    futures = [sampler.sample(prompt, num_samples=8, sampling_params=params) for prompt in prompts]
    fwd = training.forward_backward(datums, "cispo", {"clip_high_threshold": 4.0})
    opt = training.optim_step(AdamParams(learning_rate=1e-3))
    fwd.result(); opt.result()

Every call returns an `APIFuture` (`.result()` or `await`). Training calls run in submission order
on one worker thread per TrainingClient. Sampling requests are deferred and batched: the first
`.result()` runs every pending request of that SamplingClient as one KV-cached batch, which is what
makes one-prompt-per-call code (the tinker-cookbook style) fast in process.

Differences from the hosted service, on purpose: paths are local directories, not `tinker://` URIs
(`cispo serve` maps them); `forward_backward` also takes `temperature` / `num_tokens` /
`num_sequences` keywords; `save_state` takes a JSON `metadata` dict stored beside the weights (the
RL loop keeps its data position there so that one checkpoint is one consistent state).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cispo import distributed
from cispo.checkpoint import is_sharded, load_checkpoint
from cispo.client.futures import APIFuture, OrderedWorker, completed
from cispo.engine.batching import SampleRequest, run_sample_batches
from cispo.engine.engine import Engine, EngineConfig, load_engine_state, save_engine_state
from cispo.engine.sampler import HFSampler, Sampler, check_stream_ids
from cispo.engine.sharded_state import load_sharded_engine_state, save_sharded_named_state
from cispo.models import ModelBundle, load_bundle
from cispo.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    ModelData,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsResponse,
)

__all__ = ["SamplingClient", "ServiceClient", "TrainingClient"]

CLOSE_STATUSES = ("success", "errored", "interrupted")
"""The finish reasons `ServiceClient.close` takes (tinker 0.38's)."""


class ServiceClient:
    """Creates training and sampling clients over local models."""

    def __init__(self, *, checkpoint_root: str | Path = "runs/_client", seed: int = 0) -> None:
        self.checkpoint_root = Path(checkpoint_root)
        self.seed = seed
        self._training_clients: list[TrainingClient] = []

    def close(self, status: str = "success", detail: str | None = None) -> APIFuture[None]:
        """Finish: every training client made here runs what was submitted, then stops taking
        calls (the SDK's `close` ends the server session the same way). `status` is one of the
        SDK's "success", "errored", "interrupted"; `detail` is accepted and unused."""
        if status not in CLOSE_STATUSES:
            raise ValueError(f"close status must be one of {list(CLOSE_STATUSES)}, got {status!r}")
        for training in self._training_clients:
            training.close()
        self._training_clients.clear()
        return completed(None)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        *,
        seed: int | None = None,
        engine_config: EngineConfig | None = None,
        model_overrides: Mapping[str, Any] | None = None,
    ) -> TrainingClient:
        """A training client on `base_model` (a local HF directory, "smollm2-135m" or "tiny").

        `rank=0` trains every parameter (full fine-tuning); `rank>0` attaches LoRA adapters via
        PEFT.
        """
        bundle = load_bundle(
            base_model,
            lora_rank=rank,
            seed=self.seed if seed is None else seed,
            overrides=model_overrides,
        )
        return self.create_training_client(bundle, engine_config=engine_config, name=base_model)

    def create_training_client(
        self,
        bundle: ModelBundle,
        *,
        engine_config: EngineConfig | None = None,
        name: str = "model",
    ) -> TrainingClient:
        """A training client over an already-built model (our extension: no Tinker equivalent)."""
        engine = Engine(
            bundle.model,
            eos_token_id=bundle.tokenizer.eos_token_id,
            pad_token_id=int(bundle.tokenizer.pad_token_id or 0),
            tokenizer=bundle.tokenizer,
            config=engine_config,
            seed=self.seed,
        )
        training = TrainingClient(engine, bundle, self.checkpoint_root / name.replace("/", "_"))
        self._training_clients.append(training)
        return training

    def create_sampling_client(
        self, model_path: str, base_model: str | None = None
    ) -> SamplingClient:
        """A sampling client on saved weights (`model_path` from `save_weights_for_sampler`)."""
        checkpoint = load_checkpoint(Path(model_path))
        spec = base_model or str(checkpoint.trainer_state.get("base_model", "tiny"))
        bundle = load_bundle(
            spec,
            lora_rank=0,
            seed=self.seed,
            overrides=checkpoint.trainer_state.get("model_overrides"),
        )
        bundle.model.load_state_dict(checkpoint.model_state, strict=False)
        sampler = HFSampler(
            bundle.model,
            eos_token_id=bundle.tokenizer.eos_token_id,
            pad_token_id=int(bundle.tokenizer.pad_token_id or 0),
            tokenizer=bundle.tokenizer,
            generator=torch.Generator().manual_seed(self.seed),
            version=int(checkpoint.trainer_state.get("version", 0)),
        )
        return SamplingClient(sampler, bundle.tokenizer)


class TrainingClient:
    """Trains one model. Calls run in submission order on a worker thread."""

    def __init__(self, engine: Engine, bundle: ModelBundle, checkpoint_dir: Path) -> None:
        self.engine = engine
        self.bundle = bundle
        self.checkpoint_dir = checkpoint_dir
        self._worker = OrderedWorker("cispo-train")

    def result(self, timeout: float | None = None) -> TrainingClient:
        """This client. The tinker SDK (0.38) returns a future of the client from
        `create_lora_training_client`; here the client is ready at once, and `.result()` lets
        code written for the SDK run unchanged (examples/rl_loop.py)."""
        return self

    def get_tokenizer(self) -> Any:
        return self.bundle.tokenizer

    def get_info(self) -> GetInfoResponse:
        """The model's name, architecture, LoRA rank and parameter counts (Tinker's `get_info`;
        the counts are our extension)."""
        model = self.engine.model
        params = list(model.parameters())
        peft = getattr(model, "peft_config", None)
        rank = int(next(iter(peft.values())).r) if peft else None
        arch = getattr(getattr(model, "config", None), "model_type", None)
        return GetInfoResponse(
            model_data=ModelData(arch=arch, model_name=self.bundle.spec),
            model_id=self.checkpoint_dir.name,
            is_lora=rank is not None,
            lora_rank=rank,
            model_name=self.bundle.spec,
            num_parameters=sum(p.numel() for p in params),
            num_trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        )

    def get_weights(self) -> dict[str, Tensor]:
        """The current weights by state-dict name, after every call submitted so far (our
        extension, for publishing them to another process's `Sampler.load_weights`).

        The tensors are the model's own storage, not copies: read them before submitting more
        training calls, which change them in place. Sharded (under torchrun): the full weights,
        gathered on every rank (`cispo.distributed.full_state_dict`, a collective: every rank
        calls it at the same point)."""
        if self.engine.sharded:
            return self._worker.submit(
                lambda: distributed.full_state_dict(self.engine.model)
            ).result()
        return self._worker.submit(lambda: dict(self.engine.model.state_dict())).result()

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        temperature: float = 1.0,
        num_tokens: float | None = None,
        num_sequences: float | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        datums = list(data)
        return self._worker.submit(
            lambda: self.engine.forward_backward(
                datums,
                loss_fn,
                loss_fn_config,
                temperature=temperature,
                num_tokens=num_tokens,
                num_sequences=num_sequences,
            )
        )

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        temperature: float = 1.0,
    ) -> APIFuture[ForwardBackwardOutput]:
        datums = list(data)
        return self._worker.submit(
            lambda: self.engine.forward_backward(
                datums, loss_fn, loss_fn_config, forward_only=True, temperature=temperature
            )
        )

    def optim_step(self, adam_params: AdamParams) -> APIFuture[OptimStepResponse]:
        return self._worker.submit(
            lambda: OptimStepResponse(metrics=self.engine.optim_step(adam_params))
        )

    def save_state(
        self,
        name: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        keep_last: int = 0,
        durable: bool = True,
    ) -> APIFuture[SaveWeightsResponse]:
        """Weights + optimizer + sampler RNG (+ `metadata`), atomically, under `checkpoint_dir`.

        `durable=False` skips fsync (still atomic if the process dies; see `cispo.checkpoint`)."""

        def run() -> SaveWeightsResponse:
            trainer_state = {
                "base_model": self.bundle.spec,
                "model_overrides": self.bundle.overrides,
                **dict(metadata or {}),
            }
            if self.engine.sharded:  # every rank calls; a DCP directory (docs/distributed.md)
                path = save_sharded_named_state(
                    self.engine,
                    self.checkpoint_dir,
                    name,
                    trainer_state,
                    keep_last=keep_last,
                    durable=durable,
                )
                return SaveWeightsResponse(path=str(path))
            # On the engine's worker thread, so nothing steps the weights while they are written:
            # the live tensors, not a copy of the model and its Adam moments.
            path = save_engine_state(
                self.checkpoint_dir,
                name,
                self.engine.state(copy_tensors=False),
                trainer_state,
                keep_last=keep_last,
                durable=durable,
            )
            return SaveWeightsResponse(path=str(path))

        return self._worker.submit(run)

    def load_state(self, path: str, *, optimizer: bool = True) -> APIFuture[dict[str, Any]]:
        """Restore weights (and optimizer) from `save_state`; returns the saved metadata."""

        def run() -> dict[str, Any]:
            if is_sharded(Path(path)):  # any world size, with or without a process group
                loaded = load_sharded_engine_state(self.engine, Path(path), optimizer=optimizer)
                return dict(loaded.trainer_state)
            state, trainer_state = load_engine_state(Path(path))
            if optimizer and state["optimizer"] is None:
                raise ValueError(
                    f"{path} has no optimizer state (a sampler-weights checkpoint); "
                    "load it with optimizer=False"
                )
            self.engine.load_state(state, optimizer=optimizer)
            return trainer_state

        return self._worker.submit(run)

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(name)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """A sampling client on the current weights (after every call submitted so far)."""
        self._worker.submit(lambda: None).result()  # barrier: pending steps land first
        return SamplingClient(self.engine.sampler(), self.bundle.tokenizer)

    def close(self) -> None:
        self._worker.shutdown()


class SamplingClient:
    """Samples from one fixed set of weights (any `Sampler`), batching deferred requests into one
    pass of the sampler."""

    def __init__(self, sampler: Sampler, tokenizer: Any) -> None:
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.version = sampler.version
        """The policy version of the weights, stamped on rollouts sampled here."""
        self._pending: list[tuple[SampleRequest, concurrent.futures.Future[SampleResponse]]] = []
        self._lock = threading.Lock()

    def result(self, timeout: float | None = None) -> SamplingClient:
        """This client (the SDK's `save_weights_and_get_sampling_client` returns a future of it;
        see `TrainingClient.result`)."""
        return self

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        *,
        stream_id: int = 0,
    ) -> APIFuture[SampleResponse]:
        """Tinker's `sample`; `stream_id` (cispo only, used with a seed) picks the prompt's
        random stream: requests with the same prompt, params and stream id get the same
        samples, whatever they are batched with (`cispo.engine.batching`)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        (stream_id,) = check_stream_ids([stream_id], 1)  # refused here, not in the batch
        if include_prompt_logprobs:
            tokens = prompt.to_ints()
            prompt_lp: list[float | None] = [None, *self.sampler.compute_logprobs([tokens])[0]]
            response = self._sample_now(tokens, num_samples, sampling_params, stream_id)
            return completed(SampleResponse(response.sequences, prompt_logprobs=prompt_lp))
        future: concurrent.futures.Future[SampleResponse] = concurrent.futures.Future()
        request = SampleRequest(
            self.sampler, prompt.to_ints(), num_samples, sampling_params, stream_id
        )
        with self._lock:
            self._pending.append((request, future))
        return APIFuture(future, on_wait=self.flush)

    def _sample_now(
        self, tokens: list[int], n: int, params: SamplingParams, stream_id: int
    ) -> SampleResponse:
        streams = [stream_id] if params.seed is not None else None  # as in a batch of one
        sequences = self.sampler.sample([tokens], n, params, streams)[0]
        return SampleResponse(sequences=sequences)

    def flush(self) -> None:
        """Run every pending request, one batch per (num_samples, params) group
        (`cispo.engine.batching.run_sample_batches`, the server's batching too); a failing
        group's error goes to each of its waiters."""
        with self._lock:
            pending, self._pending = self._pending, []
        run_sample_batches(
            pending,
            lambda future, sequences: future.set_result(SampleResponse(sequences=sequences)),
            lambda future, error: future.set_exception(error),
        )

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Teacher-forced logprob of every token of `prompt` (the first is None)."""
        values = self.sampler.compute_logprobs([prompt.to_ints()])[0]
        return completed([None, *values])
