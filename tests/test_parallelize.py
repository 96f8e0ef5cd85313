"""geb.parallelize: activation checkpointing changes no loss or gradient (fp32, dropout included) and keeps fewer
activations for the backward; the state dict keeps its plain names; the point-to-point collectives used on Gloo
equal Gloo's own. FSDP2 runs end to end in tests/test_train.py."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import small_config

from geb.model import GEB
from geb.parallelize import GlooAllGather, GlooReduceScatter, apply_ac

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_activation_bytes(model: GEB, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    """Loss, gradients and the bytes of the distinct tensors autograd keeps for the backward (the activations;
    a checkpointed block keeps only its input, its own saved tensors are dropped and recomputed)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)  # the same dropout masks in every variant
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets, logits="none")
    loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, sum(n for ptr, n in saved.items() if ptr not in weights)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_ac_changes_no_loss_and_keeps_fewer_activations(mode):
    config = small_config(n_layers=4, dropout=0.1)
    torch.manual_seed(0)
    plain = GEB(config, impl="torch")
    checkpointed = GEB(config, impl="torch")
    checkpointed.load_state_dict(plain.state_dict())
    apply_ac(checkpointed, mode)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    idx = torch.randint(0, config.vocab_size, (3, 33))
    targets = torch.randint(0, config.vocab_size, (3, 33))
    loss, grads, plain_bytes = saved_activation_bytes(plain, idx, targets)
    ac_loss, ac_grads, ac_bytes = saved_activation_bytes(checkpointed, idx, targets)
    assert torch.equal(ac_loss, loss)
    assert ac_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ac_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # full keeps 4 block inputs instead of 4 blocks' activations; selective halves the blocks that keep them
    assert ac_bytes < (0.5 if mode == "full" else 0.8) * plain_bytes, (ac_bytes, plain_bytes)


def test_ac_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="'some'"):
        apply_ac(GEB(small_config(), impl="torch"), "some")


def collectives_rank(rank: int, world_size: int, store_path: str, results: dict) -> None:
    """One Gloo rank: GlooReduceScatter (SUM, AVG) and GlooAllGather against Gloo's own collectives on fresh random
    inputs."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    try:
        for i, op in enumerate((dist.ReduceOp.SUM, dist.ReduceOp.AVG)):
            full = torch.randn(world_size * 37, generator=torch.Generator().manual_seed(rank + 10 * i))
            expected, got = torch.full((37,), float("nan")), torch.full((37,), float("nan"))
            dist.reduce_scatter_single(expected, full.clone(), op=op)
            GlooReduceScatter()(got, full.clone(), dist.group.WORLD, op)
            results[(rank, str(op))] = (got, expected)
        shard = torch.randn(38, generator=torch.Generator().manual_seed(100 + rank))
        expected, got = torch.full((world_size * 38,), float("nan")), torch.full((world_size * 38,), float("nan"))
        dist.all_gather_single(expected, shard)
        GlooAllGather()(got, shard, dist.group.WORLD)
        results[(rank, "all_gather")] = (got, expected)
    finally:
        dist.destroy_process_group()


def test_gloo_collectives_equal_gloo_own(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(collectives_rank, args=(3, str(tmp_path / "store"), results), nprocs=3)
    assert len(results) == 9
    for key, (got, expected) in results.items():
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=str(key))
    sums = [results[(r, str(dist.ReduceOp.SUM))][0] for r in range(3)]
    assert not torch.allclose(sums[0], sums[1])  # each rank got its own shard


def test_gloo_reduce_scatter_rejects_other_ops():
    with pytest.raises(ValueError, match="SUM and AVG"):
        GlooReduceScatter()(torch.empty(2), torch.empty(4), None, dist.ReduceOp.MAX)
