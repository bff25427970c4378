"""FastAPI app speaking the wire protocol of the `tinker` Python SDK (pinned range: docs/server.md).

Request bodies are validated with the SDK's own pydantic request types (`tinker.types.*Request`),
so a field the SDK sends is read exactly as the SDK means it, and an unknown field is a 400.
Every request needs `X-API-Key` (401 otherwise); bodies over `max_request_bytes` get 413.
Mutating calls answer `{"request_id"}` at once and run on the model's ordered worker; the result is
fetched with `retrieve_future` (see `futures.py`). Left out: JWT auth, custom losses, images,
top-k logprobs, stability info (stable_reinforce), `retrieve_futures` batching, weights export.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from tinker import types as tt

from cispo.client.types import AdamParams
from cispo.rollout.sampler import SamplingParams
from cispo.server.futures import Result, UserError
from cispo.server.runtime import Backend, NotFound, ServedModel, ServerConfig, _SampleJob
from cispo.server.wire import ForwardBackwardCall, WireError, decode_forward_backward

PROTO = "application/x-protobuf"
M = TypeVar("M", bound=pydantic.BaseModel)
Scope = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


class TooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: API key check (401) and a Content-Length cap (413), before any routing."""

    def __init__(self, app: ASGIApp, api_key: str, max_bytes: int) -> None:
        self.app, self.key, self.max_bytes = app, api_key.encode(), max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if not hmac.compare_digest(headers.get(b"x-api-key", b""), self.key):
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

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        yield
        backend.close()

    app = FastAPI(
        title="cispo server (compatible with the tinker SDK)",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.backend = backend
    app.add_middleware(_Guard, api_key=config.api_key, max_bytes=limit)

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

    def decode_request(body: bytes, zstd: bool) -> ForwardBackwardCall:
        if zstd:
            import zstandard

            try:
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
            except zstandard.ZstdError as error:
                raise WireError(f"bad zstd body: {error}") from error
        return decode_forward_backward(body, max_tensor_values=config.max_tensor_values)

    async def body_of(request: Request, cls: type[M]) -> M:
        return _parse(cls, await _body(request, limit))

    def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"request_id": request_id, "model_id": model_id, **extra}

    def ordered(served: ServedModel, seq_id: int | None, work: Callable[[], Result]) -> str:
        if seq_id is None:
            raise UserError("seq_id is required for requests on a training model")
        return served.sequencer.submit(backend.futures, seq_id, work)

    def on_control(work: Callable[[], Result]) -> str:
        request_id = backend.futures.create()
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
                {"model_name": name, "trainable": True, "sampleable": True}
                for name in config.base_models
            ]
        }

    @app.post(f"{api}/telemetry")
    async def telemetry() -> dict[str, str]:
        return {"status": "accepted"}

    @app.post(f"{api}/create_session")
    async def create_session(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.CreateSessionRequest)
        session_id = backend.create_session(list(req.tags), req.user_metadata)
        return {"type": "create_session", "session_id": session_id}

    @app.post(f"{api}/session_heartbeat")
    async def heartbeat(request: Request) -> Response:
        req = await body_of(request, tt.SessionHeartbeatRequest)
        session = backend.sessions.get(req.session_id)
        if session is None or session.finished:
            return JSONResponse({"detail": "session finished or unknown"}, status_code=410)
        return JSONResponse({"type": "session_heartbeat"})

    @app.post(f"{api}/sessions/{{session_id}}/finish")
    async def finish(session_id: str, request: Request) -> dict[str, Any]:
        await _body(request, limit)
        backend.finish_session(session_id)
        return {}

    # ------------------------------------------------------------------ models
    @app.post(f"{api}/create_model")
    async def create_model(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.CreateModelRequest)
        if getattr(req.optimizer_config, "type", "adamw") != "adamw":
            raise UserError("only the adamw optimizer is supported")
        model_id = backend.reserve_model_id(req.session_id, req.model_seq_id)
        try:
            lora = req.lora_config.model_dump() if req.lora_config is not None else None
            record = backend.new_record(model_id, req.base_model, lora, req.user_metadata)
        except Exception:
            backend._reserved.discard(model_id)
            raise

        def work() -> Result:
            try:
                backend.create_model(record)
            finally:  # a build that fails must not keep model_seq_id reserved
                backend._reserved.discard(model_id)
            return {"model_id": model_id, "type": "create_model"}

        return future(on_control(work), model_id)

    @app.post(f"{api}/get_info")
    async def get_info(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.GetInfoRequest)
        return backend.get_info(req.model_id)

    @app.post(f"{api}/forward_backward")
    async def forward_backward(request: Request) -> dict[str, Any]:
        if PROTO not in request.headers.get("content-type", ""):
            raise UserError(f"forward_backward takes a protobuf body (Content-Type: {PROTO})")
        body = await _body(request, limit)
        zstd = request.headers.get("content-encoding", "") == "zstd"
        # Decoding and validation are CPU-bound (up to the body limit): off the event loop, so
        # one large or hostile request does not stall every other client.
        call = await asyncio.to_thread(decode_request, body, zstd)
        served = backend.model(call.model_id)
        await asyncio.to_thread(backend.check_forward_backward, served, call)
        rid = ordered(served, call.seq_id, lambda: backend.run_forward_backward(served, call))
        return future(rid, served.model_id)

    @app.post(f"{api}/optim_step")
    async def optim_step(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.OptimStepRequest)
        served = backend.model(req.model_id)
        params = req.optim_params
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
        served = backend.model(req.model_id)
        name = req.path or f"step-{served.engine.version}"
        rid = ordered(
            served, req.seq_id, lambda: backend.run_save(served, "weights", name, req.overwrite)
        )
        return future(rid, served.model_id)

    @app.post(f"{api}/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.SaveWeightsForSamplerRequest)
        served = backend.model(req.model_id)
        work: Callable[[], Result]
        if req.path is not None:
            name = req.path
            work = lambda: backend.run_save(served, "sampler_weights", name, True)  # noqa: E731
        elif req.sampling_session_seq_id is not None:
            seq = req.sampling_session_seq_id
            work = lambda: backend.run_ephemeral_sampler(served, seq)  # noqa: E731
        else:
            raise UserError("save_weights_for_sampler needs path or sampling_session_seq_id")
        return future(ordered(served, req.seq_id, work), served.model_id)

    @app.post(f"{api}/load_weights")
    async def load_weights(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.LoadWeightsRequest)
        backend.store.resolve(req.path)  # 400 now for an unknown path
        if req.model_id is not None:
            served = backend.model(req.model_id)
            path, opt = req.path, req.optimizer
            rid = ordered(served, req.seq_id, lambda: backend.run_load(served, path, opt))
            return future(rid, served.model_id)
        if req.session_id is None or req.model_seq_id is None:
            raise UserError("load_weights needs model_id, or session_id and model_seq_id")
        source, _, _ = backend.store.resolve(req.path)
        if req.base_model is not None and req.base_model != source.base_model:
            raise UserError(
                f"{req.path!r} was trained on {source.base_model!r}, not {req.base_model!r}"
            )
        model_id = backend.reserve_model_id(req.session_id, req.model_seq_id)
        path, opt, meta = req.path, req.optimizer, req.user_metadata

        def work() -> Result:
            try:
                record, state = backend.store.load(path)
                new = backend.new_record(
                    model_id,
                    record.base_model,
                    {"rank": record.lora_rank, "seed": record.seed} if record.lora_rank else None,
                    meta if meta is not None else record.user_metadata,
                )
                new.lora_targets, new.model_overrides = record.lora_targets, record.model_overrides
                backend.create_model(new, state, optimizer=opt)
            finally:
                backend._reserved.discard(model_id)
            return {"model_id": model_id, "path": path, "type": "load_weights"}

        return future(on_control(work), model_id)

    # ------------------------------------------------------------------ sampling
    @app.post(f"{api}/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.CreateSamplingSessionRequest)
        session = backend.sessions.get(req.session_id)
        if session is None or session.finished:
            raise NotFound(f"unknown or finished session {req.session_id!r}")
        if req.model_path is not None:
            backend.store.resolve(req.model_path)
        elif req.base_model is not None:
            backend.check_base_model(req.base_model)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            backend._control,
            lambda: backend.create_sampler(sampler_id, req.base_model, req.model_path),
        )

    @app.get(f"{api}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str) -> dict[str, Any]:
        s = backend.sampler(sampler_id)
        return {"sampler_id": s.sampler_id, "base_model": s.base_model, "model_path": s.model_path}

    @app.post(f"{api}/asample")
    async def asample(request: Request) -> dict[str, Any]:
        req = await body_of(request, tt.SampleRequest)
        if req.sampling_session_id is None:
            raise UserError("asample needs a sampling_session_id (create_sampling_session first)")
        sampler = backend.sampler(req.sampling_session_id)
        unsupported = [
            name
            for name, on in (
                ("topk_prompt_logprobs", req.topk_prompt_logprobs),
                ("topk_sample_logprobs", req.topk_sample_logprobs),
                ("target_prompt_logprobs", req.target_prompt_logprobs is not None),
                ("prompt_alt_tokens_k", req.prompt_alt_tokens_k),
                ("record_stability_info", req.record_stability_info),
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
        last_n = req.prompt_logprobs_last_n
        if last_n is not None and not 1 <= last_n <= len(prompt) - 1:
            raise UserError(f"prompt_logprobs_last_n must be in [1, {len(prompt) - 1}]")
        request_id = backend.futures.create()
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
            )
        )
        ids = [f"{request_id}:{i}" for i in range(req.num_samples)]
        return future(request_id, None, sample_sequence_ids=ids)

    # ------------------------------------------------------------------ futures
    @app.post(f"{api}/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        req = await body_of(request, tt.FutureRetrieveRequest)
        if req.request_id not in backend.futures:
            raise NotFound(f"unknown request_id {req.request_id!r}")
        result = await backend.futures.wait(req.request_id)
        return _result_response(req.request_id, result)

    # ------------------------------------------------------------------ training runs (REST)
    @app.get(f"{api}/training_runs")
    async def training_runs(limit: int = 20, offset: int = 0) -> dict[str, Any]:
        runs = sorted(backend.store.runs.values(), key=lambda r: r.created, reverse=True)
        page = runs[offset : offset + limit]
        return {
            "training_runs": [backend.store.training_run_json(r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }

    def run_record(run_id: str) -> Any:
        record = backend.store.runs.get(run_id)
        if record is None:
            raise NotFound(f"unknown training run {run_id!r}")
        return record

    @app.get(f"{api}/training_runs/{{run_id}}")
    async def training_run(run_id: str) -> dict[str, Any]:
        return backend.store.training_run_json(run_record(run_id))

    @app.get(f"{api}/training_runs/{{run_id}}/checkpoints")
    async def checkpoints(run_id: str) -> dict[str, Any]:
        return {"checkpoints": list(run_record(run_id).checkpoints)}

    return app
