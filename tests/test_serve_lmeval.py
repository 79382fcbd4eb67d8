"""lm-evaluation-harness against `qwenkit serve`: the same small local tasks (tests/data/lmeval) run
with lm-eval's `local-completions` model on the live server and with its `hf` model (transformers)
on the same checkpoint give the same accuracies and per-answer log-likelihoods. Offline: the task
data is a local JSONL file and the tokenizer is the checkpoint's tokenizer.json."""

import json
import os
import shutil

import pytest
from conftest import LiveServer

import qwenkit
from qwenkit.serve.api import create_app

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lmeval")


@pytest.fixture(scope="module")
def lm_eval_offline(tmp_path_factory):
    """lm-eval's evaluator, run offline from the task directory (whose YAML names its data file)."""
    cache = tmp_path_factory.mktemp("hf_datasets")
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache))
    evaluator = pytest.importorskip("lm_eval.evaluator")
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(DATA)
    try:
        yield evaluator, TaskManager(include_path=DATA)
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The embedded demo model, with no max_new_tokens in generation_config.json (older saves wrote
    512 there, which transformers applies over lm-eval's own limit)."""
    path = tmp_path_factory.mktemp("demo") / "demo"
    shutil.copytree(qwenkit.default_model_path(), path)
    config = json.loads((path / "generation_config.json").read_text())
    config.pop("max_new_tokens", None)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_lm_eval_through_the_server_equals_lm_eval_on_transformers(lm_eval_offline, demo_checkpoint):
    evaluator, tasks = lm_eval_offline
    path = demo_checkpoint
    model, tokenizer = qwenkit.load(path, device="cpu", dtype="float32")
    live = LiveServer(create_app(model, tokenizer, "demo", max_batch=4))
    names = ["qwenkit_tiny_mc", "qwenkit_tiny_gen"]
    try:
        served = evaluator.simple_evaluate(
            model="local-completions",
            model_args={
                "model": "demo",
                "base_url": f"{live.url}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(path),
                "max_retries": 1,
                "max_length": 1024,
            },  # fmt: skip
            tasks=names,
            task_manager=tasks,
            batch_size=20,  # more than 16 prompts a request: they queue in the engine
            log_samples=True,
        )
    finally:
        live.stop()
    reference = evaluator.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(path), "dtype": "float32", "device": "cpu"},
        tasks=names,
        task_manager=tasks,
        batch_size=20,
        log_samples=True,
    )
    mc, ref_mc = served["results"]["qwenkit_tiny_mc"], reference["results"]["qwenkit_tiny_mc"]
    assert mc["acc,none"] == ref_mc["acc,none"] and mc["acc_norm,none"] == ref_mc["acc_norm,none"]
    ours = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in served["samples"]["qwenkit_tiny_mc"]}
    theirs = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in reference["samples"]["qwenkit_tiny_mc"]}
    assert len(ours) == 32 and ours.keys() == theirs.keys()
    for doc in ours:
        assert ours[doc] == pytest.approx(theirs[doc], abs=1e-4)
    gen = {s["doc_id"]: s["resps"][0][0] for s in served["samples"]["qwenkit_tiny_gen"]}
    ref_gen = {s["doc_id"]: s["resps"][0][0] for s in reference["samples"]["qwenkit_tiny_gen"]}
    assert gen == ref_gen and len(set(gen.values())) > 1
