"""The export CLI: `python -m geb.export hf|gguf` writes what export_hf / export_gguf write for the same model, and
the older commands `python -m geb.hf export` and `python -m geb.gguf export` still run, with the same flags,
output, exit codes and error messages."""

import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from geb.export import legacy_main, main
from geb.gguf import export_gguf
from geb.hf import export_hf, hf_config

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def exactly(message: str) -> str:
    """A pattern matching exactly this message."""
    return f"^{re.escape(message)}$"


# Each export as the one CLI and under its older command name: (function, the arguments before the flags).
HF_CLIS = [(main, ["hf"]), (partial(legacy_main, "hf"), ["export"])]
GGUF_CLIS = [(main, ["gguf"]), (partial(legacy_main, "gguf"), ["export"])]


def test_hf_export(tiny_run, tiny_model, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    main(["hf", "--ckpt", str(tiny_run.run_dir), "--out", str(out)])
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert contents(out) == contents(export_hf(tiny_model, tmp_path / "reference", tiny_run.tokenizer_file))
    assert json.loads((out / "config.json").read_text()) == hf_config(tiny_run.config)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    idx = torch.randint(0, tiny_run.config.vocab_size, (1, 19))
    with torch.no_grad():
        assert (tiny_model(idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4

    legacy_main("hf", ["export", "--ckpt", str(tiny_run.run_dir / "ckpt-0000060.pt"), "--out", str(tmp_path / "old")])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'old'}\n"
    assert contents(tmp_path / "old") == contents(out)


def test_hf_export_errors(tmp_path):
    for cli, command in HF_CLIS:
        with pytest.raises(SystemExit, match=exactly(f"error: {tmp_path / 'missing'}: no such checkpoint file or "
                                                     "directory")):
            cli([*command, "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
        with pytest.raises(SystemExit, match=exactly(f"error: {tmp_path}: no readable checkpoint (ckpt-*.pt) and no "
                                                     "Hugging Face config.json")):
            cli([*command, "--ckpt", str(tmp_path), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_gguf_export(tiny_run, tiny_model, tmp_path, capsys, qtype):
    reference = export_gguf(tiny_model, tiny_run.tokenizer_file, tmp_path / "reference.gguf", qtype).read_bytes()
    for i, (cli, command) in enumerate(GGUF_CLIS):
        out = tmp_path / f"{i}.gguf"
        cli([*command, "--ckpt", str(tiny_run.run_dir), "--out", str(out), "--type", qtype])
        assert capsys.readouterr().out == f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {qtype})\n"
        assert out.read_bytes() == reference


def test_gguf_export_finds_the_tokenizer_or_asks_for_it(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"  # a run dir whose tokenizer.model went missing
    run.mkdir()
    shutil.copyfile(tiny_run.run_dir / "ckpt-0000060.pt", run / "ckpt-0000060.pt")
    for cli, command in GGUF_CLIS:
        with pytest.raises(SystemExit, match=exactly(f"error: --ckpt {run}: no tokenizer.model found next to it; "
                                                     "pass --tokenizer PATH")):
            cli([*command, "--ckpt", str(run), "--out", str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists()
    main(["gguf", "--ckpt", str(run), "--out", str(tmp_path / "x.gguf"), "--tokenizer", str(tiny_run.tokenizer_file)])
    main(["gguf", "--ckpt", str(tiny_run.run_dir), "--out", str(tmp_path / "y.gguf")])
    assert (tmp_path / "x.gguf").read_bytes() == (tmp_path / "y.gguf").read_bytes()
    assert capsys.readouterr().out.count("wrote ") == 2


def test_gguf_export_errors(tiny_run, tmp_path, capsys):
    for cli, command in GGUF_CLIS:
        with pytest.raises(SystemExit, match=exactly(f"error: --ckpt {tmp_path / 'none'}: no such checkpoint file or "
                                                     "directory")):
            cli([*command, "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "y.gguf")])
    hf_dir = tmp_path / "hf"  # a Hugging Face directory of another architecture
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    wrong_arch = f"error: --ckpt {hf_dir / 'config.json'}: model_type is 'mistral', only 'llama' checkpoints load"
    with pytest.raises(SystemExit, match=exactly(wrong_arch)):
        main(["gguf", "--ckpt", str(hf_dir), "--out", str(tmp_path / "y.gguf")])
    with pytest.raises(SystemExit, match="^error: .*missing.model"):
        main(["gguf", "--ckpt", str(tiny_run.run_dir), "--out", str(tmp_path / "y.gguf"),
              "--tokenizer", str(tmp_path / "missing.model")])
    with pytest.raises(SystemExit) as exit_info:
        main(["gguf", "--ckpt", str(tiny_run.run_dir), "--out", str(tmp_path / "y.gguf"), "--type", "q5_k"])
    assert exit_info.value.code == 2 and "invalid choice: 'q5_k'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, not even a temporary file


def test_help_names_both_formats_and_the_old_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "python -m geb.export hf   --ckpt" in text and "python -m geb.export gguf --ckpt" in text
    assert "python -m geb.hf export" in text and "python -m geb.gguf export" in text
    for fmt, flags in (("hf", ["--ckpt", "--out"]), ("gguf", ["--ckpt", "--out", "--type", "--tokenizer"])):
        with pytest.raises(SystemExit):
            main([fmt, "--help"])
        new = capsys.readouterr().out
        with pytest.raises(SystemExit):
            legacy_main(fmt, ["export", "--help"])
        old = capsys.readouterr().out
        assert f"usage: python -m geb.{fmt} export" in old and f"usage: python -m geb.export {fmt}" in new
        assert all(flag in new and flag in old for flag in flags)
        assert new.split("options:")[1] == old.split("options:")[1]  # the same flags, word for word


# One run of each old command as users type it; their error paths are the same code, tested in-process above
# (SystemExit with a message: exit status 1, the message alone on stderr).
def python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_old_hf_command(tiny_run, tiny_model, tmp_path):
    out = tmp_path / "hf"
    res = python_m("geb.hf", "export", "--ckpt", str(tiny_run.run_dir), "--out", str(out))
    assert res.returncode == 0 and res.stdout == f"wrote {out}\n", res.stderr
    assert contents(out) == contents(export_hf(tiny_model, tmp_path / "reference", tiny_run.tokenizer_file))


def test_old_gguf_command(tiny_run, tiny_model, tmp_path):
    out = tmp_path / "x.gguf"
    res = python_m("geb.gguf", "export", "--ckpt", str(tiny_run.run_dir), "--out", str(out), "--type", "q8_0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, q8_0)\n"
    assert out.read_bytes() == export_gguf(tiny_model, tiny_run.tokenizer_file, tmp_path / "ref", "q8_0").read_bytes()
