"""The whole GEB model on the Triton kernels (interpreter on CPU) vs the same model on the PyTorch references:
logits and every parameter gradient, by the same rule as the kernel tests (fp64 model as the ground truth)."""

import copy

import pytest
import torch
from helpers import packed_batch, run_alone
from kernel_check import assert_rule, poisoned_outputs

import kernels.cross_entropy
from geb.config import preset
from geb.model import GEB

# This module's non-`gpu` tests run Triton on CPU tensors, which needs the interpreter (see conftest.py).
pytestmark = pytest.mark.interpreter


def _config(**overrides):
    # head dim 16, GQA group of 2, FFN and vocab not powers of two: small enough for the interpreter.
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return preset("tiny", **{**base, **overrides})


def _models(config):
    """The model on the Triton kernels, the same weights on the torch references, and an fp64 copy (ground truth)."""
    model = GEB(config, impl="triton")
    reference = GEB(config, impl="torch")
    reference.load_state_dict(model.state_dict())
    return model, reference, copy.deepcopy(reference).double()


def _run(model, idx, targets, logits="all"):
    out, loss = model(idx, targets, logits=logits)
    # Scaled so parameter gradients are O(0.1-1): at ~1e-4 the rule's absolute slack (1e-5) would hide 10% errors.
    (loss * 1000).backward()
    return (loss if out is None else out), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_model_triton_matches_torch(norm_position):
    torch.manual_seed(0)
    config = _config(norm_position=norm_position)
    model, reference, truth = _models(config)
    idx = torch.randint(0, config.vocab_size, (2, 33))
    targets = torch.randint(0, config.vocab_size, (2, 33))

    with poisoned_outputs():
        logits, grads = _run(model, idx, targets)
    same_logits, same_grads = _run(reference, idx, targets)
    ref_logits, ref_grads = _run(truth, idx, targets)

    assert_rule("logits", logits, ref_logits, same_logits)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient through the Triton path"
        assert_rule(f"grad {name}", grad, ref_grads[name], same_grads[name])


def test_model_triton_loss_only_matches_torch(monkeypatch):
    """logits="none": the Triton linear cross-entropy (and add_rms_norm, one-launch rotary) in the whole model, loss
    and every parameter gradient against the same model on the references, fp64 model as the ground truth."""
    monkeypatch.setattr(kernels.cross_entropy, "MIN_CHUNK", 16)  # 42 tokens in three chunks
    torch.manual_seed(3)
    config = _config(vocab_size=1000)
    model, reference, truth = _models(config)
    idx = torch.randint(0, config.vocab_size, (2, 21))
    targets = torch.randint(0, config.vocab_size, (2, 21))
    targets[1, 5:12] = -1

    with poisoned_outputs():
        loss, grads = _run(model, idx, targets, logits="none")
    same_loss, same_grads = _run(reference, idx, targets, logits="none")
    ref_loss, ref_grads = _run(truth, idx, targets, logits="none")
    assert_rule("loss", loss, ref_loss, same_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient through the Triton path"
        assert_rule(f"grad {name}", grad, ref_grads[name], same_grads[name])


def test_model_triton_kv_cache_decoding():
    """Prefill then one-token decoding steps through the KV cache (positions as tensors; the Triton rotary, RMSNorm
    and SwiGLU kernels at T = 1) match a full forward."""
    torch.manual_seed(1)
    config = _config()
    model = GEB(config, impl="triton").eval()
    reference = GEB(config, impl="torch").eval()
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        full, _ = reference(idx)
        truth, _ = copy.deepcopy(reference).double()(idx)
        model.setup_kv_cache(batch_size=2, max_seq_len=32)
        steps = [model(idx[:, :20], input_pos=torch.arange(20))[0]]
        for pos in range(20, 24):
            steps.append(model(idx[:, pos : pos + 1], input_pos=torch.tensor([pos]))[0])
        model.clear_kv_cache()
    decoded = torch.cat(steps, dim=1)
    assert_rule("decoded logits", decoded, truth, full)


@pytest.mark.gpu
def test_model_triton_matches_torch_bf16_autocast_gpu():
    """Training's setting on a GPU: fp32 weights under bf16 autocast, Triton kernels vs the PyTorch references, with
    the fp64 model as ground truth; loss and every parameter gradient within 4x PyTorch's own bf16 error."""
    torch.manual_seed(2)
    config = _config(vocab_size=1000, d_model=256, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=704, max_seq_len=512)
    model = GEB(config, impl="triton").cuda()
    reference = GEB(config, impl="torch").cuda()
    reference.load_state_dict(model.state_dict())
    truth = copy.deepcopy(reference).double()
    idx = torch.randint(0, config.vocab_size, (2, 300), device="cuda")
    targets = torch.randint(0, config.vocab_size, (2, 300), device="cuda")

    def run_autocast(m):  # as train.py: forward under autocast, backward outside it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = m(idx, targets)
        (loss * 1000).backward()
        return logits, {name: p.grad for name, p in m.named_parameters()}

    with poisoned_outputs():
        logits, grads = run_autocast(model)
    same_logits, same_grads = run_autocast(reference)
    ref_logits, ref_grads = _run(truth, idx, targets)
    assert_rule("logits", logits, ref_logits, same_logits, factor=4.0)
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient through the Triton path"
        assert_rule(f"grad {name}", grad, ref_grads[name], same_grads[name], factor=4.0)


def test_model_triton_packed_documents_equal_each_alone():
    """positions (packed documents): the model on Triton (varlen attention, per-token rotary) on packed rows against
    the fp64 model run on each document alone, logits and every gradient, the fp32 PyTorch model run on each document
    alone as the rule's yardstick (a packed one would share a masking bug)."""
    torch.manual_seed(4)
    config = _config()
    model, reference, truth = _models(config)
    idx, targets, positions = packed_batch([[1, 9, 13], [6, 18]])

    def run(m, alone=False):
        logits, loss = run_alone(m, idx, targets, positions) if alone else m(idx, targets, positions=positions)
        (loss * 1000).backward()
        return logits, loss, {name: p.grad for name, p in m.named_parameters()}

    with poisoned_outputs():
        logits, loss, grads = run(model)
    same_logits, same_loss, same_grads = run(reference, alone=True)
    ref_logits, ref_loss, ref_grads = run(truth, alone=True)
    assert_rule("logits", logits, ref_logits, same_logits)
    assert_rule("loss", loss, ref_loss, same_loss)
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient through the Triton path"
        assert_rule(f"grad {name}", grad, ref_grads[name], same_grads[name])
