"""What the kernel files share: the interpreter flag, output buffers, layout and launch-size helpers.

Imports torch only (not Triton), so that `kernels/__init__.py` can use it on a machine without Triton.
"""

import os

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when `kernels` is first imported; the
# launch sizes below are chosen at the same moment, so they always agree with how the kernels run.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs programs one after another at ~2 ms each: a few big programs are fastest there.
INTERPRET_ELEMENTS_PER_PROGRAM = 16384


def elements_per_program(gpu: int) -> int:
    """How many elements one program of an elementwise kernel handles: `gpu` on a GPU, more when interpreting."""
    return INTERPRET_ELEMENTS_PER_PROGRAM if INTERPRET else gpu


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer for a kernel; NaN-filled when GEB_KERNELS_POISON=1 so tests catch unwritten elements."""
    if os.environ.get("GEB_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension has stride 1 (the kernels read any other layout in place), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
