"""The public kernel API: dispatch (impl, GEB_KERNELS) and bad calls that must raise ValueError naming the argument."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]


def _qkv(h_q=4, h_kv=2, d=32, dtype=torch.float32):
    return torch.randn(1, 5, h_q, d, dtype=dtype), torch.randn(1, 7, h_kv, d, dtype=dtype), \
        torch.randn(1, 7, h_kv, d, dtype=dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_flash_attn_bad_calls(impl):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="heads"):
        kernels.flash_attn_func(q, torch.randn(1, 7, 3, 32), torch.randn(1, 7, 3, 32), impl=impl)
    with pytest.raises(ValueError, match="k.dtype"):
        kernels.flash_attn_func(q, k.half(), v, impl=impl)
    with pytest.raises(ValueError, match="v.dtype"):
        kernels.flash_attn_func(q, k, v.half(), impl=impl)
    with pytest.raises(ValueError, match="v.shape"):
        kernels.flash_attn_func(q, k, v[:, :6], impl=impl)
    with pytest.raises(ValueError, match="k head dim"):
        kernels.flash_attn_func(q, k[..., :16], v[..., :16], impl=impl)
    with pytest.raises(ValueError, match="k batch"):
        kernels.flash_attn_func(q, torch.cat([k, k]), torch.cat([v, v]), impl=impl)
    with pytest.raises(ValueError, match="q must be 4-D"):
        kernels.flash_attn_func(q[0], k, v, impl=impl)
    with pytest.raises(ValueError, match="k.device"):
        kernels.flash_attn_func(q, k.to("meta"), v, impl=impl)


@pytest.mark.interpreter
def test_flash_attn_unsupported_head_dim_names_it():
    q, k, v = _qkv(d=288)
    with pytest.raises(ValueError, match="head dim"):
        kernels.flash_attn_func(q, k, v, impl="triton")
    assert kernels.flash_attn_func(q, k, v, impl="torch").shape == q.shape  # the reference has no limit


@pytest.mark.interpreter
def test_triton_dtype_checks():
    with pytest.raises(ValueError, match="q.dtype"):
        kernels.flash_attn_func(*_qkv(dtype=torch.float64), impl="triton")
    with pytest.raises(ValueError, match="x.dtype is bfloat16"):
        kernels.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8), impl="triton")
    with pytest.raises(ValueError, match="gate.dtype"):
        kernels.swiglu(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), impl="triton")


def test_rms_norm_bad_calls():
    with pytest.raises(ValueError, match="weight.shape"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(7), impl="triton")
    with pytest.raises(ValueError, match="weight.device"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8, device="meta"), impl="triton")


def test_swiglu_bad_calls():
    with pytest.raises(ValueError, match="up.shape"):
        kernels.swiglu(torch.randn(2, 8), torch.randn(2, 9), impl="triton")
    with pytest.raises(ValueError, match="up.dtype"):
        kernels.swiglu(torch.randn(2, 8), torch.randn(2, 8).half(), impl="triton")


def test_rotary_bad_calls():
    x = torch.randn(1, 5, 2, 16)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="cos.shape"):
        kernels.apply_rotary(x, cos[:4], sin, impl="triton")
    with pytest.raises(ValueError, match="sin.shape"):
        kernels.apply_rotary(x, cos, torch.randn(5, 16), impl="triton")
    with pytest.raises(ValueError, match="x must be"):
        kernels.apply_rotary(torch.randn(1, 5, 2, 15), cos, sin, impl="triton")
    with pytest.raises(ValueError, match="sin.device"):
        kernels.apply_rotary(x, cos, sin.to("meta"), impl="triton")


def test_unknown_impl_names_it():
    with pytest.raises(ValueError, match="impl"):
        kernels.swiglu(torch.randn(3), torch.randn(3), impl="cuda")


def test_auto_on_cpu_uses_the_reference():
    # bf16 on CPU would be refused by the Triton path; auto must take the reference instead.
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert kernels.rms_norm(x, torch.ones(8), impl="auto").dtype == torch.bfloat16


def test_geb_kernels_torch_forces_the_reference(monkeypatch):
    monkeypatch.setenv("GEB_KERNELS", "torch")
    x = torch.randn(2, 8, dtype=torch.bfloat16)  # the Triton path would refuse bf16 on CPU
    assert kernels.swiglu(x, x, impl="triton").dtype == torch.bfloat16


def test_triton_without_interpreter_on_cpu_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, kernels\n"
        "try:\n"
        "    kernels.swiglu(torch.randn(4), torch.randn(4), impl='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ValueError" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout
