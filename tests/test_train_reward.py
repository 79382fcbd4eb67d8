"""The reward model end to end through the CLI: the pairwise loss on fixed tensors, pinned and
falling losses with held-out accuracy, exact resume after a kill, transformers' sequence
classification loading the checkpoint with the same scores (pooled at the final <|im_end|>),
`reward score`, fine-tuning from a reward checkpoint, and torchrun matching one process."""

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, run_until_killed

import qwenkit
from qwenkit.cli import main
from qwenkit.data.synthetic import chat_samples
from qwenkit.train.preference_data import load_preference_pairs
from qwenkit.train.reward import (
    collate_pairs,
    load_reward_model,
    pairwise_loss,
    reward_model_from,
    score_pairs,
)

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["--train.micro_batch_size", "4", "--train.lr", "2e-3", "--train.warmup_steps", "2", "--log.progress",
            "false", "--data.max_len", "256", "--data.epochs", "null", "--train.device", "cpu",
            "--eval.batches", "2"]  # fmt: skip


def preference_rows(count: int, seed: int) -> list[dict]:
    """Calm answers are preferred over SHOUTED ones (a preference a tiny model learns in a few steps)."""
    rows = []
    for sample in chat_samples(count, seed=seed):
        question, answer = (m["content"] for m in sample["messages"])
        rows.append({"prompt": question, "chosen": answer, "rejected": answer.upper().rstrip(".") + "!!!"})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, byte_tokenizer) -> Path:
    """A tiny base model with a byte-level vocabulary, and generated training and held-out pairs."""
    directory = tmp_path_factory.mktemp("reward")
    qwenkit.save(make_tiny_model(vocab_size=512, num_hidden_layers=1), byte_tokenizer, directory / "base")
    for name, count, seed in (("train", 96, 0), ("held", 16, 1)):
        rows = preference_rows(count, seed)
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def reward(setup: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["reward", "--config", str(ROOT / "configs" / "reward" / "demo.yaml"),
            "--model", str(model or setup / "base"), "--data", str(setup / "train.jsonl"),
            "--eval-data", str(setup / "held.jsonl"), "--out", str(out), *SETTINGS, *extra]  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pairwise_loss_on_fixed_tensors():
    chosen = torch.tensor([1.5, -0.25, 2.0, 0.0])
    rejected = torch.tensor([0.5, 0.75, -1.0, 0.0])
    loss, extra = pairwise_loss(chosen, rejected)
    differences = [1.0, -1.0, 3.0, 0.0]
    expected = sum(math.log1p(math.exp(-d)) for d in differences) / 4  # -log sigmoid(d) = log(1 + e^-d)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(extra["accuracy"]) == 0.5  # a tie is not a win
    assert float(extra["margin"]) == pytest.approx(0.75)
    chosen.requires_grad_(True)
    pairwise_loss(chosen, rejected)[0].backward()
    sigmoid = [1 / (1 + math.exp(d)) for d in differences]  # d/dc of -log sigmoid(c - r) = -sigmoid(r - c)
    torch.testing.assert_close(chosen.grad, torch.tensor([-s / 4 for s in sigmoid]))


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory) -> Path:
    """Half an epoch of the 96 training pairs, 4 a step: 12 steps, evaluated and saved every 6."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert (
        main(reward(setup, out, "--data.epochs", "0.5", "--eval.every", "6", "--checkpoint.every", "6")) == 0
    )
    return out


def test_reward_training_pinned_falling_and_held_out_accuracy(trained):
    out = trained
    log = records(out)
    assert len(log) == 12  # data.epochs set train.max_steps
    assert [r["loss"] for r in log[:3]] == pytest.approx(
        [0.6882, 0.6519, 0.5596], abs=2e-3
    )  # CPU, fp32, seed 0
    assert {"accuracy", "margin"} <= set(log[0])
    evaluated = [r for r in log if "val_accuracy" in r]
    assert [r["step"] for r in evaluated] == [6, 12]
    assert evaluated[-1]["val_loss"] < 0.4 and evaluated[-1]["val_accuracy"] == 1.0
    assert evaluated[-1]["val_margin"] > evaluated[0]["val_margin"] > 0
    assert (out / "loss.png").is_file() and (out / "accuracy.png").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000012"


def test_resume_after_a_kill_is_exact(setup, tmp_path):
    settings = ["--train.max_steps", "6", "--checkpoint.every", "2", "--log.every", "1", "--eval.every", "3"]
    reference = tmp_path / "reference"
    assert main(reward(setup, reference, *settings)) == 0
    interrupted = tmp_path / "interrupted"
    run_until_killed(reward(setup, interrupted, *settings), interrupted, after_step=3)
    assert not (interrupted / "checkpoints" / "step-0000006").exists()
    assert main(reward(setup, interrupted, *settings)) == 0
    assert learned(records(interrupted)) == learned(records(reference))


def learned(log: list[dict]) -> list[dict]:
    """What a run learned, step by step (not its speed)."""
    keys = ("step", "loss", "accuracy", "margin", "lr", "grad_norm", "val_loss", "val_accuracy", "val_margin")
    return [{k: r[k] for k in keys if k in r} for r in log]


def test_transformers_loads_the_checkpoint_with_the_same_scores(
    setup, trained, tmp_path, byte_tokenizer, capsys
):
    from transformers import AutoModelForSequenceClassification

    out = trained
    checkpoint = out / "checkpoints" / "step-0000012"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["pad_token_id"] == byte_tokenizer.pad_id != byte_tokenizer.im_end_id
    model, tokenizer = load_reward_model(out)  # a run directory: its latest checkpoint
    pairs, _ = load_preference_pairs(setup / "held.jsonl", tokenizer, 256)
    ids, last = collate_pairs(pairs[:6], tokenizer.pad_id)  # right-padded, rows of different lengths
    assert len(set(last.tolist())) > 1
    assert (ids.gather(1, last[:, None]) == tokenizer.im_end_id).all()  # every row ends at <|im_end|>
    mask = (torch.arange(ids.shape[1])[None] <= last[:, None]).long()
    hf = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ours = model.rewards(ids, mask)
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits.squeeze(-1), ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf(ids).logits.squeeze(-1), ours, atol=1e-4, rtol=0)  # pooled by pad id
        alone = torch.stack([model.rewards(ids[r : r + 1, : n + 1], mask[r : r + 1, : n + 1])[0]
                             for r, n in enumerate(last.tolist())])  # fmt: skip
        torch.testing.assert_close(alone, ours, atol=1e-5, rtol=0)  # padding changes no score
        ours_loss, ours_extra = pairwise_loss(*ours.chunk(2))
        theirs_loss, theirs_extra = trl_reward_loss(hf, ids, mask)
    assert float(ours_loss) == pytest.approx(theirs_loss, abs=1e-5)
    assert float(ours_extra["accuracy"]) == theirs_extra["accuracy"]
    assert float(ours_extra["margin"]) == pytest.approx(theirs_extra["margin"], abs=1e-5)
    scores = score_pairs(model, pairs, tokenizer.pad_id, batch_size=4, progress=False)
    assert [c for c, _ in scores[:6]] == pytest.approx(ours[:6].tolist(), abs=1e-5)

    written = tmp_path / "scores.jsonl"
    argv = ["reward", "score", "--model", str(checkpoint), "--data", str(setup / "held.jsonl"), "--out",
            str(written), "--max-len", "256", "--batch-size", "5"]  # fmt: skip
    assert main(argv) == 0
    accuracy = sum(c > r for c, r in scores) / len(scores)
    assert f"accuracy {accuracy:.4f} on 16 pairs" in capsys.readouterr().out
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 17))
    assert [x for r in rows for x in (r["chosen"], r["rejected"])] == pytest.approx(
        [x for pair in scores for x in pair], abs=1e-5
    )

    data = tmp_path / "held.jsonl"  # without --out: beside the data
    data.write_bytes((setup / "held.jsonl").read_bytes())
    assert (
        main(
            [
                "reward",
                "score",
                "--model",
                str(out),
                "--data",
                str(data),
                "--max-len",
                "256",
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    assert (tmp_path / "held.scores.jsonl").read_text() == written.read_text()

    continued, _ = reward_model_from(str(out), torch.device("cpu"))  # fine-tuning after PMP keeps the head
    torch.testing.assert_close(continued.score.weight, model.score.weight)


def trl_reward_loss(hf_model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, dict[str, float]]:
    """TRL's RewardTrainer.compute_loss on a batch of chosen rows then rejected rows, with the bare
    trainer state it reads (one process: gathering is the identity)."""
    from types import SimpleNamespace

    from trl import RewardTrainer

    trainer = SimpleNamespace(
        model=hf_model, args=SimpleNamespace(center_rewards_coefficient=None), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    loss = RewardTrainer.compute_loss(trainer, hf_model, {"input_ids": ids, "attention_mask": mask})
    logged = trainer._metrics["eval"]  # the model is in eval mode
    return float(loss), {"accuracy": logged["accuracy"][0], "margin": logged["margin"][0]}


def test_cli_mistakes_are_one_line_errors(setup, tmp_path, capsys):
    assert main(["reward", "--model", str(setup / "base"), "--data", str(setup / "train.jsonl")]) == 1
    assert "needs --out" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(reward(setup, tmp_path / "run", "--data.path", str(bad))) == 1
    assert "no usable preference pairs" in capsys.readouterr().err
    assert main(reward(setup, tmp_path / "run", "--data.path", str(bad), "--data.strict", "true")) == 1
    assert f"{bad}:1: missing 'chosen'" in capsys.readouterr().err
    assert main(["reward", "score", "--model", str(setup / "base"), "--data", str(setup / "held.jsonl")]) == 1
    assert "is not a reward model" in capsys.readouterr().err
    assert main(["reward", "score", "--model", str(setup / "base"), "--data", "x", "--batch-size", "z"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert main(["reward", "score", "--data", "x"]) == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err
    assert main(["reward", "score", "--config", "x.yaml", "--model", "m", "--data", "x"]) == 2
    assert "unrecognized arguments: --config x.yaml" in capsys.readouterr().err
    assert main(["reward", "score", "-h"]) == 0
    assert "usage: qwenkit reward score" in capsys.readouterr().out


def test_label_count_and_scores_over_the_data_are_one_line_errors(tmp_path, byte_tokenizer, capsys):
    from qwenkit.train.reward import RewardModel, save_reward_model

    directory = save_reward_model(
        RewardModel(make_tiny_model(vocab_size=512)), byte_tokenizer, tmp_path / "rm"
    )
    config = json.loads((directory / "config.json").read_text())
    for key in ("id2label", "label2id"):  # a config that gives only the count
        del config[key]
    (directory / "config.json").write_text(json.dumps({**config, "num_labels": 2}))
    with pytest.raises(qwenkit.QwenkitError, match="scores 2 labels; a reward model has one"):
        load_reward_model(directory)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    before = data.read_text()
    assert main(["reward", "score", "--model", str(directory), "--data", str(data), "--out", str(data)]) == 1
    assert "is the data file itself" in capsys.readouterr().err and data.read_text() == before


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(setup, tmp_path, strategy):
    settings = ["--train.max_steps", "3", "--train.distributed", strategy, "--log.every", "1"]
    single = tmp_path / "single"
    assert main(reward(setup, single, *settings, "--train.grad_accum", "2")) == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(29600 + os.getpid() % 1000), "-m", "qwenkit", *reward(setup, double, *settings)],
                   check=True, env=env, capture_output=True)  # fmt: skip
    for one, two in zip(records(single), records(double), strict=True):
        for key in ("loss", "accuracy", "margin"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), key
    for key in ("val_loss", "val_accuracy", "val_margin"):
        assert records(double)[-1][key] == pytest.approx(records(single)[-1][key], abs=1e-5)
    a, _ = load_reward_model(single)
    b, _ = load_reward_model(double)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)
