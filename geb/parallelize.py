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


class AllReduceScatter:
    """FSDP2's gradient reduce-scatter done as an all-reduce of the flat gradient buffer, keeping this rank's shard
    (FSDP2's custom-collective hook, `set_custom_reduce_scatter`). Gloo's reduce_scatter takes about 1.4x its ring
    all_reduce of the same buffer, and FSDP2 runs it synchronously on CPU. The input buffer, which FSDP frees right
    after, is reduced in place: no memory is added."""

    def allocate(self, size: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The output buffer, as FSDP2's default collective allocates it."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: dist.ReduceOp, async_op: bool = False) -> None:
        """Sum input_tensor over the group in place; write this rank's 1/N of it (averaged for AVG) to output."""
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"AllReduceScatter supports SUM and AVG, got {op}")
        dist.all_reduce(input_tensor, group=group)
        shard = input_tensor.view(group.size(), -1)[group.rank()]
        if op == dist.ReduceOp.AVG:
            torch.div(shard, group.size(), out=output_tensor.view(-1))
        else:
            output_tensor.view(-1).copy_(shard)


def tune_for_gloo(model: GEB) -> None:
    """CPU ranks: every FSDP group reduce-scatters its gradients with Gloo's faster all-reduce."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(AllReduceScatter())


def apply_fsdp(model: GEB, device: torch.device) -> None:
    """FSDP2 over every rank of the default process group: one group per block; untied, the embedding and the
    final norm with the LM head are groups of their own (so only one of the two big matrices is ever gathered);
    the root group holds what is left, with tied embeddings the one shared matrix."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device)
    if not model.config.tie_embeddings:
        fully_shard(model.embed_tokens, mesh=mesh, mp_policy=policy)
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
