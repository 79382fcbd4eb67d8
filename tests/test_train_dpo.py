"""DPO: the loss and its metrics against TRL's DPOTrainer on the same tiny models and pairs, and the
recipe end to end through the CLI (first loss log 2, falling loss, exact resume, LoRA with the
adapter-off reference, two gloo processes matching one)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, run_until_killed

import qwenkit
from qwenkit.cli import main
from qwenkit.train.dpo import DPOSample, collate_pairs, dpo_loss, make_sample, sequence_logps
from qwenkit.train.preference_data import load_preference_pairs

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [  # (prompt, chosen, rejected) token ids
    ([1, 2, 3, 4], [5, 6, 7], [8, 9]),
    ([10, 11], [12], [13, 14, 15, 16]),
    ([20, 21, 22], [23, 24, 25, 26, 27], [28, 29, 30]),
]


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory, byte_tokenizer):
    """TRL's DPOTrainer over transformers' Qwen2 copies of two different tiny qwenkit models (policy and
    reference), and the qwenkit models themselves."""
    pytest.importorskip("trl")
    import transformers
    import trl
    from datasets import Dataset

    directory = tmp_path_factory.mktemp("dpo-trl")
    models = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        qwenkit.save(make_tiny_model(vocab_size=512, seed=seed), byte_tokenizer, directory / name)
        models[name] = qwenkit.load(directory / name)[0]
    hf = {name: transformers.AutoModelForCausalLM.from_pretrained(directory / name, dtype=torch.float32)
          for name in models}  # fmt: skip
    args = trl.DPOConfig(output_dir=str(directory / "trl"), report_to=[], use_cpu=True, bf16=False, beta=0.3,
                         per_device_train_batch_size=len(PAIRS))  # fmt: skip
    trainer = trl.DPOTrainer(model=hf["policy"], ref_model=hf["reference"], args=args,
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                             processing_class=transformers.AutoTokenizer.from_pretrained(directory / "policy"))  # fmt: skip
    return trainer, models


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_metrics_match_trl(trl_trainer, loss_type):
    trainer, models = trl_trainer
    beta = 0.3
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    expected = trainer._compute_loss(trainer.model, trainer.data_collator(rows), False).detach()
    logged = {k: v[-1] for mode in ("train", "eval") for k, v in trainer._metrics[mode].items() if v}

    samples = [DPOSample(p + c, [-100] * len(p) + c, p + r, [-100] * len(p) + r) for p, c, r in PAIRS]
    ids, targets = collate_pairs(samples, pad_id=0)
    with torch.no_grad():
        logps, tokens = sequence_logps(models["policy"](ids), targets)
        reference = sequence_logps(models["reference"](ids), targets)[0]
    n = len(PAIRS)
    loss, metrics = dpo_loss(logps[:n], logps[n:], reference[:n], reference[n:], beta, loss_type,
                             chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])  # fmt: skip
    assert (
        abs(float(expected) - math.log(2)) > 1e-3
    )  # different policy and reference: a loss that says something
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    for ours, theirs in [("chosen_reward", "rewards/chosen"), ("rejected_reward", "rewards/rejected"),
                         ("accuracy", "rewards/accuracies"), ("margin", "rewards/margins")]:  # fmt: skip
        assert float(metrics[ours]) == pytest.approx(logged[theirs], abs=1e-5), ours


def test_label_smoothing_is_conservative_dpo():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    beta, eps = 0.5, 0.2
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=eps)
    z = [
        beta * ((c - rc) - (r - rr))
        for c, r, rc, rr in zip([-3, -5], [-4, -2], [-3.5, -4], [-3, -2.5], strict=True)
    ]
    p = [1 / (1 + math.exp(-x)) for x in z]  # the model's probability that the label is right
    expected = sum(-(1 - eps) * math.log(q) - eps * math.log(1 - q) for q in p) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(dpo_loss(chosen, rejected, chosen, rejected, beta)[0]) == pytest.approx(math.log(2))


def test_collate_puts_chosen_rows_first_and_learns_no_padding():
    samples = [DPOSample([1, 2, 3], [-100, 2, 3], [1, 4], [-100, 4], (-1.0, -2.0)),
               DPOSample([5, 6], [-100, 6], [5, 7, 8, 9], [-100, -100, 8, 9], (-3.0, -4.0))]  # fmt: skip
    ids, targets, reference = collate_pairs(samples, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [5, 6, 0], [1, 4, 0], [5, 7, 8]]
    assert targets.tolist() == [[2, 3, -100], [6, -100, -100], [4, -100, -100], [-100, 8, 9]]
    assert reference.tolist() == [-1.0, -3.0, -2.0, -4.0]


# --- the recipe through the CLI -----------------------------------------------------------------------

SETTINGS = ["--train.micro_batch_size", "4", "--train.lr", "2e-4", "--train.warmup_steps", "0",
            "--train.decay", "constant", "--train.device", "cpu", "--log.progress", "false",
            "--data.max_len", "128", "--eval.batches", "2", "--dpo.beta", "0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, byte_tokenizer) -> Path:
    """A tiny model with a byte-level vocabulary, and pairs that prefer a reply ending in '!' in all three
    of TRL's layouts (standard, conversational, implicit prompt; one with its own system prompt)."""
    directory = tmp_path_factory.mktemp("dpo")
    qwenkit.save(make_tiny_model(vocab_size=512), byte_tokenizer, directory / "base")
    rows = []
    for k in range(24):
        question, good, bad = f"Say {k}", f"{k} is fine!", f"{k}, I guess."
        rows.append({"prompt": question, "chosen": good, "rejected": bad})
        user = [{"role": "user", "content": question}]
        rows.append({"prompt": [{"role": "system", "content": "Be brief."}, *user],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})  # fmt: skip
        rows.append({"chosen": [*user, {"role": "assistant", "content": good}],
                     "rejected": [*user, {"role": "assistant", "content": bad}]})  # fmt: skip
    (directory / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:60]) + "\n")
    (directory / "held.jsonl").write_text("\n".join(json.dumps(r) for r in rows[60:]) + "\n")
    return directory


def dpo(setup: Path, out: Path, *extra: str) -> list[str]:
    return ["dpo", "--config", str(ROOT / "configs" / "dpo" / "demo.yaml"), "--model", str(setup / "base"),
            "--data", str(setup / "pairs.jsonl"), "--eval-data", str(setup / "held.jsonl"), "--out", str(out),
            *SETTINGS, *extra]  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_log_2_learns_the_preference_and_loads(setup, tmp_path):
    out = tmp_path / "full"
    assert main(dpo(setup, out, "--train.max_steps", "10", "--log.every", "1")) == 0
    log = records(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert log[0]["margin"] == pytest.approx(0.0, abs=1e-6) and log[0]["accuracy"] == 0.0
    assert [r["loss"] for r in log[1:3]] == pytest.approx([0.4681, 0.3077], abs=2e-3)  # pinned: CPU, fp32
    assert log[-1]["loss"] < 0.2 and log[-1]["accuracy"] == 1.0 and log[-1]["margin"] > 1.0
    assert log[-1]["val_accuracy"] == 1.0 and log[-1]["val_loss"] < 0.3  # held-out pairs too
    assert log[-1]["chosen_reward"] > log[-1]["rejected_reward"]
    assert (out / "loss.png").is_file()
    # the checkpoint loads, and on held-out pairs it prefers the chosen replies more than the base did
    tuned, tokenizer = qwenkit.load(out / "checkpoints" / "step-0000010")
    base = qwenkit.load(setup / "base")[0]
    pairs = load_preference_pairs(setup / "held.jsonl", tokenizer, 128)[0]
    ids, targets = collate_pairs([make_sample(p) for p in pairs], tokenizer.pad_id)
    with torch.no_grad():
        gaps = [sequence_logps(m(ids), targets)[0].view(2, -1) for m in (base, tuned)]
    assert ((gaps[1][0] - gaps[1][1]) > (gaps[0][0] - gaps[0][1])).all()


def test_resume_after_a_kill_is_exact(setup, tmp_path):
    settings = ["--train.max_steps", "8", "--checkpoint.every", "2", "--log.every", "1"]
    reference = tmp_path / "reference"
    assert main(dpo(setup, reference, *settings)) == 0
    interrupted = tmp_path / "interrupted"
    run_until_killed(dpo(setup, interrupted, *settings), interrupted, after_step=5)
    assert not (interrupted / "checkpoints" / "step-0000008").exists()
    assert main(dpo(setup, interrupted, *settings)) == 0
    assert [r["loss"] for r in records(interrupted)] == [r["loss"] for r in records(reference)]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reference_each_step_equals_the_precomputed_one(setup, tmp_path, method):
    """Per step, the reference is a frozen copy (full) or the model with its adapter off (LoRA: no copy);
    both give the losses of the log-probs computed once before training."""
    settings = ["--train.max_steps", "4", "--log.every", "1", "--method", method, "--train.lr", "1e-3"]
    curves = []
    for precompute in ("true", "false"):
        out = tmp_path / precompute
        assert main(dpo(setup, out, *settings, "--dpo.precompute_reference", precompute)) == 0
        curves.append([r["loss"] for r in records(out)])
    assert curves[0][0] == pytest.approx(math.log(2), abs=1e-6) and curves[0][-1] < curves[0][0] - 0.05
    assert curves[1] == pytest.approx(curves[0], abs=1e-5)
    if method == "lora":
        assert (
            tmp_path / "true" / "checkpoints" / "step-0000004" / "adapter" / "adapter_config.json"
        ).is_file()


def test_two_gloo_processes_match_one(setup, tmp_path):
    settings = [
        "--train.max_steps",
        "3",
        "--log.every",
        "1",
        "--eval.batches",
        "3",
        "--train.micro_batch_size",
        "2",
    ]
    single = tmp_path / "single"
    assert main(dpo(setup, single, *settings, "--train.grad_accum", "2")) == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(29500 + os.getpid() % 1000 + 7), "-m", "qwenkit", *dpo(setup, double, *settings)],
                   check=True, env=env, capture_output=True)  # fmt: skip
    for one, two in zip(records(single), records(double), strict=True):
        for key in ("loss", "accuracy", "margin", "chosen_reward"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), key
    assert records(double)[-1]["val_loss"] == pytest.approx(records(single)[-1]["val_loss"], abs=1e-5)


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n{broken\n')
    assert main(dpo(setup, tmp_path / "a", "--data", str(bad))) == 1
    assert "no usable preference pairs" in capsys.readouterr().err
    assert main(dpo(setup, tmp_path / "b", "--data", str(bad), "--data.strict", "true")) == 1
    assert "bad.jsonl:1: missing 'rejected'" in capsys.readouterr().err
    assert main(dpo(setup, tmp_path / "c", "--dpo.loss", "kto")) == 1
    assert "dpo.loss must be one of" in capsys.readouterr().err
