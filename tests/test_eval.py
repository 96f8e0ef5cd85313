"""geb.eval: the `python -m geb.eval` command line (tables, JSON, TensorBoard, int8, the data dir --bpb scores)."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import corpus_text

from geb.bpb import bits_per_byte
from geb.chat import encode_prompt
from geb.checkpoint import list_checkpoints, load_checkpoint, load_model, save_checkpoint
from geb.data import prepare
from geb.eval import main, tensorboard_scalars
from geb.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(tiny_run, run: Path, data_dir: str | Path | None = None) -> Path:
    """A copy of the session's tiny run (a test may write into it), recording data_dir as train.py does."""
    src = list_checkpoints(tiny_run.run_dir)[-1]
    state = load_checkpoint(src)
    state["data_dir"] = str(data_dir) if data_dir is not None else None
    save_checkpoint(run, state["step"], state)
    shutil.copyfile(tiny_run.tokenizer_file, run / "tokenizer.model")
    return run


def prepare_text(out: Path, text: str, tokenizer_file: Path) -> Path:
    """A prepared data dir of text cut into 300-character documents, half of them in val."""
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / f"{out.name}.jsonl"
    docs = [text[i:i + 300] for i in range(0, len(text), 300)]
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    prepare(out, corpus=[str(corpus)], tokenizer=tokenizer_file, val_fraction=0.5, num_workers=1)
    return out


@pytest.fixture(scope="module")
def two_data_dirs(tmp_path_factory, tokenizer_file) -> tuple[Path, Path]:
    """Two prepared data dirs of different text (English, Chinese): their bpb differ."""
    d = tmp_path_factory.mktemp("data")
    text = corpus_text()
    return prepare_text(d / "english", text[:6000], tokenizer_file), prepare_text(d / "chinese", text[-6000:],
                                                                                  tokenizer_file)


def eval_json(args: list, out: Path) -> dict:
    main([str(a) for a in args] + ["--out", str(out), "--no-tensorboard"])
    return json.loads(out.read_text())


def test_cli_run_dir(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    text = tmp_path / "t.txt"
    text.write_text("the sun and the rain on the road. " * 10)
    out = tmp_path / "res.json"
    main(["--ckpt", str(run), "--tasks", "arc_easy", "lambada", "mmlu", "--text", str(text), "--out", str(out),
          "--task-data", str(FIXTURES), "--batch-size", "4"])
    table = capsys.readouterr().out
    assert "| arc_easy | 6 |" in table and "| mmlu | 5 |" in table and "bits per byte" in table
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"arc_easy", "lambada", "mmlu"} and res["bpb_text"]["bytes"] == 340
    assert list(run.glob("events.out.tfevents.*")), "tensorboard scalars not written into the run dir"
    with pytest.raises(SystemExit, match="error: unknown task 'nope'; available: .*hellaswag"):
        main(["--ckpt", str(run), "--tasks", "nope"])
    with pytest.raises(SystemExit, match="error: .*no such checkpoint"):
        main(["--ckpt", str(tmp_path / "missing"), "--tasks", "arc_easy"])
    with pytest.raises(SystemExit, match=r"error: .*winogrande.rc_0shot.requests\.jsonl\.gz: task file not found"):
        main(["--ckpt", str(run), "--tasks", "winogrande", "--task-data", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"error: .*missing\.txt: cannot read as UTF-8 text"):
        main(["--ckpt", str(run), "--text", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="error: --batch-size must be >= 1, got 0"):
        main(["--ckpt", str(run), "--text", str(text), "--batch-size", "0"])


def test_cli_quant_int8_scores_the_int8_weights(tiny_run, tmp_path):
    """--quant int8 / int4 evaluate the weights infer_cpu.py --quant decodes with: close to, not equal to, fp32; their
    TensorBoard scalars go beside the model's own."""
    text = tmp_path / "t.txt"
    text.write_text("the sun and the rain on the road. " * 10)
    res = {quant: eval_json(["--ckpt", tiny_run.run_dir, "--text", text, "--quant", quant], tmp_path / f"{quant}.json")
           for quant in ("none", "int8", "int4")}
    assert res["int8"]["quant"] == "int8" and res["none"]["quant"] == "none"
    fp32, int8 = res["none"]["bpb_text"]["bpb"], res["int8"]["bpb_text"]["bpb"]
    assert fp32 != int8 and abs(int8 - fp32) <= 0.02 * fp32, (fp32, int8)
    assert set(tensorboard_scalars(res["int8"])) == {"eval_int8/bpb_text/bpb", "eval_int8/bpb_text/loss"}
    assert set(tensorboard_scalars(res["none"])) == {"eval/bpb_text/bpb", "eval/bpb_text/loss"}
    int4 = res["int4"]["bpb_text"]["bpb"]
    assert res["int4"]["quant"] == "int4" and int4 != fp32 and abs(int4 - fp32) <= 0.05 * fp32, (fp32, int4)
    with pytest.raises(SystemExit, match="error: --quant int8 runs on the CPU, not --device cuda"):
        main(["--ckpt", str(tiny_run.run_dir), "--text", str(text), "--quant", "int8", "--device", "cuda"])


def test_cli_bpb_scores_the_data_dir_the_run_recorded(tiny_run, two_data_dirs, tmp_path, monkeypatch, capsys):
    """--bpb without --data scores the data the run was trained on (its checkpoint records it), not data/default."""
    trained_on, other = two_data_dirs
    monkeypatch.chdir(tmp_path)
    shutil.copytree(other, tmp_path / "data" / "default")  # what the old default would have scored
    run = copy_run(tiny_run, tmp_path / "run", data_dir=trained_on.resolve())
    explicit = eval_json(["--ckpt", run, "--bpb", "--data", trained_on], tmp_path / "explicit.json")["bpb_val"]
    default = eval_json(["--ckpt", run, "--bpb", "--data", "data/default"], tmp_path / "default.json")["bpb_val"]
    assert explicit["bpb"] != default["bpb"]
    capsys.readouterr()
    for ckpt in (run, list_checkpoints(run)[-1]):  # a run dir, and one checkpoint file of it
        got = eval_json(["--ckpt", ckpt, "--bpb"], tmp_path / "got.json")["bpb_val"]
        assert got["bpb"] == explicit["bpb"] and got["tokens"] == explicit["tokens"]
        assert got["source"] == f"{trained_on.resolve()} (val)"
        err = capsys.readouterr().err
        assert f"bpb data: {trained_on.resolve()} (recorded in the checkpoint)" in err, err


def test_cli_bpb_falls_back_to_data_default_and_says_why(tiny_run, two_data_dirs, tmp_path, monkeypatch, capsys):
    """A recorded data dir that is gone, or none recorded: data/default, with the reason on stderr."""
    _, other = two_data_dirs
    monkeypatch.chdir(tmp_path)
    shutil.copytree(other, tmp_path / "data" / "default")
    want = eval_json(["--ckpt", tiny_run.run_dir, "--bpb", "--data", other], tmp_path / "want.json")["bpb_val"]
    gone = tmp_path / "moved-away"
    runs = {"the checkpoint records no data dir": tiny_run.run_dir,
            f"the recorded data dir {gone} no longer exists": copy_run(tiny_run, tmp_path / "run", data_dir=gone)}
    capsys.readouterr()
    for why, run in runs.items():
        got = eval_json(["--ckpt", run, "--bpb"], tmp_path / "got.json")["bpb_val"]
        assert got["bpb"] == want["bpb"] and got["source"] == "data/default (val)"
        err = capsys.readouterr().err
        assert f"bpb data: data/default (the default; {why})" in err, err
    # A tokenizer given from a data dir points at that data dir when the checkpoint records none.
    trained_on, _ = two_data_dirs
    got = eval_json(["--ckpt", tiny_run.run_dir, "--bpb", "--tokenizer", trained_on / "tokenizer.model"],
                    tmp_path / "tok.json")["bpb_val"]
    assert got["source"] == f"{trained_on} (val)" and got["bpb"] != want["bpb"]
    err = capsys.readouterr().err
    assert f"bpb data: {trained_on} (the tokenizer's data dir; the checkpoint records no data dir)" in err, err


def test_cli_bpb_scores_documents_alone_for_a_doc_mask_run(tiny_run, two_data_dirs, tmp_path, capsys):
    """A checkpoint trained with --doc-mask (its train_config says so) has --bpb score each document alone."""
    data = two_data_dirs[0]
    plain = copy_run(tiny_run, tmp_path / "plain")
    masked = copy_run(tiny_run, tmp_path / "masked")
    state = load_checkpoint(list_checkpoints(masked)[-1])
    state["train_config"] = {"doc_mask": True}
    save_checkpoint(masked, state["step"], state)
    got = eval_json(["--ckpt", masked, "--bpb", "--data", data], tmp_path / "masked.json")["bpb_val"]
    assert "each document scored alone" in capsys.readouterr().err
    without = eval_json(["--ckpt", plain, "--bpb", "--data", data], tmp_path / "plain.json")["bpb_val"]
    model, _ = load_model(plain)
    expected = bits_per_byte(model.eval(), data, doc_mask=True)
    assert got["bpb"] == pytest.approx(expected["bpb"], rel=1e-6) and got["tokens"] == expected["tokens"]
    assert without["bpb"] != pytest.approx(got["bpb"], rel=1e-4)


def test_cli_choices_scores_each_choice_by_its_log_likelihood(tiny_run, tmp_path, capsys):
    """--choices: the accuracy equals a by-hand count over full-sequence log-probs of prompt + choice + EOS."""
    model, _ = load_model(tiny_run.run_dir)
    tok = Tokenizer(tiny_run.tokenizer_file)
    rng = random.Random(7)
    words = ["sun", "rain", "road", "king", "night", "wind", "castle", "sword"]
    items = [{"prompt": [{"role": "user", "content": " ".join(rng.sample(words, 4))}],
              "choices": rng.sample(words, 3), "answer": rng.randrange(3)} for _ in range(12)]
    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    correct = 0
    for item in items:
        prompt = encode_prompt(item["prompt"], tok)
        scores = []
        for choice in item["choices"]:
            answer = tok.encode(choice) + [tok.eos_id]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1])[0].double(), -1)[0]
            scores.append(sum(logp[len(prompt) - 1 + i, a].item() for i, a in enumerate(answer)))
        correct += max(range(3), key=scores.__getitem__) == item["answer"]
    res = eval_json(["--ckpt", tiny_run.run_dir, "--choices", path, "--batch-size", "5"], tmp_path / "c.json")
    assert res["choices"]["n"] == 12 and res["tasks"] == {}
    assert res["choices"]["acc"] == correct / 12, correct
    assert 0 < correct < 12, "a set the model gets all right or all wrong tests little"
    assert "| chat choices | n | acc |" in capsys.readouterr().out
    assert set(tensorboard_scalars(res)) == {"eval/choices/acc"}
    path.write_text(json.dumps({"prompt": "not messages", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(SystemExit, match=r"error: .*choices\.jsonl:1: want"):
        main(["--ckpt", str(tiny_run.run_dir), "--choices", str(path)])
    with pytest.raises(SystemExit, match=r"error: .*missing\.jsonl: cannot read"):
        main(["--ckpt", str(tiny_run.run_dir), "--choices", str(tmp_path / "missing.jsonl")])
