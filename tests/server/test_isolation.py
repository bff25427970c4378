"""Users of one server are isolated: two API keys (a keys file), the real tinker SDK for both.

Every operation of the second key ("intruder") on the first key's ("alice") sessions, models,
sampling sessions, futures and checkpoints gets exactly what the same operation on an id that
never existed gets (404, the same message but for the id), and changes nothing: alice's weights,
optimizer state, sampler RNG and checkpoint files stay bitwise equal, and alice's next requests run
in order and return her own results.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

tinker = pytest.importorskip("tinker")
from server_harness import API_KEY, LiveServer, assert_same, start_server, wait_future  # noqa: E402
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402

INTRUDER_KEY = "tml-cispo-intruder"
PROBE = [1, 20, 30, 40, 50, 60]
PROTO = {"Content-Type": "application/x-protobuf"}


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _fwdbwd_body(model_id: str, seq_id: int, datums: list[types.Datum]) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=datums, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq_id,
    )
    return bytes(forward_backward_request_to_proto(request).SerializeToString())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("server")
    keys = root.parent / f"{root.name}-keys.txt"
    keys.write_text(f"# two users\n{INTRUDER_KEY} intruder\n")
    server = start_server(root, keys_file=keys)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alice(live: LiveServer) -> Iterator[Any]:
    client = tinker.ServiceClient(base_url=live.base_url, api_key=API_KEY)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def intruder(live: LiveServer) -> Iterator[Any]:
    client = tinker.ServiceClient(base_url=live.base_url, api_key=INTRUDER_KEY)
    yield client
    client.close("success").result()


def _http(live: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{live.base_url}/api/v1", headers={"X-API-Key": key}, timeout=30)


def _tree_digest(directory: Path) -> dict[str, str]:
    return {
        f.relative_to(directory).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def _engine_state(live: LiveServer, model_id: str) -> dict[str, Any]:
    engine = live.backend.models[model_id].engine
    return {
        "model": {k: v.clone() for k, v in engine.model.state_dict().items()},
        "optimizer": engine.state()["optimizer"],
        "generator": engine.sample_generator.get_state(),
        "version": engine.version,
    }


def _fake(real: str) -> str:
    """An id of the same form as `real` that no one created (hex digits changed)."""
    return re.sub(r"[0-9a-f]{16,}", lambda m: "0" * len(m.group()), real)


def test_a_second_key_gets_404_for_everything_of_the_first_and_changes_nothing(
    live: LiveServer, alice: Any, intruder: Any
) -> None:
    # ---- alice trains, checkpoints, samples (through the SDK)
    training = alice.create_lora_training_client("tiny", rank=2, seed=1).result()
    model_id = training.model_id
    fb = training.forward_backward([_datum(PROBE)], "cross_entropy").result()
    assert fb.metrics["loss:sum"] > 0
    before_step = {
        k: v.clone() for k, v in live.backend.models[model_id].engine.state()["model"].items()
    }
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    moved = live.backend.models[model_id].engine.state()["model"]
    assert any(not torch.equal(before_step[k], moved[k]) for k in moved), "training moved nothing"
    state_path = training.save_state("a1").result().path
    sampler_path = training.save_weights_for_sampler("s1").result().path
    external_path = training.save_weights_external("x1").result().path
    sampling = training.save_weights_and_get_sampling_client().result()
    sampler_id = sampling._sampling_session_id
    assert (
        sampling.sample(
            types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=3, seed=0)
        )
        .result()
        .sequences
    )
    session_id = live.backend.models[model_id].session_id
    run_dir = live.root / "runs" / model_id.replace(":", "_")

    http_a, http_b = _http(live, API_KEY), _http(live, INTRUDER_KEY)
    # A future of alice's: a sample request (it takes no seq_id of her model).
    r = http_a.post(
        "/asample",
        json={
            "sampling_session_id": sampler_id,
            "seq_id": 0,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2, "seed": 0},
        },
    )
    assert r.status_code == 200, r.text
    alice_rid = r.json()["request_id"]
    assert re.fullmatch(r"req-[0-9a-f]{32}", alice_rid), alice_rid  # not req-N

    files = _tree_digest(run_dir)
    state = _engine_state(live, model_id)
    n_samplers = len(live.backend.samplers)

    # ---- the intruder, by raw HTTP: each answer must be the one for an id that never existed
    def same_as_unknown(real: str, call: Callable[[str], httpx.Response], what: str) -> None:
        fake = _fake(real)
        assert fake != real, real
        got, unknown = call(real), call(fake)
        assert got.status_code in (404, 410), f"{what}: {got.status_code} {got.text}"
        assert got.status_code == unknown.status_code, what
        hexes = re.compile(r"[0-9a-f]{16,}")  # ids inside other ids (the run of a path)
        assert hexes.sub("<hex>", got.text) == hexes.sub("<hex>", unknown.text), what
        assert got.text.count(real) == unknown.text.count(fake), what
        for word in ("seq_id", "expected", "owner", "another"):  # nothing about the real thing
            assert word not in got.text, f"{what}: {got.text}"

    next_seq = live.backend.models[model_id].sequencer.next_seq_id
    adam = {"learning_rate": 1.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12}
    sample = {
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "sampling_params": {"max_tokens": 2},
    }
    post = http_b.post
    checks: list[tuple[str, Callable[[str], httpx.Response], str]] = [
        (model_id, lambda m: post("/get_info", json={"model_id": m}), "get_info"),
        (
            model_id,
            lambda m: post(
                "/forward_backward",
                content=_fwdbwd_body(m, next_seq, [_datum([5, 6, 7])] * 3),
                headers=PROTO,
            ),
            "forward_backward at alice's next seq_id",
        ),
        (
            model_id,
            lambda m: post("/optim_step", json={"model_id": m, "seq_id": 1, "adam_params": adam}),
            "optim_step with a consumed seq_id",
        ),
        (
            model_id,
            lambda m: post(
                "/optim_step", json={"model_id": m, "seq_id": next_seq, "adam_params": adam}
            ),
            "optim_step",
        ),
        (
            model_id,
            lambda m: post("/save_weights", json={"model_id": m, "seq_id": next_seq, "path": "a1"}),
            "save_weights over alice's named checkpoint",
        ),
        (
            model_id,
            lambda m: post(
                "/save_weights_for_sampler",
                json={"model_id": m, "seq_id": next_seq, "path": "s1"},
            ),
            "save_weights_for_sampler",
        ),
        (
            model_id,
            lambda m: post(
                "/save_weights_external", json={"model_id": m, "seq_id": next_seq, "path": "x1"}
            ),
            "save_weights_external",
        ),
        (
            model_id,
            lambda m: post(
                "/load_weights",
                json={"model_id": m, "seq_id": next_seq, "path": state_path, "optimizer": True},
            ),
            "load_weights into alice's model",
        ),
        (
            sampler_id,
            lambda s: post("/asample", json={**sample, "sampling_session_id": s}),
            "asample",
        ),
        (sampler_id, lambda s: http_b.get(f"/samplers/{s}"), "get_sampler"),
        (alice_rid, lambda r: post("/retrieve_future", json={"request_id": r}), "retrieve"),
        (
            session_id,
            lambda s: post(
                "/create_model",
                json={"session_id": s, "model_seq_id": 99, "base_model": "tiny"},
            ),
            "create_model in alice's session",
        ),
        (
            session_id,
            lambda s: post(
                "/create_sampling_session",
                json={"session_id": s, "sampling_session_seq_id": 99, "base_model": "tiny"},
            ),
            "create_sampling_session in alice's session",
        ),
        (session_id, lambda s: post("/session_heartbeat", json={"session_id": s}), "heartbeat"),
        (session_id, lambda s: http_b.get(f"/sessions/{s}"), "get_session"),
        (session_id, lambda s: post(f"/sessions/{s}/finish", json={}), "finish alice's session"),
        (model_id, lambda m: http_b.get(f"/training_runs/{m}"), "get_training_run"),
        (model_id, lambda m: http_b.get(f"/training_runs/{m}/checkpoints"), "list_checkpoints"),
        (
            model_id,
            lambda m: http_b.delete(f"/training_runs/{m}/checkpoints/weights/a1"),
            "delete_checkpoint",
        ),
        (
            model_id,
            lambda m: http_b.put(
                f"/training_runs/{m}/checkpoints/weights/a1/ttl", json={"ttl_seconds": 3600}
            ),
            "set ttl",
        ),
        (
            model_id,
            lambda m: http_b.get(
                f"/training_runs/{m}/checkpoints/external_weights/x1/external_weights_urls"
            ),
            "external weights URLs",
        ),
        (
            state_path,
            lambda p: post("/weights_info", json={"tinker_path": p}),
            "weights_info",
        ),
    ]
    for real, call, what in checks:
        same_as_unknown(real, call, what)

    # ---- the intruder through the SDK
    rest = intruder.create_rest_client()
    assert rest.list_training_runs().result().training_runs == []
    assert rest.list_user_checkpoints().result().checkpoints == []
    assert session_id not in rest.list_sessions().result().sessions
    for path in (state_path, sampler_path, external_path):
        with pytest.raises(tinker.NotFoundError):
            rest.delete_checkpoint_from_tinker_path(path).result()
    for path in (state_path, sampler_path):  # external_weights have no weights_info
        with pytest.raises(tinker.NotFoundError):
            rest.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_external_weights_urls(external_path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.set_checkpoint_ttl_from_tinker_path(state_path, 3600).result()
    with pytest.raises(tinker.NotFoundError):
        intruder.create_training_client_from_state(state_path).result()
    with pytest.raises(tinker.NotFoundError):
        intruder.create_sampling_client(model_path=sampler_path).result().sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)
        ).result()
    own = intruder.create_lora_training_client("tiny", rank=2, seed=1).result()
    with pytest.raises(tinker.NotFoundError):
        own.load_state(state_path).result()
    # The intruder's own checkpoint of the same name is its own: alice's is not overwritten.
    assert own.save_state("a1").result().path != state_path

    # ---- nothing of alice's changed, and alice carries on with her own results
    assert_same(_engine_state(live, model_id), state)
    assert _tree_digest(run_dir) == files
    assert len(live.backend.samplers) >= n_samplers and sampler_id in live.backend.samplers
    assert not live.backend.sessions[session_id].finished
    listed = {
        c.tinker_path
        for c in alice.create_rest_client().list_user_checkpoints().result().checkpoints
    }
    assert {state_path, sampler_path, external_path} <= listed
    # alice still reads her own future
    assert isinstance(wait_future(http_a, alice_rid, raw=True), bytes)
    # Her next forward_backward (the seq_id the intruder tried) returns her one datum's result,
    # not the intruder's three; equal to a forward on the unchanged weights.
    want = training.forward([_datum(PROBE)], "cross_entropy").result()
    got = training.forward_backward([_datum(PROBE)], "cross_entropy").result()
    assert len(got.loss_fn_outputs) == 1
    assert torch.equal(
        got.loss_fn_outputs[0]["logprobs"].to_torch(),
        want.loss_fn_outputs[0]["logprobs"].to_torch(),
    )
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    assert (
        sampling.sample(
            types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=3, seed=0)
        )
        .result()
        .sequences
    )
    http_a.close()
    http_b.close()


def test_an_unknown_key_gets_401_and_each_known_key_its_own_listing(live: LiveServer) -> None:
    with _http(live, "tml-not-a-key") as http:
        assert http.get("/training_runs").status_code == 401
    with _http(live, API_KEY) as a, _http(live, INTRUDER_KEY) as b:
        sa = a.post(
            "/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "t"}
        ).json()["session_id"]
        sb = b.post(
            "/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "t"}
        ).json()["session_id"]
        listed_a, listed_b = (
            a.get("/sessions").json()["sessions"],
            b.get("/sessions").json()["sessions"],
        )
        assert sa in listed_a and sb not in listed_a and sb in listed_b and sa not in listed_b


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "lists no key"),
        ("# only a comment\n", "lists no key"),
        ("tml-a alice\ntml-a bob\n", "line 2: this key is listed twice"),
        ("tml-a al/ice\n", "line 1: user name 'al/ice' must match"),
        ("tml-a alice extra\n", "line 1: expected '<key> [<user>]', got 3 fields"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    from cispo.server.runtime import ServerConfig

    keys = tmp_path / "keys.txt"
    keys.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig(root=tmp_path, keys_file=keys)


def test_keys_file_users_and_the_single_api_key_coexist(tmp_path: Path) -> None:
    from cispo.server.runtime import ServerConfig

    keys = tmp_path / "keys.txt"
    keys.write_text("tml-a alice\n\ntml-b\ntml-c alice\n")
    users = ServerConfig(root=tmp_path, api_key="tml-x", keys_file=keys).users()
    anonymous = f"key-{hashlib.sha256(b'tml-b').hexdigest()[:12]}"
    assert users == {"tml-x": "default", "tml-a": "alice", "tml-b": anonymous, "tml-c": "alice"}
    with pytest.raises(ValueError, match="also listed in keys_file"):
        ServerConfig(root=tmp_path, api_key="tml-a", keys_file=keys)
    with pytest.raises(ValueError, match="give api_key"):
        ServerConfig(root=tmp_path)
