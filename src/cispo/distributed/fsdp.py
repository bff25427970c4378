"""FSDP2 (`torch.distributed.fsdp.fully_shard`) of a transformers causal LM for the engine.

Layout: one FSDP unit per decoder layer, and a root unit that holds the rest (embeddings, final
norm, the LM head, tied or not). The root is not the causal LM itself but `TokenLogprobs`, a module
whose forward is "input ids -> per-token logprobs", padded (`cispo.ops.model_token_logprobs`) or
packed with shared prefixes (`cispo.ops.packed_logprobs`). Both call the decoder and read the head
weight directly, never the causal LM's own forward, so with the LM as root its pre-forward hook
(which all-gathers the root's parameters) never runs and the embedding sees a sharded DTensor
(`aten.embedding.default got mixed torch.Tensor and DTensor`). With `TokenLogprobs` as root the
hook runs around the whole path.

Gradients: FSDP2 reduce-scatters with an average over the ranks. The engine normalises each rank's
loss by the *global* token (or sequence) count and multiplies it by the world size, so the average
is Σ_ranks ∂(local sum)/∂θ / global count: the single-process gradient. (Setting the gradient
divide factor to 1 instead needs PREMUL_SUM or force-sum on every unit, which gloo does not offer.)

Mixed precision (CUDA only): parameters all-gathered and computed in bf16, gradients reduced in
fp32, the sharded fp32 parameters stay the optimizer's master weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from cispo.distributed.group import active, current_world_size
from cispo.ops.packed_logprobs import token_logprobs

__all__ = [
    "TokenLogprobs",
    "broadcast_from_rank0",
    "decoder_layers",
    "full_state_dict",
    "shard_model",
]


class TokenLogprobs(nn.Module):
    """`model_token_logprobs(model, ...)` (padded rows), or `packed_token_logprobs` when `groups`
    is given (each group's shared prefix once, padding-free: `EngineConfig.shared_prefix`), as a
    module, so that either path runs under the FSDP root's unshard/reshard hooks.

    forward returns (logprobs [B, T], entropy [B, T] | None), fp32 (a tuple, so FSDP's hooks see
    the output tensors).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        targets: Tensor,
        loss_mask: Tensor,
        *,
        temperature: float = 1.0,
        fused: bool | None = None,
        chunk_size: int | None = None,
        with_entropy: bool = False,
        groups: Sequence[int] | None = None,
        row_tokens: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        out = token_logprobs(
            self.model,
            input_ids,
            attention_mask,
            targets,
            loss_mask,
            groups=groups,
            row_tokens=row_tokens,
            temperature=temperature,
            fused=fused,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
        )
        return out.logprobs, out.entropy


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers causal LM (`model.get_decoder().layers`)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"{type(model).__name__}: expected a transformers causal LM with "
            "get_decoder().layers (a non-empty ModuleList) to shard per decoder layer"
        )
    return list(layers)


def broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's, in place (a collective).

    `fully_shard` keeps each rank's slice of its *own* local model and broadcasts nothing, so ranks
    that built their models differently (another seed, a rank-dependent init) would train an
    inconsistent patchwork. One `broadcast` per tensor (tied weights once), each staged on
    `device` (the backend's: NCCL sends CUDA tensors only) and copied back where it lives. Cost:
    one broadcast of the whole model at start.
    """
    with torch.no_grad():
        for tensor in chain(model.parameters(), model.buffers()):
            staged = tensor.detach().to(device)
            torch.distributed.broadcast(staged, src=0)
            if staged.data_ptr() != tensor.data_ptr():  # staged on another device
                tensor.copy_(staged)


def shard_model(model: nn.Module, *, bf16: bool = False) -> TokenLogprobs:
    """Shard `model` in place over the current process group; return the FSDP root to call.

    Rank 0's parameters and buffers are broadcast first (`broadcast_from_rank0`), so every rank
    trains rank 0's initial weights whatever it built. The parameters of `model` become sharded
    DTensors (build the optimizer over them afterwards); `model.state_dict()` then holds the
    local shards. Frozen parameters (a peft LoRA base) are sharded too and stay frozen. Needs
    an active process group of more than one rank. bf16: mixed precision (CUDA only).
    """
    if not active():
        raise RuntimeError("shard_model needs an initialised process group of more than one rank")
    device_type = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    if bf16 and device_type != "cuda":
        raise ValueError("bf16 mixed precision is for CUDA (nccl) only; on CPU/gloo use float32")
    broadcast_from_rank0(model, torch.device(device_type))
    mesh = init_device_mesh(device_type, (current_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = TokenLogprobs(model)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return root


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded weights of a sharded `model` on every rank, by state-dict name, on the CPU.

    A collective: every rank calls it (each parameter is all-gathered in turn, so the peak is one
    full copy per rank plus one parameter). Names are those of the model before `shard_model`, so
    the result loads into an unsharded copy of it. Without a process group: the model's own
    tensors, detached.
    """
    if not active():
        return {k: v.detach() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().to("cpu") for k, v in state.items() if isinstance(v, Tensor)}
