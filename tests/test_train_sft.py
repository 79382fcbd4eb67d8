"""SFT end to end through the CLI: full and LoRA, pinned losses, falling loss, exact resume after a
kill, adapters that load with peft onto transformers' Qwen2, and data errors."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, run_until_killed, to_transformers

import qwenkit
from qwenkit.cli import main
from qwenkit.data.synthetic import chat_samples

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["--train.micro_batch_size", "8", "--train.lr", "3e-3", "--train.warmup_steps", "2",
            "--log.progress", "false", "--data.max_len", "256"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, byte_tokenizer) -> Path:
    """A tiny base model with a byte-level vocabulary, and generated chat data."""
    directory = tmp_path_factory.mktemp("sft")
    qwenkit.save(make_tiny_model(vocab_size=512), byte_tokenizer, directory / "base")
    with open(directory / "chat.jsonl", "w") as f:
        for sample in chat_samples(200):
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return directory


def sft(setup: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["sft", "--config", str(ROOT / "configs" / "sft" / "qwen-chat.yaml"), "--model", str(setup / "base"),
            "--data", str(setup / "chat.jsonl"), "--out", str(out), "--method", method,
            "--train.distributed", "ddp", "--train.activation_checkpointing", "false", "--train.grad_accum", "1",
            *SETTINGS, *extra]  # fmt: skip


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method, pinned", [("full", [6.2370, 6.0065, 5.8343]), ("lora", [6.2370, 6.2003, 6.1611])]
)
def test_sft_pinned_and_falling_losses(setup, tmp_path, method, pinned):
    out = tmp_path / method
    assert main(sft(setup, out, method, "--train.max_steps", "20", "--log.every", "1")) == 0
    curve = losses(out)
    assert curve[:3] == pytest.approx(pinned, abs=2e-3)  # pinned on CPU, fp32, seed 0
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - (1.0 if method == "full" else 0.1)


def test_lora_resume_after_a_kill_is_exact(setup, tmp_path):
    settings = ["--train.max_steps", "10", "--checkpoint.every", "2", "--log.every", "1"]
    reference = tmp_path / "reference"
    assert main(sft(setup, reference, "lora", *settings)) == 0
    interrupted = tmp_path / "interrupted"
    run_until_killed(sft(setup, interrupted, "lora", *settings), interrupted, after_step=5)
    assert not (interrupted / "checkpoints" / "step-0000010").exists()
    assert main(sft(setup, interrupted, "lora", *settings)) == 0
    assert losses(interrupted) == losses(reference)


def test_sft_adapter_loads_in_qwenkit_and_onto_transformers(setup, tmp_path):
    import peft

    out = tmp_path / "lora"
    assert main(sft(setup, out, "lora", "--train.max_steps", "4")) == 0
    adapter = out / "checkpoints" / "step-0000004" / "adapter"
    ids = torch.tensor([[72, 105, 33, 256, 257, 258]])
    base, _ = qwenkit.load(setup / "base")
    adapted = qwenkit.load(setup / "base", adapter=adapter)[0]
    hf = peft.PeftModel.from_pretrained(to_transformers(base), str(adapter)).eval()
    with torch.no_grad():
        assert (adapted(ids) - base(ids)).abs().max() > 1e-4  # the adapter changed something
        torch.testing.assert_close(hf(ids).logits, adapted(ids), atol=1e-4, rtol=0)


def test_malformed_samples_are_skipped_or_fail_with_strict(setup, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    good = json.dumps(chat_samples(1)[0])
    data.write_text(
        "\n".join([good, "{broken", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), good] * 8)
    )
    argv = [*sft(setup, tmp_path / "run", "full", "--train.max_steps", "1"), "--data.path", str(data)]
    assert main(argv) == 0
    assert "16 samples, 16 skipped" in capsys.readouterr().out
    assert main([*argv, "--data.strict", "true"]) == 1
    assert "sample 1" in capsys.readouterr().err
    assert main(sft(setup, tmp_path / "x", "full", "--data.mask", "weird")) == 1


@pytest.mark.parametrize(
    "path",
    sorted(
        p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "data"
    ),  # data: test_data_pipeline
    ids=lambda p: p.parent.name + "/" + p.name,
)
def test_every_shipped_recipe_parses(path):
    from qwenkit.train.dpo import DPORecipe
    from qwenkit.train.ppo import PPORecipe
    from qwenkit.train.pretrain import PretrainRecipe
    from qwenkit.train.reward import RewardRecipe
    from qwenkit.train.settings import load_recipe
    from qwenkit.train.sft import SFTRecipe

    relative = path.relative_to(ROOT / "configs")
    recipes = {"reward": RewardRecipe, "ppo": PPORecipe, "dpo": DPORecipe}  # configs/<verb>/ -> its recipe
    sft = "sft" in str(relative)
    recipe = load_recipe(recipes.get(relative.parts[0], SFTRecipe if sft else PretrainRecipe), path, [])
    assert recipe.train.max_steps > 0 and recipe.train.lr > 0


def test_packing_gives_the_padded_losses(setup, tmp_path):
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert main(sft(setup, padded, "full", "--train.max_steps", "3", "--log.every", "1")) == 0
    argv = sft(setup, packed, "full", "--train.max_steps", "3", "--log.every", "1", "--data.packing", "true")
    assert main(argv) == 0
    assert losses(packed) == pytest.approx(losses(padded), abs=1e-4)


def test_pack_conversations_layout():
    from qwenkit.train.sft import pack_conversations
    from qwenkit.train.sft_data import Conversation

    samples = [Conversation([1, 2, 3], [-100, 2, 3]), Conversation([4, 5, 6, 7, 8], [-100, -100, 6, 7, 8]),
               Conversation([9, 10], [-100, 10])]  # fmt: skip
    inputs, labels, segments = pack_conversations(samples, pad_id=0, max_len=8)
    # longest first: row 0 = [4..8] + [1, 2, 3] (8 tokens), row 1 = [9, 10] padded
    assert inputs.tolist() == [[4, 5, 6, 7, 8, 1, 2], [9, 10, 0, 0, 0, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7, 8, -100, 2, 3], [10, -100, -100, -100, -100, -100, -100]]
    assert segments.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, -1, -1, -1, -1, -1]]


def test_qlora_trains_an_adapter_for_the_full_precision_base(setup, tmp_path, capsys):
    lora, qlora = tmp_path / "lora", tmp_path / "qlora"
    assert main(sft(setup, lora, "lora", "--train.max_steps", "12", "--log.every", "1")) == 0
    lora_report = capsys.readouterr().out
    assert main(sft(setup, qlora, "qlora", "--train.max_steps", "12", "--log.every", "1")) == 0
    qlora_report = capsys.readouterr().out

    def weights_mb(report):
        return float(report.split("MB of weights")[0].split()[-1])

    assert weights_mb(qlora_report) < weights_mb(lora_report)  # the projections are stored in 4 bits
    curve = losses(qlora)
    assert sum(curve[-3:]) < sum(curve[:3])
    assert curve[0] == pytest.approx(losses(lora)[0], abs=0.05)  # NF4 barely changes the start
    adapter = qlora / "checkpoints" / "step-0000012" / "adapter"
    base, _ = qwenkit.load(setup / "base")
    adapted, _ = qwenkit.load(setup / "base", adapter=adapter)  # merged onto the fp32 base
    ids = torch.tensor([[72, 105, 33, 256]])
    with torch.no_grad():
        assert (adapted(ids) - base(ids)).abs().max() > 1e-4


def test_sft_runs_the_shared_setup_compile_checkpointing_and_split_evaluation(setup, tmp_path, monkeypatch):
    """The shared loop's settings reach fine-tuning too, LoRA's wrapped network included, and its
    held-out evaluation is shared between processes (`Distributed.share`) and honours eval.batches."""
    import peft
    import torch.utils.checkpoint

    from qwenkit.train.distributed import Distributed

    compiled, recomputed, shared = [], [], []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(model) or model)
    checkpoint, share = torch.utils.checkpoint.checkpoint, Distributed.share

    def counted(*args, **kwargs):
        recomputed.append(args[0])
        return checkpoint(*args, **kwargs)

    def recorded(env, count):
        shared.append(count)
        return share(env, count)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    monkeypatch.setattr(Distributed, "share", recorded)
    settings = ["--train.max_steps", "1", "--train.compile", "true", "--train.activation_checkpointing", "true",
                "--data.val_fraction", "0.25", "--eval.batches", "2"]  # fmt: skip
    out = tmp_path / "lora"
    assert main(sft(setup, out, "lora", *settings)) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], peft.PeftModel)
    layers = qwenkit.load(setup / "base")[0].config.num_hidden_layers
    assert len(recomputed) == layers  # each block of the one micro-batch, recomputed in backward
    assert shared == [2]  # 2 of the 7 batches of 50 held-out conversations
    assert "val_loss" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
