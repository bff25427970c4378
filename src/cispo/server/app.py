"""FastAPI app speaking the wire protocol of the `tinker` Python SDK (pinned range: docs/server.md).

Request bodies are validated with the SDK's own pydantic request types (`tinker.types.*Request`),
so a field the SDK sends is read exactly as the SDK means it, and an unknown field is a 400.
Every request needs an `X-API-Key` the server knows (401 otherwise); the key names a user, and
every session, model, sampling session, future and checkpoint belongs to the user whose request
created it: another user gets 404 for it, exactly as for an id that does not exist.
Bodies over `max_request_bytes` get 413.
Mutating calls answer `{"request_id"}` at once and run on the model's ordered worker; the result is
fetched with `retrieve_future` (see `futures.py`). Left out: JWT auth, custom losses, images,
stability info (stable_reinforce: refused with the reason), `retrieve_futures` batching.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from typing import Any, TypeVar, cast

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from google.protobuf.message import DecodeError
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as pb

from cispo.losses import LOSSES
from cispo.server.futures import NotFound, Result, UserError
from cispo.server.runtime import (
    LORA_TARGETS,
    STABLE_REINFORCE_REFUSED,
    Backend,
    ServedModel,
    ServerConfig,
    Session,
    _SampleJob,
)
from cispo.server.store import EXTERNAL, SCHEME, age_recipients, check_ttl
from cispo.server.wire import ForwardBackwardCall, WireError, decode_forward_backward
from cispo.types import AdamParams, SamplingParams

PROTO = "application/x-protobuf"
FILES_ROUTE = "/api/v1/external_files/"
"""Downloads of external_weights files: no API key (urllib fetches them, as from a bucket), but
an HMAC signature over the file and an expiry time, as a signed bucket URL has."""
URL_LIFETIME_S = 3600
M = TypeVar("M", bound=pydantic.BaseModel)
Scope = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


class TooLarge(Exception):
    pass


USER = "cispo_user"
"""Key of the request's user name in the ASGI scope's "state" (set by `_Guard`)."""


def _user_of(keys: list[tuple[bytes, str]], given: bytes) -> str | None:
    """The user of API key `given`, or None. Compares against every key with
    `hmac.compare_digest`, without stopping at a match, so the time taken does not depend on
    which key matched or how much of a wrong key was right."""
    found = None
    for key, user in keys:
        if hmac.compare_digest(given, key):
            found = user
    return found


class _Guard:
    """ASGI middleware: API key check (401) and a Content-Length cap (413), before any routing.
    Puts the key's user into `scope["state"][USER]`."""

    def __init__(self, app: ASGIApp, users: dict[str, str], max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.keys = [(key.encode(), user) for key, user in users.items()]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["path"].startswith(FILES_ROUTE) and scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)  # signed URLs: the route checks the signature
            return
        user = _user_of(self.keys, headers.get(b"x-api-key", b""))
        if user is None:
            response = JSONResponse({"detail": "missing or wrong X-API-Key"}, status_code=401)
            await response(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse(
                {"detail": f"request body over the {self.max_bytes}-byte limit"}, status_code=413
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[USER] = user
        await self.app(scope, receive, send)


async def _body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(cls: type[M], body: bytes) -> M:
    try:
        return cls.model_validate_json(body)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        )
        raise UserError(f"invalid {cls.__name__}: {problems}") from error


def _result_response(request_id: str, result: Result | None) -> Response:
    if result is None:
        return JSONResponse(
            {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        )
    if isinstance(result, bytes):
        return Response(result, media_type=PROTO)
    return JSONResponse(result)


def create_app(config: ServerConfig) -> FastAPI:
    backend = Backend(config)
    limit = config.max_request_bytes

    async def sweep_expired() -> None:
        """Every `ttl_sweep_seconds`: finish idle sessions, and delete checkpoints whose TTL has
        passed (on the control thread, so never during a create-from-checkpoint load)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(config.ttl_sweep_seconds)
            backend.expire_idle_sessions()
            await loop.run_in_executor(backend._control, backend.store.sweep)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        sweeper = asyncio.create_task(sweep_expired())
        yield
        sweeper.cancel()
        backend.close()

    app = FastAPI(
        title="cispo server (compatible with the tinker SDK)",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.backend = backend
    app.add_middleware(_Guard, users=config.users(), max_bytes=limit)

    def user(request: Request) -> str:
        return str(request.scope["state"][USER])

    @app.exception_handler(UserError)
    @app.exception_handler(WireError)
    async def _bad_request(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error.args[0])}, status_code=404)

    @app.exception_handler(TooLarge)
    async def _too_large(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=413)

    def decompress(body: bytes, zstd: bool) -> bytes:
        if not zstd:
            return body
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
        except zstandard.ZstdError as error:
            raise WireError(f"bad zstd body: {error}") from error

    def decode_request(raw: bytes) -> ForwardBackwardCall:
        return decode_forward_backward(raw, max_tensor_values=config.max_tensor_values)

    async def body_of(request: Request, cls: type[M]) -> M:
        return _parse(cls, await _body(request, limit))

    def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"request_id": request_id, "model_id": model_id, **extra}

    def ordered(served: ServedModel, seq_id: int | None, work: Callable[[], Result]) -> str:
        if seq_id is None:
            raise UserError("seq_id is required for requests on a training model")
        return served.sequencer.submit(backend.futures, seq_id, work)

    @contextmanager
    def consumes_seq_id(served: ServedModel, seq_id: int | None) -> Iterator[None]:
        """A request refused inside this block (400) still takes its seq_id slot, which completes
        with the error and runs nothing: the SDK never reuses a seq_id, so otherwise every later
        request on the model would wait for this one forever."""
        try:
            yield
        except (UserError, WireError, NotFound) as error:
            if seq_id is not None:
                served.sequencer.refuse(backend.futures, seq_id, error)
            raise

    def on_control(owner: str, work: Callable[[], Result]) -> str:
        request_id = backend.futures.create(owner)
        backend.futures.run_on(backend._control, request_id, work)
        return request_id

    api = "/api/v1"

    # ------------------------------------------------------------------ service / sessions
    @app.post(f"{api}/client/config")
    async def client_config() -> dict[str, Any]:
        return {
            "pjwt_auth_enabled": False,
            "proto_compress_fwdbwd": False,
            "parallel_fwdbwd_chunks": True,
            "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False,
            "sample_join_sampling_session": False,
        }

    @app.post(f"{api}/client/dynamic_config")
    async def dynamic_config() -> dict[str, Any]:
        return {
            "refresh_interval_sec": 300,
            "sample_cancel_enabled": False,
            "sample_cancel_max_batch_size": 64,
        }

    @app.get(f"{api}/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{api}/get_server_capabilities")
    async def capabilities() -> dict[str, Any]:
        return {
            "supported_models": [
                {
                    "model_name": name,
                    "max_context_length": backend.max_context_length(name),
                    "trainable": True,
                    "sampleable": True,
                }
                for name in config.base_models
            ],
            # Not in the SDK's response model (it ignores extra fields): the loss_fn names this
            # server accepts, straight from the loss registry.
            "supported_loss_fns": sorted(LOSSES),
        }

    @app.post(f"{api}/telemetry")
    async def telemetry() -> dict[str, str]:
        return {"status": "accepted"}

    @app.post(f"{api}/create_session")
    async def create_session(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.CreateSessionRequest)
        session_id = backend.create_session(list(req.tags), req.user_metadata, user(request))
        return {"type": "create_session", "session_id": session_id}

    @app.post(f"{api}/session_heartbeat")
    async def heartbeat(request: Request) -> Response:
        req = await body_of(request, tt.SessionHeartbeatRequest)
        try:
            backend.session(req.session_id, user(request))
        except NotFound:  # 410 stops the SDK's heartbeat loop
            return JSONResponse({"detail": "session finished or unknown"}, status_code=410)
        return JSONResponse({"type": "session_heartbeat"})

    @app.post(f"{api}/sessions/{{session_id}}/finish")
    async def finish(session_id: str, request: Request) -> dict[str, Any]:
        await _body(request, limit)
        backend.finish_session(session_id, user(request))
        return {}

    # ------------------------------------------------------------------ models
    @app.post(f"{api}/create_model")
    async def create_model(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.CreateModelRequest)
        if getattr(req.optimizer_config, "type", "adamw") != "adamw":
            raise UserError("only the adamw optimizer is supported")
        owner = user(request)
        model_id = backend.reserve_model_id(req.session_id, req.model_seq_id, owner)
        try:
            lora = req.lora_config.model_dump() if req.lora_config is not None else None
            record = backend.new_record(model_id, req.base_model, lora, req.user_metadata, owner)
        except Exception:
            backend._reserved.discard(model_id)
            raise

        def work() -> Result:
            try:
                backend.create_model(record)
            finally:  # a build that fails must not keep model_seq_id reserved
                backend._reserved.discard(model_id)
            return {"model_id": model_id, "type": "create_model"}

        return future(on_control(owner, work), model_id)

    @app.post(f"{api}/get_info")
    async def get_info(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.GetInfoRequest)
        return backend.get_info(req.model_id, user(request))

    @app.post(f"{api}/forward_backward")
    async def forward_backward(request: Request) -> dict[str, Any]:
        if PROTO not in request.headers.get("content-type", ""):
            raise UserError(f"forward_backward takes a protobuf body (Content-Type: {PROTO})")
        body = await _body(request, limit)
        zstd = request.headers.get("content-encoding", "") == "zstd"
        # Decompression, decoding and validation are CPU-bound (up to the body limit): off the
        # event loop, so one large or hostile request does not stall every other client.
        raw = await asyncio.to_thread(decompress, body, zstd)
        try:
            call = await asyncio.to_thread(decode_request, raw)
        except WireError as error:
            # Well-formed but refused content (an image chunk, a bad tensor): still consume the
            # seq_id if the message names a live model.
            header = pb.ForwardBackwardRequest()
            try:
                header.ParseFromString(raw)
            except DecodeError:
                raise error from None
            served = backend.models.get(header.model_id)
            if served is not None and served.owner == user(request):
                served.sequencer.refuse(backend.futures, int(header.seq_id), error)
            raise
        served = backend.model(call.model_id, user(request))
        with consumes_seq_id(served, call.seq_id):
            await asyncio.to_thread(backend.check_forward_backward, served, call)
        rid = ordered(served, call.seq_id, lambda: backend.run_forward_backward(served, call))
        return future(rid, served.model_id)

    @app.post(f"{api}/optim_step")
    async def optim_step(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.OptimStepRequest)
        served = backend.model(req.model_id, user(request))
        params = req.optim_params
        with consumes_seq_id(served, req.seq_id):
            if not isinstance(params, tt.AdamParams):
                raise UserError("only AdamParams are supported (the model was created with adamw)")
            try:
                adam = AdamParams(**params.model_dump())
            except ValueError as error:
                raise UserError(str(error)) from error
        rid = ordered(served, req.seq_id, lambda: backend.run_optim_step(served, adam))
        return future(rid, served.model_id)

    @app.post(f"{api}/save_weights")
    async def save_weights(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.SaveWeightsRequest)
        served = backend.model(req.model_id, user(request))
        with consumes_seq_id(served, req.seq_id):
            check_ttl(req.ttl_seconds)
        name = req.path or f"step-{served.engine.version}"
        rid = ordered(
            served,
            req.seq_id,
            lambda: backend.run_save(
                served, "weights", name, req.overwrite, req.ttl_seconds, req.user_metadata
            ),
        )
        return future(rid, served.model_id)

    @app.post(f"{api}/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.SaveWeightsForSamplerRequest)
        served = backend.model(req.model_id, user(request))
        with consumes_seq_id(served, req.seq_id):
            check_ttl(req.ttl_seconds)
        work: Callable[[], Result]
        if req.path is not None:
            name, ttl, meta = req.path, req.ttl_seconds, req.user_metadata
            work = lambda: backend.run_save(  # noqa: E731
                served, "sampler_weights", name, True, ttl, meta
            )
        elif req.sampling_session_seq_id is not None:
            seq = req.sampling_session_seq_id
            work = lambda: backend.run_ephemeral_sampler(served, seq)  # noqa: E731
        else:
            with consumes_seq_id(served, req.seq_id):
                raise UserError("save_weights_for_sampler needs path or sampling_session_seq_id")
        return future(ordered(served, req.seq_id, work), served.model_id)

    @app.post(f"{api}/save_weights_external")
    async def save_weights_external(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.SaveWeightsExternalRequest)
        served = backend.model(req.model_id, user(request))
        with consumes_seq_id(served, req.seq_id):
            check_ttl(req.ttl_seconds)
            backend.store.checkpoint_dir(served.model_id, f"{EXTERNAL}/{req.path}")
            recipients = age_recipients(req.age_encryption_recipients)
        name, ttl = req.path, req.ttl_seconds
        rid = ordered(served, req.seq_id, lambda: backend.run_export(served, name, ttl, recipients))
        return future(rid, served.model_id)

    @app.post(f"{api}/load_weights")
    async def load_weights(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.LoadWeightsRequest)
        owner = user(request)
        if req.model_id is not None:
            served = backend.model(req.model_id, owner)
            with consumes_seq_id(served, req.seq_id):
                backend.store.resolve(req.path, owner)  # 4xx now for an unknown path
            path, opt = req.path, req.optimizer
            rid = ordered(served, req.seq_id, lambda: backend.run_load(served, path, opt))
            return future(rid, served.model_id)
        if req.session_id is None or req.model_seq_id is None:
            raise UserError("load_weights needs model_id, or session_id and model_seq_id")
        source, _, _ = backend.store.resolve(req.path, owner)
        if req.base_model is not None and req.base_model != source.base_model:
            raise UserError(
                f"{req.path!r} was trained on {source.base_model!r}, not {req.base_model!r}"
            )
        model_id = backend.reserve_model_id(req.session_id, req.model_seq_id, owner)
        path, opt, meta = req.path, req.optimizer, req.user_metadata

        def work() -> Result:
            try:
                record, state = backend.store.load(path, owner)
                new = backend.new_record(
                    model_id,
                    record.base_model,
                    {"rank": record.lora_rank, "seed": record.seed} if record.lora_rank else None,
                    meta if meta is not None else record.user_metadata,
                    owner,
                )
                new.lora_targets, new.model_overrides = record.lora_targets, record.model_overrides
                backend.create_model(new, state, optimizer=opt)
            finally:
                backend._reserved.discard(model_id)
            return {"model_id": model_id, "path": path, "type": "load_weights"}

        return future(on_control(owner, work), model_id)

    # ------------------------------------------------------------------ sampling
    @app.post(f"{api}/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.CreateSamplingSessionRequest)
        owner = user(request)
        backend.session(req.session_id, owner)
        if req.model_path is not None:
            backend.store.resolve(req.model_path, owner)
        elif req.base_model is not None:
            backend.check_base_model(req.base_model)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            backend._control,
            lambda: backend.create_sampler(
                sampler_id, req.base_model, req.model_path, owner, req.session_id
            ),
        )

    @app.get(f"{api}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str, request: Request) -> dict[str, Any]:
        s = backend.sampler(sampler_id, user(request))
        return {"sampler_id": s.sampler_id, "base_model": s.base_model, "model_path": s.model_path}

    @app.post(f"{api}/asample")
    async def asample(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.SampleRequest)
        if req.sampling_session_id is None:
            raise UserError("asample needs a sampling_session_id (create_sampling_session first)")
        owner = user(request)
        sampler = backend.sampler(req.sampling_session_id, owner)
        if req.record_stability_info:
            # Only stable_reinforce reads it, and that loss is refused: say so at the first request.
            raise UserError(f"record_stability_info=True is refused. {STABLE_REINFORCE_REFUSED}")
        for field, k in (
            ("topk_prompt_logprobs", req.topk_prompt_logprobs),
            ("topk_sample_logprobs", req.topk_sample_logprobs),
        ):
            if not 0 <= k <= sampler.vocab_size:
                raise UserError(f"{field} must be in [0, {sampler.vocab_size}], got {k}")
        unsupported = [
            name
            for name, on in (
                ("target_prompt_logprobs", req.target_prompt_logprobs is not None),
                ("prompt_alt_tokens_k", req.prompt_alt_tokens_k),
            )
            if on
        ]
        if unsupported:
            raise UserError(f"not supported by this server: {unsupported}")
        prompt: list[int] = []
        for chunk in req.prompt.chunks:
            if not isinstance(chunk, tt.EncodedTextChunk):
                raise UserError(f"only encoded_text prompt chunks are supported, got {chunk.type}")
            prompt.extend(int(t) for t in chunk.tokens)
        if not prompt or min(prompt) < 0 or max(prompt) >= sampler.vocab_size:
            raise UserError(f"prompt must be non-empty token ids in [0, {sampler.vocab_size})")
        if not 1 <= req.num_samples <= 1024:
            raise UserError(f"num_samples must be in [1, 1024], got {req.num_samples}")
        sp = req.sampling_params
        # The SDK validated the union: a string, a list of strings or a list of token ids.
        stop = cast(
            "str | list[str] | list[int] | None",
            sp.stop if sp.stop is None or isinstance(sp.stop, str) else list(sp.stop),
        )
        try:
            params = SamplingParams(
                max_tokens=sp.max_tokens,
                seed=sp.seed,
                stop=stop,
                temperature=sp.temperature,
                top_k=sp.top_k,
                top_p=sp.top_p,
            )
        except ValueError as error:
            raise UserError(f"bad sampling_params: {error}") from error
        limit = sampler.max_context_length
        if limit is not None and len(prompt) + (sp.max_tokens or 0) > limit:
            raise UserError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({sp.max_tokens}) exceeds "
                f"max_context_length={limit} of {sampler.base_model!r}"
            )
        if sp.max_tokens is None and (limit is None or len(prompt) >= limit):
            raise UserError(
                "sampling_params.max_tokens=None means 'up to the context length', and "
                f"{sampler.base_model!r} has room for no more tokens after a {len(prompt)}-token "
                f"prompt (max_context_length={limit}); give max_tokens"
            )
        tokens = req.num_samples * (sp.max_tokens or (limit or 0) - len(prompt))
        if tokens > config.max_sample_tokens:
            raise UserError(
                f"num_samples ({req.num_samples}) × max_tokens "
                f"({sp.max_tokens or f'None = {(limit or 0) - len(prompt)} left of the context'}) "
                f"= {tokens} exceeds max_sample_tokens={config.max_sample_tokens} of this server; "
                "ask for fewer samples or tokens per request"
            )
        last_n = req.prompt_logprobs_last_n
        if last_n is not None and not 1 <= last_n <= len(prompt) - 1:
            raise UserError(f"prompt_logprobs_last_n must be in [1, {len(prompt) - 1}]")
        request_id = backend.futures.create(owner)
        backend.enqueue_sample(
            _SampleJob(
                request_id=request_id,
                sampler=sampler,
                prompt=prompt,
                num_samples=req.num_samples,
                params=params,
                prompt_logprobs=bool(req.prompt_logprobs),
                prompt_logprobs_last_n=last_n,
                loop=asyncio.get_running_loop(),
                topk_prompt=req.topk_prompt_logprobs,
                topk_sample=req.topk_sample_logprobs,
            )
        )
        ids = [f"{request_id}:{i}" for i in range(req.num_samples)]
        return future(request_id, None, sample_sequence_ids=ids)

    # ------------------------------------------------------------------ futures
    @app.post(f"{api}/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        req = await body_of(request, tt.FutureRetrieveRequest)
        backend.futures.check(req.request_id, user(request))
        result = await backend.futures.wait(req.request_id)
        return _result_response(req.request_id, result)

    # ------------------------------------------------------------------ training runs (REST)
    @app.get(f"{api}/training_runs")
    async def training_runs(request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        owner = user(request)
        runs = [r for r in list(backend.store.runs.values()) if r.owner == owner]
        runs.sort(key=lambda r: r.created, reverse=True)
        page = runs[offset : offset + limit]
        return {
            "training_runs": [backend.store.training_run_json(r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }

    def run_record(run_id: str, request: Request) -> Any:
        record = backend.store.owned(run_id, user(request))
        if record is None:
            raise NotFound(f"unknown training run {run_id!r}")
        return record

    @app.get(f"{api}/training_runs/{{run_id}}")
    async def training_run(run_id: str, request: Request) -> dict[str, Any]:
        return backend.store.training_run_json(run_record(run_id, request))

    @app.get(f"{api}/training_runs/{{run_id}}/checkpoints")
    async def checkpoints(run_id: str, request: Request) -> dict[str, Any]:
        record = run_record(run_id, request)
        backend.store.sweep()
        return {"checkpoints": list(record.checkpoints)}

    def checkpoint_entry(run_id: str, checkpoint_id: str, request: Request) -> dict[str, Any]:
        run_record(run_id, request)
        backend.store.checkpoint_dir(run_id, checkpoint_id)  # 400 for a malformed id
        entry = backend.store.entry(run_id, checkpoint_id)
        if entry is None:
            raise NotFound(f"no checkpoint {SCHEME}{run_id}/{checkpoint_id}")
        return entry

    @app.delete(f"{api}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request) -> Response:
        checkpoint_entry(run_id, checkpoint_id, request)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            backend._control, lambda: backend.store.delete(run_id, checkpoint_id)
        )
        return Response(status_code=204)

    @app.put(f"{api}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}/ttl")
    async def set_ttl(run_id: str, checkpoint_id: str, request: Request) -> Response:
        body = await _body(request, limit)
        try:
            data = json.loads(body)
        except ValueError as error:
            raise UserError(
                f"the body must be JSON {{'ttl_seconds': int | null}}: {error}"
            ) from error
        if not isinstance(data, dict) or set(data) != {"ttl_seconds"}:
            raise UserError(f"the body must be {{'ttl_seconds': int | null}}, got {data!r}")
        ttl = data["ttl_seconds"]
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)):
            raise UserError(f"ttl_seconds must be an integer or null, got {ttl!r}")
        check_ttl(ttl)
        checkpoint_entry(run_id, checkpoint_id, request)
        backend.store.set_ttl(run_id, checkpoint_id, ttl)
        return Response(status_code=204)

    signing_key = secrets.token_bytes(32)  # per server process: a restart voids old URLs

    def signature(relative: str, expires: int) -> str:
        return hmac.new(signing_key, f"{relative}|{expires}".encode(), hashlib.sha256).hexdigest()

    @app.get(
        f"{api}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}/external_weights_urls"
    )
    async def external_weights_urls(run_id: str, checkpoint_id: str, request: Request) -> Any:
        kind, _, name = checkpoint_id.partition("/")
        if kind != EXTERNAL:
            raise UserError(f"only {EXTERNAL}/<name> checkpoints have download URLs")
        checkpoint_entry(run_id, checkpoint_id, request)
        files = backend.store.external_files(run_id, name)
        expires = int(time.time()) + URL_LIFETIME_S
        base = str(request.base_url).rstrip("/")
        urls = {}
        for relative in files:
            target = f"{run_id}/{name}/{relative}"
            query = urllib.parse.urlencode({"expires": expires, "sig": signature(target, expires)})
            urls[relative] = f"{base}{FILES_ROUTE}{urllib.parse.quote(target)}?{query}"
        return {
            "urls": urls,
            "expires": datetime.fromtimestamp(expires, tz=timezone.utc).isoformat(),
        }

    @app.get(f"{FILES_ROUTE}{{target:path}}")
    async def external_file(target: str, expires: int = 0, sig: str = "") -> Response:
        if not hmac.compare_digest(sig, signature(target, expires)):
            return JSONResponse({"detail": "bad signature"}, status_code=403)
        if time.time() > expires:
            return JSONResponse({"detail": "this URL has expired; ask for new ones"}, 403)
        run_id, name, relative = [*target.split("/", 2), "", ""][:3]
        try:
            path = backend.store.external_files(run_id, name)[relative]
        except (KeyError, UserError):
            raise NotFound(f"no file {target!r}") from None
        return FileResponse(path)

    @app.post(f"{api}/weights_info")
    async def weights_info(request: Request) -> dict[str, Any]:
        body = await _body(request, limit)
        try:
            path = json.loads(body)["tinker_path"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserError("weights_info takes {'tinker_path': 'tinker://...'}") from error
        record, _, _ = backend.store.resolve(str(path), user(request))
        lora = record.lora_rank > 0
        targets = set(record.lora_targets)
        return {
            "base_model": record.base_model,
            "optimizer_config": {"type": "adamw"},
            "is_lora": lora,
            "lora_rank": record.lora_rank or None,
            **{
                flag: (set(mods) <= targets) if lora else None
                for flag, mods in LORA_TARGETS.items()
            },
        }

    @app.get(f"{api}/checkpoints")
    async def user_checkpoints(
        request: Request, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        found = backend.store.all_checkpoints(user(request))
        return {
            "checkpoints": found[offset : offset + limit],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(found)},
        }

    # ------------------------------------------------------------------ sessions (REST)
    @app.get(f"{api}/sessions")
    async def list_sessions(request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        owner = user(request)
        ids = [k for k, s in reversed(list(backend.sessions.items())) if s.owner == owner]
        return {"sessions": ids[offset : offset + limit]}

    @app.get(f"{api}/sessions/{{session_id}}")
    async def get_session(session_id: str, request: Request) -> dict[str, Any]:
        session: Session | None = backend.sessions.get(session_id)
        if session is None or session.owner != user(request):
            raise NotFound(f"unknown session {session_id!r}")
        prefix = f"{session_id}:"
        return {
            "training_run_ids": [r for r in backend.store.runs if r.startswith(prefix)],
            "sampler_ids": [s for s in list(backend.samplers) if s.startswith(prefix)],
            "user_metadata": session.user_metadata,
        }

    # ------------------------------------------------------------------ anything else: 404
    @app.post(f"{api}/{{endpoint:path}}")
    async def unknown_endpoint(endpoint: str, request: Request) -> JSONResponse:
        """An endpoint this server does not have. A training request (a body with the model_id of
        a live model and a seq_id) still takes its seq_id slot, so the client is not wedged."""
        detail = f"this server has no endpoint /api/v1/{endpoint} (docs/server.md lists them)"
        try:
            data = json.loads(await _body(request, limit))
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("seq_id"), int):
            served = backend.models.get(str(data.get("model_id")))
            if served is not None and served.owner == user(request):
                served.sequencer.refuse(backend.futures, data["seq_id"], UserError(detail))
        return JSONResponse({"detail": detail}, status_code=404)

    return app
