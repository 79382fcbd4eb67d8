"""`qwenkit arena` (qwenkit.cli.arena): answers generated once through the command, the page served
by the real command and ratings surviving its restart, report and export files, the export training
`qwenkit reward`, and user mistakes as one-line errors."""

import json
import math
import socket
import subprocess
import sys
import time

import httpx
import pytest
from test_arena_ratings import rated_store

import qwenkit
from qwenkit.arena.store import ArenaStore
from qwenkit.cli import main

PROMPTS = [{"prompt": "What is the capital of France?", "category": "facts"}, {"prompt": "Name a colour."}]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def models(small_checkpoint) -> list[str]:
    return ["--models", f"demo={qwenkit.default_model_path()}", f"small={small_checkpoint}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], port: int) -> subprocess.Popen:
    """`qwenkit arena ... --port` in a process of its own, once its page answers."""
    process = subprocess.Popen([sys.executable, "-m", "qwenkit", "arena", *args, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("qwenkit arena did not start serving")


def test_generate_once_serve_restart_and_resume(tmp_path, prompts, small_checkpoint, capsys):
    db = tmp_path / "arena.db"
    args = [*models(small_checkpoint), "--prompts", str(prompts), "--db", str(db), "--max-new-tokens", "8"]
    assert main(["arena", *args, "--generate-only"]) == 0
    err = capsys.readouterr().err
    assert "demo: 2 answers generated, 0 reused" in err and "small: 2 answers generated, 0 reused" in err
    answers = {p.id: ArenaStore(db).answers(p.id) for p in ArenaStore(db).prompts()}
    assert all(set(a) == {"demo", "small"} for a in answers.values())

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(["--db", str(db), *models(small_checkpoint)], port)  # no --prompts: the stored ones
    try:
        assert "qwenkit arena" in httpx.get(url).text
        shown = httpx.post(f"{url}/api/next", json={"rater": "ann"}).json()
        rated = httpx.post(f"{url}/api/rate", json={"rater": "ann", "id": shown["id"], "verdict": "left"})
        assert rated.json()["progress"] == {"rated": 1, "total": 2}
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert "0 answers generated, 2 reused" in output  # nothing generated again
    assert {p.id: ArenaStore(db).answers(p.id) for p in ArenaStore(db).prompts()} == answers

    process = serve(["--db", str(db), *models(small_checkpoint)], port)
    try:
        following = httpx.post(f"{url}/api/next", json={"rater": "ann"}).json()
        assert following["progress"] == {"rated": 1, "total": 2} and following["id"] != shown["id"]
    finally:
        process.terminate()
        process.communicate(timeout=60)
    assert [(r.rater, r.verdict) for r in ArenaStore(db).ratings()] == [("ann", "left")]


def test_report_and_export_train_the_reward_model(tmp_path, capsys):
    db = tmp_path / "ratings.db"
    rated_store(db)
    assert (
        main(["arena", "report", "--db", str(db), "--out", str(tmp_path / "report"), "--rounds", "20"]) == 0
    )
    out = capsys.readouterr().out
    assert "| alpha vs beta | 7 | 2 | 1 | 2 | 70.8% |" in out and "## Category: chat" in out
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"report.json", "report.md", "ratings.png"}

    pairs = tmp_path / "pairs.jsonl"
    assert main(["arena", "export", "--db", str(db), "--out", str(pairs)]) == 0
    assert "28 preference pairs" in capsys.readouterr().out
    run = tmp_path / "rm"
    args = ["reward", "--model", str(qwenkit.default_model_path()), "--data", str(pairs), "--out", str(run),
            "--train.max_steps", "1", "--train.micro_batch_size", "2", "--train.device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert "28 pairs, 0 skipped" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(m.get("loss", math.nan)) for m in metrics)


def test_user_mistakes_are_one_line_errors(tmp_path, prompts, small_checkpoint, capsys):
    db = str(tmp_path / "a.db")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    demo = f"demo={qwenkit.default_model_path()}"
    cases = {
        "unknown model b=": [
            "arena",
            "--models",
            demo,
            f"b={tmp_path / 'nope'}",
            "--prompts",
            str(prompts),
            "--db",
            db,
        ],
        "holds no prompts": ["arena", *models(small_checkpoint), "--prompts", str(empty), "--db", db],
        "give the models": ["arena", "--prompts", str(prompts), "--db", db],
        "--db FILE": ["arena", *models(small_checkpoint), "--prompts", str(prompts)],
        "no prompts yet": ["arena", *models(small_checkpoint), "--db", db],
        "--port must be": ["arena", *models(small_checkpoint), "--db", db, "--port", "0"],
        "does not exist": ["arena", "report", "--db", str(tmp_path / "missing.db")],
        "no ratings yet": ["arena", "report", "--db", db],
        "is a folder": ["arena", "export", "--db", db, "--out", str(tmp_path)],
    }
    for message, args in cases.items():
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("qwenkit: error: ") and message in err and err.count("\n") == 1, err
    assert main(["arena", "export", "--db", db]) == 2  # argparse: --out is required
