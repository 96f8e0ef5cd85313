"""The PyTorch references (kernels/reference.py), the ground truth of every kernel test, against formulas written
out independently: explicit masked softmax, complex rotation, the RMSNorm definition."""

import pytest
import torch

from kernels import reference


def _explicit_attention(q, k, v, causal, scale):
    """softmax(q k^T * scale + mask) v per head, K/V heads repeated for GQA, mask aligned bottom-right."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        t_q, t_k = q.shape[1], k.shape[1]
        visible = torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + (t_k - t_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("t_q, t_k, causal", [(9, 9, True), (3, 11, True), (1, 11, True), (7, 11, False)])
def test_attention_ref_is_masked_softmax_with_gqa(t_q, t_k, causal):
    q = torch.randn(2, t_q, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, t_k, 2, 16, dtype=torch.float64), torch.randn(2, t_k, 2, 16, dtype=torch.float64)
    out = reference.attention_ref(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, _explicit_attention(q, k, v, causal, 0.3), rtol=1e-12, atol=1e-12)


def test_rms_norm_ref_statistics_in_fp32():
    x = torch.randn(3, 5, 64, dtype=torch.float16) * 4
    w = torch.randn(64, dtype=torch.float16)
    out = reference.rms_norm_ref(x, w, 1e-5)
    assert out.dtype == torch.float16
    x64 = x.double()
    expected = x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3)


def test_swiglu_ref():
    gate, up = torch.randn(4, 33, dtype=torch.float64) * 4, torch.randn(4, 33, dtype=torch.float64)
    expected = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(reference.swiglu_ref(gate, up), expected, rtol=1e-12, atol=1e-12)


def test_rotary_ref_is_a_complex_rotation_of_the_halves():
    """Rotate-half: (x1 + i x2) * e^(i angle), with x1, x2 the two halves of the head dim."""
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    angles = torch.rand(7, 8) * 20
    out = reference.rotary_ref(x, angles.cos(), angles.sin())
    rotated = torch.complex(x[..., :8], x[..., 8:]) * torch.polar(torch.ones_like(angles), angles).to(
        torch.complex128)[None, :, None, :]
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
