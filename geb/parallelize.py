"""Parallelism applied to a GEB from outside, as torchtitan's `parallelize` does: activation checkpointing per
block, `torch.compile` per block and FSDP2 `fully_shard` on each block and the root. geb/model.py knows nothing
of it; the functions change the model in place (the state dict keeps the plain names)."""

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from geb.model import GEB

AC_MODES = ("none", "full", "selective")
SELECTIVE_EVERY = 2  # --ac selective checkpoints every 2nd block (torchtitan's layer-selective AC, frequency 2)


def apply_ac(model: GEB, mode: str) -> None:
    """Activation checkpointing: each block ("full") or every SELECTIVE_EVERY-th block ("selective") keeps only
    its input and recomputes the rest in the backward (non-reentrant, RNG state preserved so dropout matches).
    The composable form hooks the block in place: no wrapper module, so parameter names do not change."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        if mode == "full" or i % SELECTIVE_EVERY == 0:
            checkpoint(block)


def compile_blocks(model: GEB) -> None:
    """torch.compile each block in place (the FSDP way: the all-gathers stay between compiled regions)."""
    for block in model.layers:
        block.compile()


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; fp32 throughout elsewhere."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class GlooReduceScatter:
    """FSDP2's gradient reduce-scatter on Gloo as point-to-point sends (FSDP2's `set_custom_reduce_scatter`): each
    rank sends every peer that peer's 1/N of the flat gradient buffer and sums the N pieces of its own in rank order.
    The same bytes as a ring reduce-scatter, about 2x faster than Gloo's reduce_scatter (BENCHMARKS.md); FSDP2 runs
    the collective synchronously on CPU, so its speed is the step's."""

    def allocate(self, size: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The output buffer, as FSDP2's default collective allocates it."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: dist.ReduceOp, async_op: bool = False) -> None:
        """Write the group's sum (or mean, for AVG) of this rank's 1/N of input_tensor to output_tensor."""
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"GlooReduceScatter supports SUM and AVG, got {op}")
        n, rank = group.size(), group.rank()
        pieces = input_tensor.view(n, -1)
        sends = [dist.isend(pieces[peer], group=group, group_dst=peer) for peer in range(n) if peer != rank]
        out, received = output_tensor.view(-1), None
        for peer in range(n):  # rank order: every shard is summed the same way, run after run
            if peer == rank == 0:
                out.copy_(pieces[rank])
            elif peer == rank:
                out.add_(pieces[rank])
            elif peer == 0:
                dist.recv(out, group=group, group_src=peer)
            else:
                received = torch.empty_like(out) if received is None else received
                dist.recv(received, group=group, group_src=peer)
                out.add_(received)
        for work in sends:
            work.wait()
        if op == dist.ReduceOp.AVG:
            out.div_(n)


class GlooAllGather:
    """FSDP2's parameter all-gather on Gloo as one broadcast from each rank (FSDP2's `set_custom_all_gather`): the
    same bytes as Gloo's all_gather, about 3x faster (BENCHMARKS.md)."""

    def allocate(self, size: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The output buffer, as FSDP2's default collective allocates it."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> None:
        """Fill output_tensor with every rank's input_tensor, in rank order."""
        pieces = output_tensor.view(group.size(), -1)
        if input_tensor.data_ptr() != pieces[group.rank()].data_ptr():  # FSDP2 gathers in place: input is that piece
            pieces[group.rank()].copy_(input_tensor.view(-1))
        for src in range(group.size()):
            dist.broadcast(pieces[src], group=group, group_src=src)


def tune_for_gloo(model: GEB) -> None:
    """CPU ranks: every FSDP group all-gathers and reduce-scatters with Gloo's faster point-to-point paths."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(GlooAllGather())
            module.set_custom_reduce_scatter(GlooReduceScatter())


def apply_fsdp(model: GEB, device: torch.device) -> None:
    """FSDP2 over every rank of the default process group: one group per block; untied, the embedding and the
    final norm with the LM head are groups of their own; the root group holds what is left, with tied embeddings
    the one shared matrix."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device)
    if not model.config.tie_embeddings:
        # Kept gathered from its forward to its backward: the first group in the forward is the last in the backward,
        # where gathering it again would cost a whole vocab x d_model matrix for a gradient that does not need it.
        fully_shard(model.embed_tokens, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The next group's all-gather follows the last block at once in the backward: keep that block unsharded.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < last)
    if not model.config.tie_embeddings:
        fully_shard([model.norm, model.lm_head], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if device.type == "cpu":
        tune_for_gloo(model)


def parallelize(model: GEB, device: torch.device, *, fsdp: bool = False, ac: str = "none",
                compile: bool = False) -> GEB:
    """Apply activation checkpointing, then per-block compile (FSDP only), then FSDP2, in torchtitan's order;
    returns the same model object. Without FSDP, train.py compiles the whole model and wraps it in DDP itself."""
    apply_ac(model, ac)
    if fsdp:
        if compile:
            compile_blocks(model)
        apply_fsdp(model, device)
    return model
