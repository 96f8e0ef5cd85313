"""The public kernel API (kernels/__init__.py): dispatch (impl, GEB_KERNELS), bad calls that must raise ValueError
naming the argument, imports, and the torch.library ops: opcheck, and torch.compile tracing through every kernel
without graph breaks (aot_eager on CPU under the interpreter; Inductor with fullgraph=True on a GPU)."""

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from kernel_check import assert_rule

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


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_flash_attn_varlen_bad_calls(impl):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = torch.randn(7, 4, 32), torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    with pytest.raises(ValueError, match="q must be 3-D"):
        kernels.flash_attn_varlen_func(q[None], k, v, cu, cu, 4, 4, impl=impl)
    with pytest.raises(ValueError, match="heads"):
        kernels.flash_attn_varlen_func(torch.randn(7, 3, 32), k, v, cu, cu, 4, 4, impl=impl)
    with pytest.raises(ValueError, match="v.dtype"):
        kernels.flash_attn_varlen_func(q, k, v.half(), cu, cu, 4, 4, impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32"):
        kernels.flash_attn_varlen_func(q, k, v, cu.long(), cu, 4, 4, impl=impl)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must rise from 0 to 7"):
        kernels.flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 5, 3], dtype=torch.int32), 4, 5, impl=impl)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must rise from 0 to 7"):
        kernels.flash_attn_varlen_func(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), cu, 4, 4, impl=impl)
    with pytest.raises(ValueError, match="max_seqlen_q is 3 but cu_seqlens_q holds a document of 4"):
        kernels.flash_attn_varlen_func(q, k, v, cu, cu, 3, 4, impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens_k documents"):
        kernels.flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 7], dtype=torch.int32), 4, 7, impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens_q.device"):
        kernels.flash_attn_varlen_func(q, k, v, cu.to("meta"), cu, 4, 4, impl=impl)


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


def test_without_triton_the_references_still_run():
    code = (
        "import importlib.util, torch\n"
        "find_spec = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'triton' else find_spec(name, *a)\n"
        "import kernels, sys\n"
        "assert not any(m.startswith('kernels.') and m != 'kernels.reference' and m != 'kernels._common'\n"
        "               for m in sys.modules), sorted(sys.modules)\n"
        "x = torch.randn(2, 8)\n"
        "assert kernels.swiglu(x, x).shape == x.shape\n"
        "assert kernels.linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([1, 4]), impl='torch').ndim == 0\n"
        "try:\n"
        "    kernels.swiglu(x, x, impl='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ValueError" in result.stdout and "needs the triton package" in result.stdout, result.stdout


def test_public_functions_win_over_submodules_of_the_same_name():
    for name in ("flash_attn_func", "rms_norm", "swiglu", "apply_rotary"):
        assert not isinstance(getattr(kernels, name), types.ModuleType), f"kernels.{name} is a module"
    assert {"flash_attn_func", "rms_norm", "swiglu", "apply_rotary", "add_rms_norm", "apply_rotary_qk",
            "linear_cross_entropy"} <= set(kernels.__all__)
    assert not isinstance(kernels.flash_attn_varlen_func, types.ModuleType)
    assert kernels.__all__[:2] == ["flash_attn_func", "flash_attn_varlen_func"]


def _kernel_imports(path: Path) -> tuple[set[str], list[str]]:
    """The `kernels` modules a file imports at module level, and any import found inside a function."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        if node not in tree.body and not any(node in ast.walk(n) for n in tree.body if isinstance(n, ast.If | ast.Try)):
            nested.append(f"{path.name}:{node.lineno}")
        for name in names:
            if name == "kernels" and isinstance(node, ast.ImportFrom):
                # `from kernels import x`: the submodule kernels.x if there is one, else the package itself.
                top.update(f"kernels.{a.name}" if (path.parent / f"{a.name}.py").exists() else "kernels"
                           for a in node.names)
            elif name.startswith("kernels"):
                top.add(name)
    return top, nested


def test_kernels_imports_are_at_the_top_and_acyclic():
    """Kernel files import what they share from kernels._common, never the package whose __init__ imports them."""
    package = ROOT / "kernels"
    graph = {}
    for path in package.glob("*.py"):
        module = "kernels" if path.stem == "__init__" else f"kernels.{path.stem}"
        top, nested = _kernel_imports(path)
        assert not nested, f"imports inside functions: {nested}"
        graph[module] = {m for m in top if m != module}
        if module != "kernels":
            assert "kernels" not in graph[module], f"{path.name} imports the kernels package (a cycle via __init__)"

    def visit(module, stack):
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        for dep in graph.get(module, ()):
            visit(dep, [*stack, module])
    for module in graph:
        visit(module, [])

# ---------------------------------------------------------------------------------------------------------------
# torch.library ops and torch.compile. Their non-`gpu` tests run Triton on CPU tensors, which needs the interpreter
# (see conftest.py).
# ---------------------------------------------------------------------------------------------------------------
def _block(x, w, gate_w, up_w, cos, sin, impl):
    """A miniature transformer block through every kernel: norm, rotary, GQA attention, SwiGLU."""
    b, t, d = x.shape
    h = kernels.rms_norm(x, w, 1e-5, impl=impl)
    q = kernels.apply_rotary(h.view(b, t, 2, d // 2), cos, sin, impl=impl)
    k = kernels.apply_rotary(h[..., : d // 2].reshape(b, t, 1, d // 2), cos, sin, impl=impl)
    a = kernels.flash_attn_func(q, k, k, causal=True, impl=impl).reshape(b, t, d)
    return kernels.swiglu(a @ gate_w, a @ up_w, impl=impl)


def _inputs(device="cpu", dtype=torch.float32, b=2, t=19, d=64, f=96):
    x = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d, device=device, dtype=dtype, requires_grad=True)
    gate_w = (torch.randn(d, f, device=device, dtype=dtype) / 8).requires_grad_()
    up_w = (torch.randn(d, f, device=device, dtype=dtype) / 8).requires_grad_()
    angles = torch.rand(t, d // 4, device=device) * 6
    return x, w, gate_w, up_w, angles.cos(), angles.sin()


@pytest.mark.interpreter
def test_custom_ops_are_registered():
    for name in ("flash_attn_fwd", "flash_attn_bwd", "flash_attn_varlen_fwd", "flash_attn_varlen_bwd",
                 "rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd",
                 "rotary_fwd", "rotary_bwd", "linear_ce_fwd", "linear_ce_bwd", "add_rms_norm_fwd", "add_rms_norm_bwd",
                 "rotary_qk_fwd", "rotary_qk_bwd"):
        assert hasattr(torch.ops.geb, name)


@pytest.mark.interpreter
def test_opcheck_forward_ops():
    """Schema, fake (meta) implementations and dispatch of the forward custom ops, run eagerly on CPU."""
    q, k = torch.randn(1, 17, 2, 32), torch.randn(1, 20, 1, 32)
    torch.library.opcheck(torch.ops.geb.flash_attn_fwd, (q, k, k, True, 0.2))
    cu_q, cu_k = torch.tensor([0, 5, 17], dtype=torch.int32), torch.tensor([0, 9, 20], dtype=torch.int32)
    torch.library.opcheck(torch.ops.geb.flash_attn_varlen_fwd, (q[0], k[0], k[0], cu_q, cu_k, 12, 11, True, 0.2))
    torch.library.opcheck(torch.ops.geb.rms_norm_fwd, (torch.randn(3, 40), torch.randn(40), 1e-5))
    torch.library.opcheck(torch.ops.geb.swiglu_fwd, (torch.randn(3, 40), torch.randn(3, 40)))
    angles = torch.rand(17, 16)
    torch.library.opcheck(torch.ops.geb.rotary_fwd, (torch.randn(2, 17, 3, 32), angles.cos(), angles.sin()))


@pytest.mark.interpreter
def test_compile_fullgraph_traces_kernels_on_cpu():
    """Dynamo + AOTAutograd trace forward and backward through the autograd.Functions and custom ops with no graph
    break; the compiled graph runs the Triton kernels (interpreter) and matches eager."""
    torch._dynamo.reset()
    inputs = _inputs()
    eager = _block(*inputs, impl="triton")
    grads_eager = torch.autograd.grad(eager.sum(), inputs[:4])
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs, impl="triton")
    grads = torch.autograd.grad(out.sum(), inputs[:4])
    torch.testing.assert_close(out, eager)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.interpreter
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_inductor_gpu(dtype):
    torch._dynamo.reset()
    inputs = _inputs("cuda", dtype, b=2, t=300, d=256, f=512)
    out = torch.compile(_block, fullgraph=True)(*inputs, impl="triton")
    grads = torch.autograd.grad(out.float().sum(), inputs[:4])
    # Ground truth in fp64, and PyTorch in the same dtype, both eager.
    runs = {}
    for kind, cast in (("ref", torch.float64), ("same", dtype)):
        args = [t.detach().to(cast).requires_grad_(t.requires_grad) for t in inputs[:4]] + list(inputs[4:])
        y = _block(*args, impl="torch")
        runs[kind] = (y, torch.autograd.grad(y.float().sum(), args[:4]))
    # Several kernels in a row: allow 4x PyTorch's own error.
    assert_rule("out", out, runs["ref"][0], runs["same"][0], factor=4.0)
    for name, g, g_ref, g_same in zip(("dx", "dw", "dgate_w", "dup_w"), grads, runs["ref"][1], runs["same"][1],
                                      strict=True):
        assert_rule(name, g, g_ref, g_same, factor=4.0)


@pytest.mark.interpreter
def test_reference_block_matches_triton_block():
    """Sanity check of the helper above: both paths agree in eager mode."""
    inputs = _inputs(t=9)
    torch.testing.assert_close(_block(*inputs, impl="triton"), _block(*inputs, impl="torch"), atol=1e-5, rtol=1e-4)


def test_add_rms_norm_bad_calls():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="residual.shape"):
        kernels.add_rms_norm(x, torch.randn(2, 9), torch.ones(8), impl="triton")
    with pytest.raises(ValueError, match="residual.dtype"):
        kernels.add_rms_norm(x, x.half(), torch.ones(8), impl="triton")
    with pytest.raises(ValueError, match="weight.shape"):
        kernels.add_rms_norm(x, x, torch.ones(7), impl="triton")


def test_rotary_qk_bad_calls():
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos = sin = torch.randn(5, 8)
    with pytest.raises(ValueError, match="k.shape"):
        kernels.apply_rotary_qk(q, torch.randn(2, 5, 2, 32), cos, sin, impl="triton")
    with pytest.raises(ValueError, match=r"cos.shape.*\(T, D // 2\).*\(B, T, D // 2\)"):
        kernels.apply_rotary_qk(q, k, torch.randn(3, 5, 8), sin, impl="triton")
    with pytest.raises(ValueError, match="sin.shape"):
        kernels.apply_rotary_qk(q, k, cos, torch.randn(2, 5, 8), impl="triton")
    with pytest.raises(ValueError, match="q must be"):
        kernels.apply_rotary_qk(q[..., :15], k, cos, sin, impl="triton")
    with pytest.raises(ValueError, match="k.dtype"):
        kernels.apply_rotary_qk(q, k.half(), cos, sin, impl="triton")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_cross_entropy_bad_calls(impl):
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    ce = kernels.linear_cross_entropy
    with pytest.raises(ValueError, match="reduction"):
        ce(x, w, t, reduction="avg", impl=impl)
    with pytest.raises(ValueError, match="softcap"):
        ce(x, w, t, softcap=0.0, impl=impl)
    with pytest.raises(ValueError, match="weight must be"):
        ce(x, w[None], t, impl=impl)
    with pytest.raises(ValueError, match=r"x must be .* weight.shape\[1\] = 8"):
        ce(torch.randn(4, 9), w, t, impl=impl)
    with pytest.raises(ValueError, match="targets.shape"):
        ce(x, w, t[:3], impl=impl)
    with pytest.raises(ValueError, match="targets.dtype"):
        ce(x, w, t.float(), impl=impl)
    with pytest.raises(ValueError, match="weight.dtype"):
        ce(x, w.half(), t, impl=impl)
    with pytest.raises(ValueError, match=r"targets hold 10, outside \[0, vocab = 10\)"):
        ce(x, w, torch.tensor([0, 10, 1, 2]), impl=impl)
    with pytest.raises(ValueError, match=r"targets hold -1.*ignore_index \(-100\)"):
        ce(x, w, torch.tensor([0, -1, 1, 2]), impl=impl)


@pytest.mark.interpreter
def test_new_custom_ops_pass_opcheck():
    """Schema, fake implementations and dispatch of the fused ops' custom ops, eagerly on CPU."""
    x, w, t = torch.randn(20, 8), torch.randn(50, 8), torch.randint(0, 50, (20,))
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.geb.linear_ce_fwd, (x, w, t, -100, 0.0, reduction, True, True))
    torch.library.opcheck(torch.ops.geb.linear_ce_bwd, (torch.randn(20), x, w, t, -100, 0.0, True))
    torch.library.opcheck(torch.ops.geb.add_rms_norm_fwd, (torch.randn(3, 40), torch.randn(3, 40), torch.randn(40),
                                                           1e-5))
    angles = torch.rand(2, 17, 16)
    torch.library.opcheck(torch.ops.geb.rotary_qk_fwd, (torch.randn(2, 17, 4, 32), torch.randn(2, 17, 2, 32),
                                                        angles.cos(), angles.sin()))


@pytest.mark.interpreter
def test_compile_fullgraph_traces_the_fused_ops():
    """add_rms_norm and apply_rotary_qk (the cross-entropy has its own test) under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()

    def fn(x, r, w, q, k, cos, sin):
        h, s = kernels.add_rms_norm(x, r, w, 1e-5, impl="triton")
        q, k = kernels.apply_rotary_qk(q, k, cos, sin, impl="triton")
        return (h * s).sum() + (q * q).sum() + k.sum()

    angles = torch.rand(2, 9, 8)
    args = [torch.randn(2, 9, 32), torch.randn(2, 9, 32), torch.randn(32), torch.randn(2, 9, 4, 16),
            torch.randn(2, 9, 2, 16)]
    args = [a.requires_grad_() for a in args] + [angles.cos(), angles.sin()]
    eager = fn(*args)
    grads_eager = torch.autograd.grad(eager, args[:5])
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(out, eager)
    for g, g_eager in zip(torch.autograd.grad(out, args[:5]), grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager)
