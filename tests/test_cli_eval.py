"""`qwenkit eval` (qwenkit.cli.eval): a full run on a tiny checkpoint writes the four outputs, --list
lists the registered tasks, usage mistakes exit 2 with one line."""

import json
import math

import pytest
import torch

from qwenkit.cli import main
from qwenkit.eval import TASKS


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "qwenkit-home"))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("the quick brown fox jumps over the lazy dog, " * 6)
    return path


def test_full_run_long_ppl(small_checkpoint, text, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "long-ppl", "--model", str(small_checkpoint), "--data", str(text), "--out", str(out),
            "--lengths", "32,64", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "long-ppl: perplexity " in stdout and "results written to" in stdout
    document = json.loads((out / "results.json").read_text())
    assert document["command"] == "qwenkit " + " ".join(args)
    assert document["model"]["path"] == str(small_checkpoint) and document["model"]["dtype"] == "float32"
    assert document["model"]["device"] == "cpu"
    task = document["tasks"]["long-ppl"]
    assert task["settings"]["lengths"] == [32, 64] and task["settings"]["batch_size"] == 2
    ppl = task["groups"]["setting@length"]
    assert len(ppl) == 8 and all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert task["metrics"]["perplexity"] == ppl["ntk+logn+window@64"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert (
        len(rows) == task["items"] and rows[0]["task"] == "long-ppl" and rows[0]["id"] == "plain@32/doc.txt:0"
    )
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| long-ppl | perplexity |" in (out / "report.md").read_text()

    # the plain setting's perplexity, computed from the loaded model's logits
    import qwenkit

    model, tokenizer = qwenkit.load(small_checkpoint)
    ids = tokenizer.encode(text.read_text())
    windows = [ids[k * 32 : (k + 1) * 32] for k in range(len(ids) // 32)]
    with torch.no_grad():
        logits = model(torch.tensor(windows)).double().log_softmax(-1)
    nll = -logits[:, :-1].gather(2, torch.tensor(windows)[:, 1:, None]).mean().item()
    assert ppl["plain@32"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_list(capsys):
    assert main(["eval", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == sorted(TASKS)
    assert {"long-ppl", "demo"} <= set(TASKS)
    assert any(line.startswith("long-ppl ") and "NTK" in line for line in listed)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["eval", "nonesuch", "--out", "X"], "unknown task 'nonesuch'"),
        (["eval", "--out", "X"], "name at least one task"),
        (["eval", "long-ppl"], "--out DIR is required"),
        (["eval", "long-ppl", "--data", "MISSING", "--out", "X"], "--data MISSING does not exist"),
        (["eval", "humaneval", "--samples", "MISSING.jsonl", "--out", "X"], "does not exist"),
        (["eval", "long-ppl", "long-ppl", "--out", "X"], "named twice"),
    ],
)
def test_usage_errors_exit_2(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwenkit: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "X").exists()


def test_task_errors_exit_1(small_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(
            [
                "eval",
                "long-ppl",
                "--model",
                str(small_checkpoint),
                "--data",
                str(empty),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("qwenkit: error: long-ppl: ") and "no .txt file" in err and err.count("\n") == 1
