"""Runs before any test module imports `kernels`: without a GPU, Triton kernels run in the interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when @triton.jit decorates a kernel, i.e. at the first import of `kernels`.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return
        # Triton compiles for the GPU here, so it cannot run the CPU-tensor kernel tests; the `gpu` tests cover the
        # same kernels on CUDA tensors.
        skip_cpu = pytest.mark.skip(reason="Triton on CPU tensors needs the interpreter: run them with "
                                           "`CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 pytest -m 'not gpu'`")
        for item in items:
            if "interpreter" in item.keywords and "gpu" not in item.keywords:
                item.add_marker(skip_cpu)
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
