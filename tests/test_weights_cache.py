"""geb.weights_cache through infer_cpu.py's loading: a second start maps the cached converted weights and decodes
exactly as the first; a rewritten checkpoint, a replaced tokenizer or a damaged entry is detected and rebuilt."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from geb.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from geb.cpu_linear import int8_method, load_gemv
from geb.weights_cache import WEIGHTS_FILE, checkpoint_file, entry_dir, load_cached
from infer_cpu import load_converted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tiny_run, tmp_path, monkeypatch):
    """A copy of the session's tiny run (the tests rewrite it) and a private cache dir."""
    monkeypatch.setenv("GEB_CACHE", str(tmp_path / "cache"))
    return shutil.copytree(tiny_run.run_dir, tmp_path / "run")


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("quant", ["none", "int8", "q8_0", "int4"])
def test_second_start_maps_the_cache(run, tokenizer, quant):
    if not load_gemv():
        pytest.skip("the fp32 and int4 formats need geb/gemv.cpp built (AVX2, a C++ compiler)")
    ids = tokenizer.encode("When shall we three meet again")
    if quant == "int8" and int8_method() != "geb":  # FBGEMM's packed weights are not cached: converted each start
        assert [load_converted(run, quant, use_cache=True)[2] for _ in range(2)] == ["converted", "converted"]
        return
    first, tok1, origin1 = load_converted(run, quant, use_cache=True)
    second, tok2, origin2 = load_converted(run, quant, use_cache=True)
    assert (origin1, origin2) == ("converted, cached", "cache") and tok1 == tok2 == run / "tokenizer.model"
    assert torch.equal(logits(first, ids), logits(second, ids))
    uncached, _, origin = load_converted(run, quant, use_cache=False)
    assert origin == "converted" and torch.equal(logits(uncached, ids), logits(second, ids))
    # Mapped from the entry: fp32 weights, and quantized ones under 2 MiB (larger ones are copied into huge pages,
    # tests/test_cpu_linear.py).
    mapped = second.layers[0].mlp.down_proj.weight if quant == "none" else second.lm_head.qs
    assert mapped.nbytes < 2 << 20 and is_mapped_from(mapped, entry_dir(checkpoint_file(run), quant) / WEIGHTS_FILE)


def is_mapped_from(t: torch.Tensor, path) -> bool:
    """Whether t's memory lies in a mapping of path (Linux /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps to check memory mappings")
    for line in maps.read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return True
    return False


def test_stale_entries_are_rebuilt(run, tokenizer):
    if not load_gemv():
        pytest.skip("the int4 format needs geb/gemv.cpp built (AVX2, a C++ compiler)")
    ids = tokenizer.encode("Thunder and lightning")
    _, _, origin = load_converted(run, "int4", use_cache=True)
    assert origin == "converted, cached"
    ckpt = checkpoint_file(run)
    assert ckpt == list_checkpoints(run)[-1].resolve()
    # The checkpoint is rewritten in place (same path) with other weights: the entry must not be used.
    state = load_checkpoint(ckpt)
    state["model"] = {k: v * 1.5 if v.dim() == 2 else v for k, v in state["model"].items()}
    save_checkpoint(run, state["step"], state)
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 1))  # a distinct mtime on any file system
    assert load_cached(ckpt, "int4") is None
    model, _, origin = load_converted(run, "int4", use_cache=True)
    fresh, _, _ = load_converted(run, "int4", use_cache=False)
    assert origin == "converted, cached" and torch.equal(logits(model, ids), logits(fresh, ids))
    assert load_converted(run, "int4", use_cache=True)[2] == "cache"
    # A replaced tokenizer invalidates the entry too (it was checked against the checkpoint's sha256).
    tok = run / "tokenizer.model"
    tok.write_bytes(tok.read_bytes())
    os.utime(tok, ns=(tok.stat().st_atime_ns, tok.stat().st_mtime_ns + 10**9))
    assert load_cached(ckpt, "int4") is None
    assert load_converted(run, "int4", use_cache=True)[2] == "converted, cached"
    # A damaged weights file is never used.
    (entry_dir(ckpt, "int4") / WEIGHTS_FILE).write_bytes(b"not a torch file")
    assert load_cached(ckpt, "int4") is None
    assert load_converted(run, "int4", use_cache=True)[2] == "converted, cached"
