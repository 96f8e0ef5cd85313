"""Runs before any test module imports `kernels`: without a GPU, Triton kernels run in the interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when @triton.jit decorates a kernel, i.e. at the first import of `kernels`.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
