"""Packed rows (each group's prefix once, block mask, restarted positions) give the padded path's
logprobs, entropies and parameter gradients on tiny Llama/Qwen2 models."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from cispo.models import apply_lora, build_tiny_model, tiny_model_config
from cispo.ops import model_token_logprobs
from cispo.ops.packed_logprobs import (
    attention_mask_for,
    common_prefix_length,
    pack_rows,
    packed_token_logprobs,
)

TOL = 1e-5
VOCAB = 61
TEMPERATURE = 0.8
PROMPT_A = [1, 17, 23, 5, 9, 41, 7]
PROMPT_B = [1, 30, 12]


def _model(
    family: str = "llama", *, tie: bool = True, lora: bool = False, attention: str = "sdpa"
) -> nn.Module:
    config = tiny_model_config(VOCAB, hidden=32, heads=4, kv_heads=2, family=family)
    config.tie_word_embeddings = tie
    config.initializer_range = 0.1  # logits with std ~1: differences are visible
    config._attn_implementation = attention
    model: nn.Module = build_tiny_model(config, seed=0)
    if lora:
        model = apply_lora(model, r=4, alpha=8)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # B starts at 0; give it values so every LoRA tensor gets a grad
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.train(True)
    return model


def _groups() -> list[list[list[int]]]:
    """Two groups: G = 3 completions of different lengths on PROMPT_A (two start alike, so the
    common prefix reaches into the completions), and a group of one on PROMPT_B."""
    return [
        [[*PROMPT_A, 3, 4, 8, 2], [*PROMPT_A, 3, 4], [*PROMPT_A, 50, 2, 2, 9, 9, 11]],
        [[*PROMPT_B, 6, 6, 6]],
    ]


def _batch(
    groups: list[list[list[int]]], seed: int = 0
) -> tuple[Tensor, list[int], Tensor, Tensor, list[int]]:
    """Right-padded input_ids [B, T], lengths, targets, loss mask (from each datum's last prompt
    position on), group sizes."""
    seqs = [s for g in groups for s in g]
    prompt_lens = [len(PROMPT_A) if s[:2] == PROMPT_A[:2] else len(PROMPT_B) for s in seqs]
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        loss_mask[b, prompt_lens[b] - 1 : len(s)] = True
    targets = torch.randint(0, VOCAB, (len(seqs), width), generator=gen)
    return input_ids, lengths, targets, loss_mask, [len(g) for g in groups]


def _run(
    model: nn.Module, packed: bool, *, fused: bool, **kw: object
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(logprobs [B, T], entropy [B, T], grads) of a loss that reads both, on one path."""
    input_ids, lengths, targets, loss_mask, sizes = _batch(_groups())
    model.zero_grad(set_to_none=True)
    common = {"temperature": TEMPERATURE, "fused": fused, "with_entropy": True}
    if packed:
        out = packed_token_logprobs(
            model, input_ids, lengths, targets, loss_mask, group_sizes=sizes, **common, **kw
        )
    else:
        attention_mask = torch.arange(input_ids.shape[1])[None] < torch.tensor(lengths)[:, None]
        out = model_token_logprobs(model, input_ids, attention_mask, targets, loss_mask, **common)
    assert out.entropy is not None
    gen = torch.Generator().manual_seed(5)
    g_lp, g_ent = (
        torch.randn(out.logprobs.shape, generator=gen),
        torch.randn(out.logprobs.shape, generator=gen),
    )
    ((out.logprobs * g_lp).sum() + (out.entropy * g_ent).sum()).backward()  # type: ignore[no-untyped-call]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logprobs.detach(), out.entropy.detach(), grads


def _assert_same_as_padded(model: nn.Module, *, fused: bool = False, **kw: object) -> None:
    lp_pad, ent_pad, g_pad = _run(model, False, fused=fused)
    lp, ent, g = _run(model, True, fused=fused, **kw)
    _, _, _, loss_mask, _ = _batch(_groups())
    assert bool((lp_pad[loss_mask] < -0.5).all())  # real logprobs, not zeros
    torch.testing.assert_close(lp, lp_pad, rtol=TOL, atol=TOL)
    torch.testing.assert_close(ent, ent_pad, rtol=TOL, atol=TOL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert g.keys() == g_pad.keys() == trainable
    for name, grad in g_pad.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(g[name], grad, rtol=TOL, atol=TOL, msg=name)


# ---------------------------------------------------------------- layout


def test_common_prefix_length_is_the_longest_shared_start() -> None:
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 6]]) == 2
    assert common_prefix_length([[1, 2], [3, 2]]) == 0


def test_pack_rows_runs_the_prefix_once_with_restarted_positions_and_a_block_mask() -> None:
    seqs = [[1, 2, 3, 4], [1, 2, 5], [7, 8]]
    packed = pack_rows(seqs, [2, 1], row_tokens=100)  # both groups in one row
    # Row: prefix [1, 2] | [3, 4] | [5] | group 2 [7, 8]  (7 tokens, not 4 + 3 + 2 = 9)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert packed.shared == [2, 2]
    assert packed.index.tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 0, 0]]
    allowed = packed.allowed()[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # second completion: the prefix and itself, not the first
        [0, 0, 0, 0, 0, 1, 0],  # the next group sees nothing of the first
        [0, 0, 0, 0, 0, 1, 1],
    ]


def test_pack_rows_one_group_per_row_pads_rows_that_attend_only_to_pads() -> None:
    packed = pack_rows([[1, 2, 3, 4], [1, 2, 5], [7]], [2, 1])
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 0, 0, 0, 0]]
    pad_rows = packed.allowed()[1, 0, 1:]  # queries at the pads
    assert pad_rows.any(dim=1).all() and not pad_rows[:, 0].any()


def test_pack_rows_without_sharing_is_padding_free_block_diagonal_packing() -> None:
    packed = pack_rows([[1, 2, 3], [1, 2], [4]], [2, 1], share_prefix=False, row_tokens=6)
    assert packed.input_ids.tolist() == [[1, 2, 3, 1, 2, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    blocks = packed.allowed()[0, 0].int()
    assert blocks[3:5, :3].sum() == 0 and blocks[5, :5].sum() == 0


def test_pack_rows_rejects_group_sizes_that_do_not_cover_the_sequences() -> None:
    with pytest.raises(ValueError, match="group_sizes=\\[2\\]"):
        pack_rows([[1], [2], [3]], [2])
    with pytest.raises(ValueError, match="row_tokens must be >= 1"):
        pack_rows([[1]], [1], row_tokens=0)


# ---------------------------------------------------------------- equality with the padded path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_prefix_logprobs_entropy_and_grads_equal_the_padded_path(
    family: str, tie: bool, lora: bool
) -> None:
    _assert_same_as_padded(_model(family, tie=tie, lora=lora))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefix_with_the_fused_logprob_kernel_equals_the_padded_fused_path(
    family: str,
) -> None:
    _assert_same_as_padded(_model(family, tie=False), fused=True, chunk_size=4)


def test_eager_attention_gets_an_additive_mask_and_equals_the_padded_path() -> None:
    model = _model("qwen2", attention="eager")
    assert model.config._attn_implementation == "eager"
    mask = attention_mask_for(model, torch.tensor([[[[True, False]]]]), torch.float32)
    assert mask.dtype == torch.float32 and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min
    _assert_same_as_padded(model)


def test_several_groups_in_one_row_equal_the_padded_path() -> None:
    _assert_same_as_padded(_model("llama"), row_tokens=10_000)


def test_padding_free_packing_without_sharing_equals_the_padded_path() -> None:
    _assert_same_as_padded(_model("qwen2", tie=False), share_prefix=False, row_tokens=10_000)


def test_a_group_of_one_is_its_whole_sequence_as_prefix() -> None:
    seqs = [[*PROMPT_B, 6, 6, 6]]
    packed = pack_rows(seqs, [1])
    assert packed.shared == [len(seqs[0])]
    assert packed.position_ids.tolist() == [list(range(len(seqs[0])))]


def test_the_shared_last_prompt_position_scores_each_first_completion_token() -> None:
    """The first completion token of every datum is predicted at the last prompt position, one
    packed position gathered G times with G different targets."""
    input_ids, lengths, targets, _loss_mask, sizes = _batch(_groups())
    packed = pack_rows([row[:n] for row, n in zip(input_ids.tolist(), lengths, strict=True)], sizes)
    last = len(PROMPT_A) - 1
    assert packed.index[:3, last].tolist() == [last] * 3
    assert len(set(targets[:3, last].tolist())) > 1  # differs across the group in this batch


def test_unsupported_attention_and_sliding_windows_are_refused() -> None:
    model = _model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="flash_attention_2"):
        attention_mask_for(model, torch.ones(1, 1, 2, 2, dtype=torch.bool), torch.float32)
    qwen = _model("qwen2")
    qwen.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        attention_mask_for(qwen, torch.ones(1, 1, 2, 2, dtype=torch.bool), torch.float32)


def test_lengths_and_loss_mask_past_a_sequence_are_refused_naming_the_values() -> None:
    model = _model("llama")
    input_ids, lengths, targets, loss_mask, sizes = _batch(_groups())
    with pytest.raises(ValueError, match="lengths=\\[3\\] must hold one length"):
        packed_token_logprobs(model, input_ids, [3], targets, loss_mask, group_sizes=sizes)
    short = [n - 1 for n in lengths]
    with pytest.raises(ValueError, match="loss_mask marks positions past"):
        packed_token_logprobs(model, input_ids, short, targets, loss_mask, group_sizes=sizes)
