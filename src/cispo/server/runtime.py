"""The server's state: sessions, trained models, sampling sessions; every operation the routes call.

Each trained model is a `cispo.engine.engine.Engine` (the same engine the in-process client drives:
no second loss or sampler here) with its own `ModelSequencer`, so its requests run in seq_id order
on its own thread. Sampling goes through a `cispo.engine.sampler.Sampler` (`HFSampler`) on one
sampling thread,
which batches every queued request with the same (sampler, num_samples, params) into one
KV-cached pass with the in-process client's batching (`cispo.engine.batching`).

Validation happens before anything is queued, so a bad request gets a 4xx and changes nothing:
a forward_backward's datums and loss go through the engine's own check (`Engine.check`,
`cispo.engine.validation`), whose `DatumError` is a 400 here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cispo.engine.batching import SampleRequest, run_sample_batches
from cispo.engine.engine import Engine, EngineConfig
from cispo.engine.sampler import HFSampler
from cispo.engine.validation import DatumError, context_length, vocab_size
from cispo.models import TINY, apply_lora, load_bundle
from cispo.ops.topk_logprobs import model_topk_logprobs
from cispo.server.futures import FutureTable, ModelSequencer, NotFound, Result, UserError
from cispo.server.store import DEFAULT_OWNER, EXTERNAL, RunRecord, Store, encrypt_tree
from cispo.server.wire import (
    MAX_TENSOR_VALUES,
    ForwardBackwardCall,
    TopK,
    encode_forward_backward,
    encode_sample_response,
    sdk_metrics,
)
from cispo.tokenizer import build_char_tokenizer
from cispo.types import (
    AdamParams,
    ForwardBackwardOutput,
    SampledSequence,
    SamplingParams,
    check_seed,
)

logger = logging.getLogger(__name__)

# LoRA target modules per Tinker LoraConfig flag (Llama / Qwen2 module names).
LORA_TARGETS = {
    "train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "train_mlp": ("gate_proj", "up_proj", "down_proj"),
    "train_unembed": ("lm_head",),
}
MAX_NUM_SAMPLES = 1024
# Tinker's StableReinforce: documented as an alpha loss whose objective uses per-sequence
# information recorded at sampling time (`record_stability_info=True`); the objective itself is not
# published, so there is nothing faithful to implement under that name.
STABLE_REINFORCE_REFUSED = (
    "loss_fn='stable_reinforce' is not available on this server: Tinker documents StableReinforce "
    "as an alpha loss whose objective uses per-sequence information recorded at sampling time "
    "(record_stability_info=True), and does not publish that objective, so this server does not "
    "implement a guess under its name. Train with the built-in loss_fn='cispo' instead "
    "(tinker-cookbook: pass loss_fn=cispo to recipes.math_rl.train, recipes.rubric.train or "
    "recipes.rl_loop, or set rl.train.AsyncConfig(loss_fn='cispo') for async runs; sampling then "
    "does not ask for record_stability_info). See docs/server.md."
)


_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def read_keys_file(path: Path) -> dict[str, str]:
    """API key -> user name, from a keys file: one `<key> [<user>]` per line; blank lines and
    lines starting with # are skipped. A key without a user name is its own user,
    `key-<first 12 hex digits of its sha256>`. Several keys may name one user (they then share
    everything, e.g. during a key rotation). ValueError names the line of a bad entry."""
    keys: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"keys_file {str(path)!r} cannot be read: {error}") from error
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"keys_file {str(path)!r} line {number}"
        if len(fields) > 2:
            raise ValueError(f"{where}: expected '<key> [<user>]', got {len(fields)} fields")
        key = fields[0]
        user = (
            fields[1]
            if len(fields) == 2
            else f"key-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        )
        if not _USER.match(user):
            raise ValueError(
                f"{where}: user name {user!r} must match {_USER.pattern} (letters, digits, . _ -)"
            )
        if key in keys:
            raise ValueError(f"{where}: this key is listed twice")
        keys[key] = user
    if not keys:
        raise ValueError(f"keys_file {str(path)!r} lists no key")
    return keys


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    root: Path
    """Directory for tinker:// checkpoints, training-run records and tokenizers."""
    api_key: str = ""
    """A key every request may carry in X-API-Key, the user "default" (`cispo serve` reads
    $CISPO_API_KEY when the option is not given). The tinker SDK only sends keys that start with
    "tml-". Give it, `keys_file`, or both."""
    keys_file: Path | None = None
    """One API key per line, `<key> [<user>]` (# comments): each user sees only the sessions,
    models, sampling sessions, futures and checkpoints its own keys created (docs/server.md,
    "Users and isolation")."""
    base_models: tuple[str, ...] = (TINY,)
    """Base models clients may create: "tiny", "smollm2-135m" or local HF directories (several:
    `--base-models tiny path/to/hf_dir`)."""
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Size overrides for "tiny" (hidden_size, num_layers, num_heads, family)."""
    seed: int = 0
    """Seed of the base weights of "tiny" and of the default LoRA initialisation."""
    full_finetune: bool = False
    """Train every parameter even when the client asks for LoRA."""
    max_request_bytes: int = 64 << 20
    """Largest accepted request body in bytes (64 MiB); larger requests get 413."""
    max_tensor_values: int = MAX_TENSOR_VALUES
    """Most values one `loss_fn_inputs` tensor may declare (checked before it is allocated)."""
    max_seq_ids_ahead: int = 1024
    """A model accepts seq_ids in [next, next + max_seq_ids_ahead); further ones get 400."""
    poll_timeout: float = 30.0
    """Seconds one retrieve_future long poll waits before answering try_again."""
    result_keep_seconds: float = 3600.0
    """How long a finished request's result stays retrievable (retrieve_future); then its
    request_id is unknown (404)."""
    ttl_sweep_seconds: float = 60.0
    """How often checkpoints whose TTL has passed are deleted (they are refused at once anyway)
    and idle sessions are finished."""
    max_lora_rank: int = 256
    """Largest LoRA rank a client may ask for (create_model); larger ranks get 400."""
    max_sample_tokens: int = 65536
    """Most tokens one sample request may generate: num_samples × max_tokens (max_tokens=None
    counts as the model's context length minus the prompt). One sampling thread serves every
    session, so this bounds how long one request holds the others."""
    max_samplers_per_session: int = 8
    """Sampling sessions (each a full copy of its model) one session keeps; creating one more
    releases the least recently used, whose later requests get 404 saying it was released."""
    session_idle_seconds: float = 600.0
    """A session with no heartbeat and no request for this long is finished (its models and
    sampling sessions released; checkpoints stay). The SDK heartbeats every 10 s."""
    engine: EngineConfig | None = None
    """Engine settings of every served model (None: the engine's defaults)."""

    def __post_init__(self) -> None:
        if not self.api_key and self.keys_file is None:
            raise ValueError("give api_key (--api-key or $CISPO_API_KEY), keys_file, or both")
        if self.keys_file is not None and self.api_key in read_keys_file(self.keys_file):
            raise ValueError("api_key is also listed in keys_file; give each key once")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_sample_tokens < 1:
            raise ValueError(f"max_sample_tokens must be >= 1, got {self.max_sample_tokens}")
        if self.max_samplers_per_session < 1:
            raise ValueError(
                f"max_samplers_per_session must be >= 1, got {self.max_samplers_per_session}"
            )
        if not 0 < self.session_idle_seconds < float("inf"):
            raise ValueError(
                f"session_idle_seconds must be a finite number > 0, got {self.session_idle_seconds}"
            )
        if not 0 < self.result_keep_seconds < float("inf"):
            raise ValueError(
                f"result_keep_seconds must be a finite number > 0, got {self.result_keep_seconds}"
            )
        if not 0 < self.ttl_sweep_seconds < float("inf"):
            raise ValueError(
                f"ttl_sweep_seconds must be a finite number > 0, got {self.ttl_sweep_seconds}"
            )
        if not self.base_models:
            raise ValueError("base_models must name at least one model")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if not 0 < self.poll_timeout < float("inf"):
            raise ValueError(f"poll_timeout must be a finite number > 0, got {self.poll_timeout}")
        if self.max_seq_ids_ahead < 1:
            raise ValueError(f"max_seq_ids_ahead must be >= 1, got {self.max_seq_ids_ahead}")
        if self.max_tensor_values < 1:
            raise ValueError(f"max_tensor_values must be >= 1, got {self.max_tensor_values}")

    def users(self) -> dict[str, str]:
        """API key -> user name: `api_key` is "default", then the keys file's entries."""
        keys = {self.api_key: DEFAULT_OWNER} if self.api_key else {}
        if self.keys_file is not None:
            keys.update(read_keys_file(self.keys_file))
        return keys


@dataclass
class Session:
    session_id: str
    tags: list[str]
    user_metadata: dict[str, Any] | None
    owner: str = DEFAULT_OWNER
    finished: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    """time.monotonic() of its last heartbeat or request (idle sessions expire)."""


@dataclass
class ServedModel:
    model_id: str
    session_id: str
    record: RunRecord
    engine: Engine
    tokenizer: Any
    sequencer: ModelSequencer

    @property
    def owner(self) -> str:
        return self.record.owner

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]

    @property
    def max_context_length(self) -> int | None:
        return context_length(self.engine.model)


@dataclass
class SamplerSession:
    sampler_id: str
    base_model: str
    model_path: str | None
    sampler: HFSampler
    tokenizer: Any
    vocab_size: int
    max_context_length: int | None
    owner: str = DEFAULT_OWNER
    session_id: str = ""
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _SampleJob:
    request_id: str
    sampler: SamplerSession
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool
    prompt_logprobs_last_n: int | None
    loop: asyncio.AbstractEventLoop
    topk_prompt: int = 0
    topk_sample: int = 0

    def request(self) -> SampleRequest:
        return SampleRequest(self.sampler.sampler, self.prompt, self.num_samples, self.params)


class Backend:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = Store(config.root)
        self.futures = FutureTable(config.poll_timeout, config.result_keep_seconds)
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, ServedModel] = {}
        self.samplers: dict[str, SamplerSession] = {}
        self._released: dict[str, set[str]] = {}
        """session_id -> its sampling sessions released by max_samplers_per_session."""
        self._sampler_lock = threading.Lock()
        self._reserved: set[str] = set()
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cispo-ctl")
        self._sampling = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cispo-smp")
        self._sample_lock = threading.Lock()
        self._sample_queue: list[_SampleJob] = []
        self._tokenizer_dirs: dict[str, str] = {}
        self._context: dict[str, int | None] = {}

    def close(self) -> None:
        for served in list(self.models.values()):
            served.sequencer.shutdown()
        self._control.shutdown(wait=True)
        self._sampling.shutdown(wait=True)

    # ------------------------------------------------------------------ models
    def tokenizer_id(self, base_model: str) -> str:
        """A local directory `AutoTokenizer.from_pretrained` loads offline."""
        if base_model not in self._tokenizer_dirs:
            if base_model == TINY:
                directory = self.config.root / "tokenizers" / TINY
                if not (directory / "tokenizer.json").is_file():
                    tmp = directory.with_name(f".tmp-{uuid.uuid4().hex}")
                    build_char_tokenizer().save_pretrained(str(tmp))
                    if directory.exists():
                        shutil.rmtree(directory)
                    tmp.rename(directory)
                self._tokenizer_dirs[base_model] = str(directory.resolve())
            elif Path(base_model).is_dir():
                self._tokenizer_dirs[base_model] = str(Path(base_model).resolve())
            else:
                self._tokenizer_dirs[base_model] = base_model
        return self._tokenizer_dirs[base_model]

    def max_context_length(self, base_model: str) -> int | None:
        """Tokens a sequence of `base_model` may hold (prompt + completion, or one datum): its
        config's `max_position_embeddings`. Read from the config for "tiny" and local HF
        directories; for other names (the SmolLM2 GGUF alias) known once a model was built."""
        if base_model not in self._context:
            if base_model == TINY:
                self._context[base_model] = context_length(
                    load_bundle(TINY, overrides=self.config.model_overrides).model
                )
            elif Path(base_model).is_dir():
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(base_model, local_files_only=True)
                value = getattr(config, "max_position_embeddings", None)
                self._context[base_model] = int(value) if value else None
            else:
                return None
        return self._context[base_model]

    def check_base_model(self, base_model: str) -> None:
        if base_model not in self.config.base_models:
            raise UserError(
                f"unknown base_model {base_model!r}; "
                f"this server offers {list(self.config.base_models)}"
            )

    def _build(self, record: RunRecord) -> tuple[nn.Module, Any]:
        bundle = load_bundle(
            record.base_model, lora_rank=0, seed=self.config.seed, overrides=record.model_overrides
        )
        model = bundle.model
        if record.lora_rank > 0:
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in record.lora_targets if t in present]
            if not targets:
                raise UserError(
                    f"none of the LoRA targets {record.lora_targets} exist in the model"
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(record.seed)
                model = apply_lora(
                    model, r=record.lora_rank, alpha=2 * record.lora_rank, target_modules=targets
                )
        return model, bundle.tokenizer

    def new_record(
        self,
        model_id: str,
        base_model: str,
        lora: Mapping[str, Any] | None,
        user_metadata: Mapping[str, Any] | None,
        owner: str = DEFAULT_OWNER,
    ) -> RunRecord:
        self.check_base_model(base_model)
        rank = 0 if lora is None or self.config.full_finetune else int(lora["rank"])
        if not 0 <= rank <= self.config.max_lora_rank:
            raise UserError(
                f"lora_config.rank must be in [0, {self.config.max_lora_rank}] "
                f"(max_lora_rank of this server), got {rank}"
            )
        targets = [
            m for flag, mods in LORA_TARGETS.items() if (lora or {}).get(flag, True) for m in mods
        ]
        seed = lora.get("seed") if lora else None
        if seed is not None:
            try:
                check_seed("lora_config.seed", seed)
            except ValueError as error:  # torch.manual_seed would fail later, on the worker
                raise UserError(str(error)) from error
        return RunRecord(
            training_run_id=model_id,
            base_model=base_model,
            lora_rank=rank,
            lora_targets=targets,
            seed=self.config.seed if seed is None else int(seed),
            model_overrides=dict(self.config.model_overrides) if base_model == TINY else {},
            user_metadata={str(k): str(v) for k, v in (user_metadata or {}).items()} or None,
            owner=owner,
        )

    def session(self, session_id: str, owner: str) -> Session:
        """The live session `session_id` of `owner` (NotFound if unknown, finished or another
        user's: one message for all three), marked as seen now."""
        session = self.sessions.get(session_id)
        if session is None or session.finished or session.owner != owner:
            raise NotFound(f"unknown or finished session {session_id!r}")
        session.last_seen = time.monotonic()
        return session

    def reserve_model_id(self, session_id: str, model_seq_id: int, owner: str) -> str:
        self.session(session_id, owner)
        model_id = f"{session_id}:train:{model_seq_id}"
        if model_id in self.models or model_id in self._reserved:
            raise UserError(f"model {model_id!r} already exists (model_seq_id reused)")
        self._reserved.add(model_id)
        return model_id

    def create_model(
        self, record: RunRecord, state: Mapping[str, Any] | None = None, optimizer: bool = False
    ) -> ServedModel:
        """Build the model (on the control thread) and register it. `state`: load_weights."""
        model, tokenizer = self._build(record)
        self._context.setdefault(record.base_model, context_length(model))
        engine = Engine(
            model,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=int(tokenizer.pad_token_id or 0),
            config=self.config.engine,
            seed=record.seed,
        )
        if state is not None:
            self._load_into(engine, state, optimizer=optimizer)
        model_id = record.training_run_id
        served = ServedModel(
            model_id=model_id,
            session_id=model_id.split(":train:")[0],
            record=record,
            engine=engine,
            tokenizer=tokenizer,
            sequencer=ModelSequencer(model_id, record.owner, window=self.config.max_seq_ids_ahead),
        )
        self.store.add_run(record)
        self.models[model_id] = served
        self._reserved.discard(model_id)
        return served

    @staticmethod
    def _load_into(engine: Engine, state: Mapping[str, Any], *, optimizer: bool) -> None:
        if optimizer and state.get("optimizer") is None:
            raise UserError("this checkpoint has no optimizer state (it is a sampler checkpoint)")
        try:
            engine.load_state(state, optimizer=optimizer)
        except RuntimeError as error:  # state_dict key/shape mismatch
            raise UserError(f"checkpoint does not fit this model: {error}") from error

    def model(self, model_id: str, owner: str) -> ServedModel:
        """The live model `model_id` of `owner`; NotFound if unknown or another user's."""
        served = self.models.get(model_id)
        if served is None or served.owner != owner:
            raise NotFound(f"unknown model_id {model_id!r}")
        self.store.touch(model_id)
        session = self.sessions.get(served.session_id)
        if session is not None:
            session.last_seen = time.monotonic()
        return served

    def get_info(self, model_id: str, owner: str) -> dict[str, Any]:
        served = self.model(model_id, owner)
        record = served.record
        arch = getattr(getattr(served.engine.model, "config", None), "model_type", None)
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {
                "arch": arch,
                "model_name": record.base_model,
                "tokenizer_id": self.tokenizer_id(record.base_model),
            },
            "is_lora": record.lora_rank > 0,
            "lora_rank": record.lora_rank or None,
            "model_name": record.base_model,
        }

    # ------------------------------------------------------------------ training ops
    def check_forward_backward(self, served: ServedModel, call: ForwardBackwardCall) -> None:
        """Everything that can be wrong with a forward_backward request, before it is queued: the
        engine's own check (`Engine.check`, the one the engine runs again before touching any
        state), with its `DatumError` and loss-config errors as 400s."""
        if call.loss_fn == "stable_reinforce":
            raise UserError(STABLE_REINFORCE_REFUSED)
        try:
            served.engine.check(call.datums, call.loss_fn, call.loss_fn_config)
        except DatumError as error:
            raise UserError(str(error)) from error
        except (ValueError, TypeError) as error:  # make_loss_config: the loss name or config
            raise UserError(f"bad loss: {error}") from error

    @staticmethod
    def run_forward_backward(served: ServedModel, call: ForwardBackwardCall) -> bytes:
        out = served.engine.forward_backward(
            call.datums, call.loss_fn, call.loss_fn_config, forward_only=call.forward_only
        )
        return encode_forward_backward(
            ForwardBackwardOutput(
                loss_fn_output_type=out.loss_fn_output_type,
                loss_fn_outputs=out.loss_fn_outputs,
                metrics=sdk_metrics(out.metrics),
            )
        )

    @staticmethod
    def run_optim_step(served: ServedModel, adam: AdamParams) -> dict[str, Any]:
        return {"type": "optim_step", "metrics": served.engine.optim_step(adam)}

    def run_save(
        self,
        served: ServedModel,
        kind: str,
        name: str,
        overwrite: bool,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        state = served.engine.state()
        if kind == "sampler_weights":
            state = {"model": state["model"], "version": state["version"]}
        path = self.store.save(
            served.model_id,
            kind,
            name,
            state,
            overwrite=overwrite,
            ttl_seconds=ttl_seconds,
            user_metadata=user_metadata,
        )
        return {
            "path": path,
            "type": "save_weights" if kind == "weights" else "save_weights_for_sampler",
        }

    def run_export(
        self,
        served: ServedModel,
        name: str,
        ttl_seconds: int | None,
        recipients: list[Any] | None = None,
    ) -> dict[str, Any]:
        """save_weights_external: the model as an HF directory (+ PEFT adapter for LoRA),
        written by `cispo.export` (checked by loading it back) under external_weights/<name>;
        with age recipients every file is stored encrypted as `<file>.age`."""
        from cispo.export import export_state

        model_state = served.engine.state()["model"]
        record = served.record

        def write(directory: Path) -> None:
            export_state(
                model_state, record.base_model, directory, model_overrides=record.model_overrides
            )
            if recipients:
                encrypt_tree(directory, recipients)

        path = self.store.save_external(served.model_id, name, write, ttl_seconds=ttl_seconds)
        entry = self.store.entry(served.model_id, f"{EXTERNAL}/{name}")
        return {
            "path": path,
            "size_bytes": None if entry is None else entry["size_bytes"],
            "type": "save_weights_external",
        }

    def run_ephemeral_sampler(self, served: ServedModel, sampling_session_seq_id: int) -> Result:
        snapshot = served.engine.sampler_model()
        sampler_id = f"{served.session_id}:sample:{sampling_session_seq_id}"
        sampler = self._sampler(
            sampler_id,
            served.record.base_model,
            None,
            snapshot,
            served.tokenizer,
            (served.record.seed + 7919 * sampling_session_seq_id) % 2**64,
        )
        self._register_sampler(sampler, served.owner, served.session_id)
        return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    def run_load(self, served: ServedModel, path: str, optimizer: bool) -> dict[str, Any]:
        record, state = self.store.load(path, served.owner)
        mine = served.record
        if (record.base_model, record.lora_rank, record.lora_targets) != (
            mine.base_model,
            mine.lora_rank,
            mine.lora_targets,
        ):
            raise UserError(
                f"{path!r} was trained on {record.base_model!r} with LoRA rank "
                f"{record.lora_rank}; this model is {mine.base_model!r}, rank "
                f"{mine.lora_rank}"
            )
        self._load_into(served.engine, state, optimizer=optimizer)
        return {"path": path, "type": "load_weights"}

    # ------------------------------------------------------------------ sampling
    def _sampler(
        self,
        sampler_id: str,
        base_model: str,
        model_path: str | None,
        model: nn.Module,
        tokenizer: Any,
        seed: int,
    ) -> SamplerSession:
        return SamplerSession(
            sampler_id=sampler_id,
            base_model=base_model,
            model_path=model_path,
            sampler=HFSampler(
                model,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=int(tokenizer.pad_token_id or 0),
                tokenizer=tokenizer,
                generator=torch.Generator().manual_seed(seed),
            ),
            tokenizer=tokenizer,
            vocab_size=vocab_size(model),
            max_context_length=context_length(model),
        )

    def create_sampler(
        self,
        sampler_id: str,
        base_model: str | None,
        model_path: str | None,
        owner: str,
        session_id: str,
    ) -> dict[str, Any]:
        """Runs on the control thread: build the base model, load saved weights if given."""
        if model_path is not None:
            record, state = self.store.load(model_path, owner)
        elif base_model is not None:
            record, state = self.new_record(sampler_id, base_model, None, None), None
        else:
            raise UserError("create_sampling_session needs model_path or base_model")
        model, tokenizer = self._build(record)
        if state is not None:
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as error:
                raise UserError(f"checkpoint does not fit its model: {error}") from error
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        sampler = self._sampler(
            sampler_id, record.base_model, model_path, model, tokenizer, record.seed
        )
        self._register_sampler(sampler, owner, session_id)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    def _register_sampler(self, sampler: SamplerSession, owner: str, session_id: str) -> None:
        """Add a sampling session; past `max_samplers_per_session` in its session, release the
        least recently used other one (its model copy is freed once queued requests are done)."""
        sampler.owner, sampler.session_id = owner, session_id
        with self._sampler_lock:
            self.samplers[sampler.sampler_id] = sampler
            released = self._released.setdefault(session_id, set())
            released.discard(sampler.sampler_id)
            mine = [s for s in self.samplers.values() if s.session_id == session_id]
            excess = len(mine) - self.config.max_samplers_per_session
            for old in sorted(mine, key=lambda s: s.last_used)[: max(excess, 0)]:
                if old is not sampler:
                    del self.samplers[old.sampler_id]
                    released.add(old.sampler_id)

    def sampler(self, sampler_id: str, owner: str) -> SamplerSession:
        """The sampling session `sampler_id` of `owner`, marked as used now; NotFound if unknown,
        another user's, or released (then the message says why)."""
        with self._sampler_lock:
            found = self.samplers.get(sampler_id)
            if found is None or found.owner != owner:
                session = self.sessions.get(sampler_id.split(":sample:")[0])
                if (
                    session is not None
                    and session.owner == owner
                    and sampler_id in (self._released.get(session.session_id, ()))
                ):
                    raise NotFound(
                        f"sampling_session_id {sampler_id!r} was released: its session holds at "
                        f"most max_samplers_per_session={self.config.max_samplers_per_session} "
                        "sampling sessions and this was the least recently used; create a new "
                        "one (save_weights_and_get_sampling_client)"
                    )
                raise NotFound(f"unknown sampling_session_id {sampler_id!r}")
            found.last_used = time.monotonic()
        session = self.sessions.get(found.session_id)
        if session is not None:
            session.last_seen = found.last_used
        return found

    def enqueue_sample(self, job: _SampleJob) -> None:
        with self._sample_lock:
            self._sample_queue.append(job)
            start = len(self._sample_queue) == 1
        if start:
            self._sampling.submit(self._drain_samples)

    def _drain_samples(self) -> None:
        """Every queued request, batched as the in-process client batches
        (`cispo.engine.batching.run_sample_batches`); each future resolves on its event loop."""
        with self._sample_lock:
            jobs, self._sample_queue = self._sample_queue, []
        run_sample_batches(
            [(j.request(), j) for j in jobs], self._deliver_sample, self._fail_sample
        )

    def _deliver_sample(self, job: _SampleJob, sequences: list[SampledSequence]) -> None:
        payload = encode_sample_response(
            sequences,
            self._prompt_logprobs(job),
            topk_prompt=self._topk_prompt(job),
            topk_sample=self._topk_sample(job, sequences),
        )
        job.loop.call_soon_threadsafe(self.futures.resolve, job.request_id, payload)

    def _fail_sample(self, job: _SampleJob, error: BaseException) -> None:
        job.loop.call_soon_threadsafe(self.futures.fail, job.request_id, error)

    @staticmethod
    def _prompt_logprobs(job: _SampleJob) -> list[float | None] | None:
        if not job.prompt_logprobs:
            return None
        values: list[float | None] = [None, *job.sampler.sampler.compute_logprobs([job.prompt])[0]]
        if job.prompt_logprobs_last_n is not None:
            cut = len(values) - job.prompt_logprobs_last_n
            values = [None if i < cut else v for i, v in enumerate(values)]
        return values

    @staticmethod
    def _topk_prompt(job: _SampleJob) -> TopK | None:
        """Row i: top-k of the distribution prompt[i] was drawn from (temperature 1, as the
        prompt logprobs); row 0 and rows before `prompt_logprobs_last_n` are empty."""
        if not job.topk_prompt:
            return None
        n, k = len(job.prompt), job.topk_prompt
        values = np.full((n, k), np.nan, dtype=np.float32)
        ids = np.zeros((n, k), dtype=np.int64)
        first = 1 if job.prompt_logprobs_last_n is None else n - job.prompt_logprobs_last_n
        if first < n:
            lp, tok = model_topk_logprobs(
                job.sampler.sampler.model, job.prompt, range(first - 1, n - 1), k
            )
            values[first:], ids[first:] = lp.cpu().numpy(), tok.cpu().numpy()
        return values, ids

    @staticmethod
    def _topk_sample(job: _SampleJob, sequences: list[SampledSequence]) -> list[TopK] | None:
        """Per sequence, row j: top-k of the distribution sampled token j was drawn from, at the
        request's temperature (0 reads as 1), the same distribution as its reported logprob."""
        if not job.topk_sample:
            return None
        temperature = job.params.temperature or 1.0
        out: list[TopK] = []
        for seq in sequences:
            full, start = job.prompt + list(seq.tokens), len(job.prompt) - 1
            if not seq.tokens:
                empty = np.zeros((0, job.topk_sample))
                out.append((empty.astype(np.float32), empty.astype(np.int64)))
                continue
            lp, tok = model_topk_logprobs(
                job.sampler.sampler.model,
                full,
                range(start, start + len(seq.tokens)),
                job.topk_sample,
                temperature=temperature,
            )
            out.append((lp.cpu().numpy(), tok.cpu().numpy()))
        return out

    # ------------------------------------------------------------------ sessions
    def create_session(
        self, tags: list[str], user_metadata: dict[str, Any] | None, owner: str = DEFAULT_OWNER
    ) -> str:
        session_id = f"s{uuid.uuid4().hex}"
        self.sessions[session_id] = Session(session_id, tags, user_metadata, owner)
        return session_id

    def finish_session(self, session_id: str, owner: str) -> None:
        session = self.sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"unknown session {session_id!r}")
        self._finish(session)

    def expire_idle_sessions(self) -> list[str]:
        """Finish every live session idle (no heartbeat, no request) for longer than
        `session_idle_seconds`; returns their ids."""
        cutoff = time.monotonic() - self.config.session_idle_seconds
        idle = [s for s in list(self.sessions.values()) if not s.finished and s.last_seen < cutoff]
        for session in idle:
            logger.info("session %s idle since %.0f s: finished", session.session_id, cutoff)
            self._finish(session)
        return [s.session_id for s in idle]

    def _finish(self, session: Session) -> None:
        session_id = session.session_id
        session.finished = True
        prefix = f"{session_id}:"
        with self._sampler_lock:
            for sampler_id in [k for k in self.samplers if k.startswith(prefix)]:
                del self.samplers[sampler_id]
            self._released.pop(session_id, None)
        for model_id in [k for k in self.models if k.startswith(prefix)]:
            served = self.models.pop(model_id)
            served.sequencer.executor.shutdown(wait=False)
