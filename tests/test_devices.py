"""Device names and the "auto" choice that `qwenkit.load` and every `--device` option share."""

import pytest
import torch
from conftest import make_tiny_model

from qwenkit import load, save
from qwenkit.devices import check_device_name, pick_device
from qwenkit.errors import QwenkitError


def test_device_names():
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert check_device_name(name) == name
    for bad in ("gpu", "cuda:", "CPU", "cuda:x", "cpu:0", "", None, 0):
        with pytest.raises(QwenkitError, match="^device must be cpu, cuda or cuda:N"):
            check_device_name(bad)
    with pytest.raises(
        QwenkitError, match=r"^train.device must be cpu, cuda or cuda:N \(or auto\), got 'gpu'"
    ):
        check_device_name("gpu", "train.device")


def test_auto_picks_cuda_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(QwenkitError, match="device cuda was asked for but no CUDA GPU is available"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(QwenkitError, match="device cuda:2 was asked for but only 2 GPUs exist"):
        pick_device("cuda:2")
    with pytest.raises(QwenkitError, match="got 'gpu'"):
        pick_device("gpu")


def test_load_auto_on_a_machine_without_gpu(tmp_path, byte_tokenizer, monkeypatch):
    """ "auto" is what the CLI always chose: cpu without a GPU, and there float32 whatever is stored."""
    model = make_tiny_model(vocab_size=512, num_hidden_layers=1)
    path = save(model, byte_tokenizer, tmp_path / "ckpt", dtype="bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded, _ = load(path, device="auto", dtype="auto")
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    with pytest.raises(QwenkitError, match="no CUDA GPU"):
        load(path, device="cuda")
