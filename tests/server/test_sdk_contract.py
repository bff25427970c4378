"""The real tinker SDK against a live server: every call the SDK and the cookbook RL loop make.

Numbers are checked against the in-process engine built independently from the same seeds, so the
claim is "same engine behind HTTP", not just "the call returned".
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

tinker = pytest.importorskip("tinker")
from server_harness import TINY, LiveServer, start_server  # noqa: E402
from tinker import types  # noqa: E402

from cispo.client.service import TrainingClient  # noqa: E402
from cispo.engine.engine import Engine  # noqa: E402
from cispo.models import apply_lora, load_bundle  # noqa: E402
from cispo.server.runtime import LORA_TARGETS  # noqa: E402
from cispo.types import AdamParams, Datum, ModelInput  # noqa: E402

RANK, LORA_SEED = 4, 7
TEXTS = ["12+7=19", "3+4=7", "20+22=42"]
LOSSES: list[tuple[str, dict[str, float]]] = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {}),
    ("cispo", {}),
    ("dro", {"beta": 0.05}),
    ("gspo", {}),
]


def _in_process_engine() -> Engine:
    bundle = load_bundle("tiny", lora_rank=0, seed=0, overrides=TINY)
    torch.manual_seed(LORA_SEED)
    model = apply_lora(
        bundle.model,
        r=RANK,
        alpha=2 * RANK,
        target_modules=[m for mods in LORA_TARGETS.values() for m in mods],
    )
    tok = bundle.tokenizer
    return Engine(model, eos_token_id=tok.eos_token_id, pad_token_id=int(tok.pad_token_id))


def _rows(tokenizer: Any, loss: str) -> list[dict[str, Any]]:
    rows = []
    for k, text in enumerate(TEXTS):
        ids = tokenizer.encode(text)
        n = len(ids) - 1
        inputs: dict[str, list[float] | list[int]] = {"target_tokens": ids[1:]}
        if loss == "cross_entropy":
            inputs["weights"] = [1.0] * n
        else:
            inputs["logprobs"] = [-2.0 - 0.1 * i for i in range(n)]
            inputs["advantages"] = [1.0 if k % 2 == 0 else -0.5] * n
        rows.append({"tokens": ids[:-1], "inputs": inputs})
    return rows


def _sdk_datums(rows: list[dict[str, Any]]) -> list[types.Datum]:
    return [
        types.Datum(model_input=types.ModelInput.from_ints(r["tokens"]), loss_fn_inputs=r["inputs"])
        for r in rows
    ]


def _our_datums(rows: list[dict[str, Any]]) -> list[Datum]:
    return [
        Datum(model_input=ModelInput.from_ints(r["tokens"]), loss_fn_inputs=r["inputs"])
        for r in rows
    ]


@pytest.fixture(scope="module")
def training(service: Any) -> Any:
    return service.create_lora_training_client("tiny", rank=RANK, seed=LORA_SEED).result()


def test_get_tokenizer_resolves_to_a_local_directory(training: Any) -> None:
    tokenizer = training.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("12+7="), skip_special_tokens=True) == "12+7="
    info = training.get_info()
    assert info.is_lora and info.lora_rank == RANK and info.model_data.model_name == "tiny"


def test_forward_backward_with_each_loss_matches_the_in_process_engine(training: Any) -> None:
    """Loss and per-token logprobs to 1e-5 for every loss; then one optim_step over the gradients
    accumulated across all six calls gives the same weights as in process."""
    tokenizer = training.get_tokenizer()
    engine = _in_process_engine()
    for loss, config in LOSSES:
        rows = _rows(tokenizer, loss)
        got = training.forward_backward(_sdk_datums(rows), loss, config or None).result()
        want = engine.forward_backward(_our_datums(rows), loss, config or None)
        assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], abs=1e-5), loss
        for g, w in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
            assert g["logprobs"].tolist() == pytest.approx(w["logprobs"].data, abs=1e-5)
    adam = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
    metrics = training.optim_step(types.AdamParams(**adam)).result().metrics
    ours = engine.optim_step(AdamParams(**adam))
    assert metrics["optim/grad_norm"] == pytest.approx(ours["optim/grad_norm"], rel=1e-5)
    rows = _rows(tokenizer, "cross_entropy")
    after = training.forward(_sdk_datums(rows), "cross_entropy").result()
    ref = engine.forward_backward(_our_datums(rows), "cross_entropy", forward_only=True)
    for g, w in zip(after.loss_fn_outputs, ref.loss_fn_outputs, strict=True):
        assert g["logprobs"].tolist() == pytest.approx(w["logprobs"].data, abs=1e-5)


def test_sampled_logprobs_equal_trainer_logprobs(training: Any) -> None:
    """Sampler-vs-trainer KL ≈ 0: the per-token logprobs the sampler reports are what forward
    computes for the same tokens (stop string honoured or max_tokens reached)."""
    tokenizer = training.get_tokenizer()
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = tokenizer.encode("12+7=")
    params = types.SamplingParams(max_tokens=8, stop=["\n"], seed=3)
    result = sampler.sample(
        types.ModelInput.from_ints(prompt), num_samples=3, sampling_params=params
    ).result()
    assert len(result.sequences) == 3
    for seq in result.sequences:
        text = tokenizer.decode(seq.tokens)
        stopped = text.endswith("\n") or seq.tokens[-1] == tokenizer.eos_token_id
        assert (seq.stop_reason == "stop" and stopped) or len(seq.tokens) == 8
        full = prompt + list(seq.tokens)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
        )
        fwd = training.forward([datum], "cross_entropy").result()
        trainer = fwd.loss_fn_outputs[0]["logprobs"].tolist()[len(prompt) - 1 :]
        assert seq.logprobs == pytest.approx(trainer, abs=1e-4)


def test_stop_token_ends_a_sample(training: Any) -> None:
    tokenizer = training.get_tokenizer()
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("1+1="))
    free = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, stop=[], seed=1)).result()
    stop_id = free.sequences[0].tokens[1]
    got = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, stop=[stop_id], seed=1))
    seq = got.result().sequences[0]
    assert seq.tokens == free.sequences[0].tokens[: seq.tokens.index(stop_id) + 1]
    assert seq.stop_reason == "stop"


def test_compute_logprobs_equals_forward(training: Any) -> None:
    tokenizer = training.get_tokenizer()
    ids = tokenizer.encode("20+22=42")
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt_lp = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    fwd = training.forward(
        [
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:]},
            )
        ],
        "cross_entropy",
    ).result()
    assert prompt_lp[0] is None
    assert prompt_lp[1:] == pytest.approx(fwd.loss_fn_outputs[0]["logprobs"].tolist(), abs=1e-5)


def _forward_lp(training: Any, ids: list[int]) -> list[float]:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
    )
    return list(
        training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    )


def _ce_step(training: Any, ids: list[int]) -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]}
    )
    training.forward_backward([datum], "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()


def test_save_state_then_load_restores_weights_and_optimizer(training: Any) -> None:
    tokenizer = training.get_tokenizer()
    ids = tokenizer.encode("3+4=7")
    path = training.save_state("contract-a").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/contract-a")
    saved = _forward_lp(training, ids)
    _ce_step(training, ids)
    next_after_saved = _forward_lp(training, ids)
    assert next_after_saved != pytest.approx(saved, abs=1e-4)
    training.load_state_with_optimizer(path).result()
    assert _forward_lp(training, ids) == pytest.approx(saved, abs=1e-6)
    _ce_step(training, ids)  # same Adam moments => the same step as before
    assert _forward_lp(training, ids) == pytest.approx(next_after_saved, abs=1e-6)


def test_sampler_from_a_saved_path(service: Any, training: Any) -> None:
    tokenizer = training.get_tokenizer()
    ids = tokenizer.encode("12+7=19")
    path = training.save_weights_for_sampler("contract-s").result().path
    assert "/sampler_weights/" in path
    sampler = service.create_sampling_client(model_path=path).result()
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert lp[1:] == pytest.approx(_forward_lp(training, ids), abs=1e-5)


def test_a_server_checkpoint_is_a_cispo_checkpoint_the_in_process_client_loads(
    live: LiveServer, training: Any, tmp_path: Any
) -> None:
    """One checkpoint format: `tinker://run/weights/name` is a `cispo.checkpoint` directory that
    `TrainingClient.load_state` restores, weights and Adam moments included."""
    ids = training.get_tokenizer().encode("5+6=11")
    path = training.save_state("interop").result().path
    run_id, kind, name = path[len("tinker://") :].split("/")
    directory = live.root / "runs" / run_id.replace(":", "_") / kind / name
    assert sorted(p.name for p in directory.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    ]
    saved = _forward_lp(training, ids)
    _ce_step(training, ids)
    stepped = _forward_lp(training, ids)
    training.load_state_with_optimizer(path).result()  # the server model back to `saved`

    engine = _in_process_engine()
    bundle = load_bundle("tiny", lora_rank=0, seed=0, overrides=TINY)
    client = TrainingClient(engine, bundle, tmp_path)
    client.load_state(str(directory)).result()
    datum = Datum(
        model_input=ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:]},  # type: ignore[dict-item]  # lists convert
    )
    lp = client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert lp == pytest.approx(saved, abs=1e-5)
    client.forward_backward([datum], "cross_entropy")
    client.optim_step(AdamParams(learning_rate=5e-2)).result()
    lp = client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert lp == pytest.approx(stepped, abs=1e-5)  # the same Adam moments came along
    client.close()


def test_a_server_sampler_checkpoint_has_no_optimizer_to_load(
    live: LiveServer, training: Any, tmp_path: Any
) -> None:
    path = training.save_weights_for_sampler("interop-s").result().path
    run_id, kind, name = path[len("tinker://") :].split("/")
    directory = live.root / "runs" / run_id.replace(":", "_") / kind / name
    bundle = load_bundle("tiny", lora_rank=0, seed=0, overrides=TINY)
    client = TrainingClient(_in_process_engine(), bundle, tmp_path)
    with pytest.raises(ValueError, match="no optimizer state"):
        client.load_state(str(directory)).result()
    client.load_state(str(directory), optimizer=False).result()
    client.close()


def test_training_runs_are_listed(service: Any, training: Any) -> None:
    rest = service.create_rest_client()
    run = rest.get_training_run(training.model_id).result()
    assert run.base_model == "tiny" and run.is_lora and run.lora_rank == RANK
    listed = rest.list_training_runs().result()
    assert training.model_id in [r.training_run_id for r in listed.training_runs]


def test_restart_from_checkpoint_gives_identical_logprobs(tmp_path: Any) -> None:
    """save_state -> stop the server -> new server on the same root -> load -> same logprobs, and
    the optimizer state came back too (the next step matches the step without a restart)."""
    first = start_server(tmp_path)
    try:
        svc = tinker.ServiceClient(base_url=first.base_url)
        tc = svc.create_lora_training_client("tiny", rank=RANK, seed=LORA_SEED).result()
        ids = tc.get_tokenizer().encode("7+8=15")
        _ce_step(tc, ids)
        path = tc.save_state("restart").result().path
        saved = _forward_lp(tc, ids)
        _ce_step(tc, ids)
        continued = _forward_lp(tc, ids)
        svc.close("success").result()
    finally:
        first.stop()
    second: LiveServer = start_server(tmp_path)
    try:
        svc = tinker.ServiceClient(base_url=second.base_url)
        tc = svc.create_training_client_from_state_with_optimizer(path).result()
        assert _forward_lp(tc, ids) == pytest.approx(saved, abs=1e-6)
        _ce_step(tc, ids)
        assert _forward_lp(tc, ids) == pytest.approx(continued, abs=1e-6)
        svc.close("success").result()
    finally:
        second.stop()


def test_topk_prompt_and_sample_logprobs_equal_a_full_softmax_reference(
    live: LiveServer, training: Any
) -> None:
    """topk_prompt_logprobs (one row per prompt token, row 0 empty; temperature 1 like the prompt
    logprobs) and topk_sample_logprobs (one row per sampled token, at the sampling temperature,
    like the sampled logprobs): ids equal and logprobs to 1e-5 against log_softmax(logits).topk of
    the sampler's own model; the reported token logprobs appear in them where the token is in
    the top k."""
    tokenizer = training.get_tokenizer()
    ids = tokenizer.encode("12+7=")
    sampler = training.save_weights_and_get_sampling_client().result()
    model = list(live.backend.samplers.values())[-1].sampler.model
    params = types.SamplingParams(max_tokens=4, temperature=0.7, seed=5, stop=[])
    got = sampler.sample(
        types.ModelInput.from_ints(ids),
        2,
        params,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=5,
        topk_sample_logprobs=3,
    ).result()

    def reference(tokens: list[int], temperature: float, k: int) -> list[list[tuple[int, float]]]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
        lp, tok = torch.log_softmax(logits / temperature, -1).topk(k, -1)
        return [
            list(zip(t.tolist(), v.tolist(), strict=True)) for t, v in zip(tok, lp, strict=True)
        ]

    def same(rows: Any, want: list[list[tuple[int, float]]]) -> None:
        assert len(rows) == len(want)
        for row, ref in zip(rows, want, strict=True):
            assert [t for t, _ in row] == [t for t, _ in ref]
            assert [v for _, v in row] == pytest.approx([v for _, v in ref], abs=1e-5)

    prompt_rows = got.topk_prompt_logprobs
    assert prompt_rows[0] is None and len(prompt_rows) == len(ids)
    same(prompt_rows[1:], reference(ids, 1.0, 5))
    for position, row in enumerate(prompt_rows[1:], start=1):
        found = dict(row).get(ids[position])
        assert found is None or found == pytest.approx(got.prompt_logprobs[position], abs=1e-5)
    for seq in got.sequences:
        assert len(seq.tokens) == 4
        full = ids + list(seq.tokens)
        same(seq.topk_logprobs, reference(full, 0.7, 3)[len(ids) - 1 :])
        for token, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs, strict=True):
            found = dict(row).get(token)
            assert found is None or found == pytest.approx(lp, abs=1e-5)


def test_forward_backward_custom_equals_the_built_in_loss(service: Any) -> None:
    """The SDK's client-side custom losses (DPO, sdft's reverse KL in tinker-cookbook): a custom
    loss equal to cross_entropy gives the same step as cross_entropy on an identical model."""
    custom = service.create_lora_training_client("tiny", rank=2, seed=11).result()
    builtin = service.create_lora_training_client("tiny", rank=2, seed=11).result()
    ids = custom.get_tokenizer().encode("12+7=19")
    weights = [1.0 + 0.1 * i for i in range(len(ids) - 1)]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
    )

    def nll(data: list[Any], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
            for d, lp in zip(data, logprobs, strict=True)
        )
        return total, {"nll": float(total.detach())}

    before = _forward_lp(custom, ids)
    out = custom.forward_backward_custom([datum], nll).result()
    ref = builtin.forward_backward([datum], "cross_entropy").result()
    assert out.metrics["nll"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5)
    for client in (custom, builtin):
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    after = _forward_lp(custom, ids)
    assert after != pytest.approx(before, abs=1e-4)  # it trained
    assert after == pytest.approx(_forward_lp(builtin, ids), abs=1e-6)


def test_soft_target_cross_entropy_from_teacher_topk_as_the_cookbook_distills(
    live: LiveServer, service: Any
) -> None:
    """tinker-cookbook's distillation.train_off_policy: the teacher's topk_prompt_logprobs become
    target_tokens and weights of shape [T, K] for cross_entropy. The loss is
    -Σ_t Σ_k w[t,k]·log p(tok[t,k]) and the returned logprobs are [T, K], both equal to a full
    log_softmax of the student's logits; the step trains the student."""
    student = service.create_lora_training_client("tiny", rank=2, seed=21).result()
    teacher = service.create_lora_training_client("tiny", rank=2, seed=22).result()
    ids = student.get_tokenizer().encode("12+7=19")
    k = 3
    sampler = teacher.save_weights_and_get_sampling_client().result()
    top = (
        sampler.sample(
            types.ModelInput.from_ints(ids),
            1,
            types.SamplingParams(max_tokens=1),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=k,
        )
        .result()
        .topk_prompt_logprobs[1:]
    )
    tokens = torch.tensor([[t for t, _ in row] for row in top])  # [T, K]
    weights = torch.softmax(torch.tensor([[v for _, v in row] for row in top]), dim=-1)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch(tokens),
            "weights": types.TensorData.from_torch(weights),
        },
    )
    model = live.backend.models[student.model_id].engine.model
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    want_lp = torch.log_softmax(logits, -1).gather(1, tokens)  # [T, K]
    out = student.forward_backward([datum], "cross_entropy").result()
    got_lp = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert tuple(got_lp.shape) == tuple(tokens.shape)
    torch.testing.assert_close(got_lp.float(), want_lp, rtol=0, atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(float(-(weights * want_lp).sum()), abs=1e-4)
    before = _forward_lp(student, ids)
    student.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    assert _forward_lp(student, ids) != pytest.approx(before, abs=1e-4)
