"""The `qwenkit` command on a tiny checkpoint: chat REPL, generate, convert, info, the error path
(every verb given bad input answers one line), and the HTTP surface `qwenkit serve` exposes.

Most tests call `main([...])` in-process (fast); two run `python -m qwenkit` to prove the entry
point, exit codes, stderr and piped stdin.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwenkit import Qwen, QwenConfig, load
from qwenkit.cli import build_parser, main
from qwenkit.cli.common import format_count


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Never build or read the default model in the user's real cache."""
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "qwenkit-home"))


def run_chat(monkeypatch, capsys, args: list[str], lines: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 1
    assert err.startswith("qwenkit: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err


def test_every_verb_has_help_with_examples(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    verbs = build_parser()._subparsers._group_actions[0].choices
    for verb in verbs:
        assert verb in top
        assert main([verb, "--help"]) == 0
        assert "examples:\n  qwenkit " + verb in capsys.readouterr().out


def test_chat_repl_commands(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    code, out, err = run_chat(
        monkeypatch,
        capsys,
        ["--model", str(tiny_checkpoint)],
        [
            ":seed 7",
            ":conf max_new_tokens=8",
            "What is the capital of France?",
            ":history",
            ":conf top_p=0.5",
            f":conf top_p=__import__('pathlib').Path({str(marker)!r}).touch()",
            ":conf nope=1",
            ":conf temperature='hot'",
            ":conf top_p=2",
            ":bogus",
            ":cl",
            ":h",
            ":conf",
            ":clear-history",
            ":his",
            ":exit",
            "this line is never read as a question",
        ],
    )
    assert code == 0 and err == ""
    assert "seed: 7" in out
    assert "[1] User> What is the capital of France?\n    Assistant> " in out
    assert "  top_p = 0.5\n" in out
    assert not marker.exists()  # the value was parsed as a literal, never evaluated
    assert "is not a literal value" in out
    assert "unknown setting 'nope'" in out
    assert "temperature takes a value of type float" in out
    assert "top_p must be in (0, 1]" in out
    assert "unknown command :bogus; type :help for the list" in out
    assert ":clear-history | :clh" in out  # the :h listing
    assert "  max_new_tokens = 8\n" in out  # the :conf listing kept the good change, not the bad ones
    assert "history cleared\nUser> (no history)" in out
    assert "never read" not in out


def test_chat_same_seed_same_reply(tiny_checkpoint, monkeypatch, capsys):
    lines = [":seed 7", ":conf max_new_tokens=8", "Hi!", ":clear-history", "Hi!", ":exit"]
    code, out, _ = run_chat(monkeypatch, capsys, ["--model", str(tiny_checkpoint)], lines)
    assert code == 0
    model, tokenizer = load(tiny_checkpoint)
    reply = list(model.chat_stream(tokenizer, "Hi!", [], seed=7, max_new_tokens=8))[-1]
    assert reply and out.count(f"Assistant> {reply}\n") == 2
    # --seed on the command line gives the same replies in a new session.
    code, again, _ = run_chat(
        monkeypatch, capsys, ["--model", str(tiny_checkpoint), "--seed", "7"], lines[1:]
    )
    assert again.count(f"Assistant> {reply}\n") == 2


def test_chat_turn_error_keeps_repl_going(tiny_checkpoint, monkeypatch, capsys):
    long_question = "word " * 300  # the tiny preset's context is 256 tokens
    lines = [":conf max_new_tokens=4", long_question, ":history"]  # then EOF, no :exit
    code, out, err = run_chat(monkeypatch, capsys, ["--model", str(tiny_checkpoint)], lines)
    assert code == 0
    assert err.startswith("error: the prompt has ") and err.count("\n") == 1
    assert "(no history)" in out and "Traceback" not in err


def test_ctrl_c_at_the_prompt_exits_130(tiny_checkpoint, monkeypatch, capsys):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert main(["chat", "--model", str(tiny_checkpoint)]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_generate_greedy_matches_model_generate(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "The capital of France is"]
    args += ["--greedy", "--max-new-tokens", "12"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    model, tokenizer = load(tiny_checkpoint)
    ids = tokenizer.encode("The capital of France is")
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert first == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) + "\n"


def test_generate_with_a_converted_head_matches_load_with_that_head(tiny_checkpoint, capsys):
    """--head int8 (chat/generate/serve) decodes as qwenkit.load(head="int8") does."""
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "Once", "--greedy"]
    assert main([*args, "--max-new-tokens", "8", "--head", "int8"]) == 0
    out = capsys.readouterr().out
    model, tokenizer = load(tiny_checkpoint, head="int8")
    assert type(model.lm_head).__name__ == "QuantLinear"
    ids = tokenizer.encode("Once")
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out == tokenizer.decode(expected[0, len(ids) :], skip_special_tokens=True) + "\n"
    from qwenkit.cli.common import load_model  # the flag reaches the loader (greedy tokens may agree anyway)

    for verb in ("generate", "chat", "serve"):
        extra = ["--prompt", "x"] if verb == "generate" else []
        parsed = build_parser().parse_args([verb, "--model", str(tiny_checkpoint), "--head", "int8", *extra])
        assert type(load_model(parsed)[0].lm_head).__name__ == "QuantLinear"
        parsed = build_parser().parse_args(
            [verb, "--model", str(tiny_checkpoint), "--weights", "bf16", *extra]
        )
        assert type(load_model(parsed)[0].model.layers[0].self_attn.q_proj).__name__ == "HalfLinear"


def test_chat_banner_counts_the_parameters_of_16_bit_layers(tiny_checkpoint, tiny_model, monkeypatch, capsys):
    # HalfLinear holds its matrix as a buffer: model.parameters() alone counted only embeddings and norms
    total = format_count(sum(p.numel() for p in tiny_model.parameters()))
    for extra, shown in (([], "float32;"), (["--weights", "bf16"], "float32, bf16 matrices;")):
        code, out, _ = run_chat(monkeypatch, capsys, ["--model", str(tiny_checkpoint), *extra], [":exit"])
        assert code == 0
        assert f"({total} parameters, cpu, {shown} prompts in" in out.splitlines()[0]


def test_generate_sampling_reproducible_with_seed(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "Once", "--max-new-tokens", "6",
            "--top-k", "50"]  # fmt: skip
    outs = []
    for seed in ("3", "3", "4"):
        assert main([*args, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def write_original_layout(model: Qwen, vocab: Path, directory: Path) -> None:
    """Write `model` as an official Qwen (QWenLMHeadModel) checkpoint: fused QKV, w1/w2 MLP names."""
    c, sd = model.config, model.state_dict()
    tensors = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        tensors[theirs + "ln_1.weight"] = sd[ours + "input_layernorm.weight"]
        tensors[theirs + "ln_2.weight"] = sd[ours + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            qkv = [sd[f"{ours}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            tensors[f"{theirs}attn.c_attn.{kind}"] = torch.cat(qkv)
        tensors[theirs + "attn.c_proj.weight"] = sd[ours + "self_attn.o_proj.weight"]
        tensors[theirs + "mlp.w1.weight"] = sd[ours + "mlp.up_proj.weight"]
        tensors[theirs + "mlp.w2.weight"] = sd[ours + "mlp.gate_proj.weight"]
        tensors[theirs + "mlp.c_proj.weight"] = sd[ours + "mlp.down_proj.weight"]
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": 2 * c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "kv_channels": c.head_dim,
        "seq_length": c.max_position_embeddings,
        "rotary_emb_base": c.rope_theta,
        "layer_norm_epsilon": c.rms_norm_eps,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copyfile(vocab, directory / "qwen.tiktoken")


def test_convert_original_layout_then_info(tiny_model, official_tokenizer, tmp_path, capsys):
    src, dst = tmp_path / "original", tmp_path / "converted"
    write_original_layout(tiny_model, official_tokenizer.path, src)
    assert main(["convert", str(src), str(dst)]) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "original Qwen" in summary and "Qwen2 layout, float32" in summary

    assert main(["info", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "Qwen2 (Qwen2ForCausalLM)"
    assert info["parameters"] == QwenConfig.from_preset("tiny").num_parameters == info["stored_parameters"]
    assert info["stored_dtypes"] == ["float32"] and info["tokenizer"]["kind"] == "qwen.tiktoken"
    assert info["tokenizer"]["vocab_size"] == 151851 and not info["tokenizer"]["chat_template"]
    converted, _ = load(dst)
    ids = torch.tensor([official_tokenizer.encode("Converted weights give the same logits.")])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), tiny_model(ids))

    assert main(["info", str(src)]) == 0
    table = capsys.readouterr().out
    assert "original Qwen (QWenLMHeadModel)" in table and "4 query, 4 key/value, head dim 16" in table
    assert f"({QwenConfig.from_preset('tiny').num_parameters:,})" in table

    # An existing checkpoint is replaced only with --force; SRC itself never.
    assert_one_line_error(main(["convert", str(src), str(dst)]), capsys.readouterr().err, "--force")
    assert main(["convert", str(src), str(dst), "--dtype", "bfloat16", "--force"]) == 0
    capsys.readouterr()
    assert main(["info", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stored_dtypes"] == ["bfloat16"]
    code = main(["convert", str(dst), str(dst), "--force"])
    assert_one_line_error(code, capsys.readouterr().err, "different directory from the input")


def test_info_shows_the_tokenizer(qwen25_dir, tmp_path, capsys):
    assert main(["info", str(qwen25_dir)]) == 0
    table = capsys.readouterr().out
    assert "tokenizer.json, 151,665 ids (151,643 BPE + 22 added)" in table
    assert "<|im_end|> / None / <|endoftext|>" in table
    assert "the checkpoint's own" in table
    assert "14: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, ..." in table
    assert "8: <tool_call> 151657, </tool_call> 151658, <|fim_prefix|> 151659, ..." in table

    assert main(["info", str(qwen25_dir), "--json"]) == 0
    tok = json.loads(capsys.readouterr().out)["tokenizer"]
    assert tok["kind"] == "tokenizer.json" and tok["chat_template"] is True
    assert tok["added_tokens"]["<|file_sep|>"] == 151664 and len(tok["added_tokens"]) == 22
    assert len(tok["control_tokens"]) == 14 and "<tool_call>" not in tok["control_tokens"]

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(qwen25_dir / name, no_tokenizer / name)
    assert main(["info", str(no_tokenizer)]) == 0
    assert "cannot load: no qwen.tiktoken or tokenizer.json in" in capsys.readouterr().out


@pytest.fixture
def bad_dirs(tmp_path) -> dict[str, str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {name: str(tmp_path / name) for name in ("missing", "empty", "llama")}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["chat", "--model", "{missing}"], "checkpoint not found"),
        (["generate", "--model", "{empty}", "--prompt", "x"], "no config.json"),
        (["info", "{empty}"], "no config.json"),
        (["info", "{llama}"], "unknown checkpoint layout"),
        (["convert", "{llama}", "{missing}"], "unknown checkpoint layout"),
    ],
)
def test_bad_checkpoints_give_one_line_errors(bad_dirs, args, expected, capsys):
    code = main([a.format(**bad_dirs) for a in args])
    assert_one_line_error(code, capsys.readouterr().err, expected)


def test_bad_settings_give_one_line_errors(tiny_checkpoint, capsys):
    long_prompt = "word " * 300
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", long_prompt])
    assert_one_line_error(code, capsys.readouterr().err, "context window is 256")
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--top-p", "1.5"])
    assert_one_line_error(code, capsys.readouterr().err, "top_p must be in (0, 1]")
    assert main(["chat", "--model", str(tiny_checkpoint), "--dtype", "int8"]) == 2  # argparse's usage error
    assert "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.fixture
def bad_inputs(tmp_path, small_checkpoint):
    """Paths the bad-input cases name: a binary file, a plain file where a directory is expected, a
    checkpoint whose weights file was cut short."""
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 8)
    (tmp_path / "file").write_text("a plain file\n")
    (tmp_path / "text.txt").write_text("hello world, hello tokenizer\n" * 10)
    truncated = shutil.copytree(small_checkpoint, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return {
        "png": str(tmp_path / "picture.png"),
        "file": str(tmp_path / "file"),
        "text": str(tmp_path / "text.txt"),
        "vocab": str(small_checkpoint / "qwen.tiktoken"),
        "truncated": str(truncated),
        "run": str(tmp_path / "run"),
    }


# Every verb given what a user can get wrong: unreadable configs, files where directories belong,
# numbers out of range, damaged checkpoints. Each must be one line, no traceback, exit status 1.
BAD_INPUTS = [
    (["pretrain", "--config", "{png}", "--out", "{run}"], "picture.png is not a YAML recipe (not UTF-8 text)"),
    (["sft", "--config", "{png}", "--out", "{run}"], "picture.png is not a YAML recipe (not UTF-8 text)"),
    (["pretrain", "--out", "{file}"], "the run directory {file} exists and is not a directory"),
    (["sft", "--out", "{file}", "--model", "{truncated}", "--data", "{text}"], "exists and is not a directory"),
    (["pretrain", "--out", "{run}", "--train.micro_batch_size", "0"], "train.micro_batch_size must be >= 1, got 0"),
    (["pretrain", "--out", "{run}", "--train.lr", "nan"], "train.lr must be a finite number, got 'nan'"),
    (["sft", "--out", "{run}", "--train.lr", "nan"], "train.lr must be a finite number, got 'nan'"),
    (["pretrain", "--out", "{run}", "--train.max_steps", "-5"], "train.max_steps must be >= 1, got -5"),
    (["pretrain", "--out", "{run}", "--checkpoint.keep", "-1"], "checkpoint.keep must be >= 0, got -1"),
    (["pretrain", "--out", "{run}", "--train.device", "gpu"], "train.device must be cpu, cuda or cuda:N"),
    (["pretrain", "--out", "{run}", "--model.overrides", "{{vocab_size:512}}"], "unknown setting model.overrides"),
    (["tokenizer", "train", "--input", "{text}", "--vocab-size", "300", "--out", "{file}"], "{file} exists and is not a directory"),
    (["tokenizer", "stats", "--tokenizer", "{vocab}", "--input", "{text}", "--out", "{file}"], "{file} exists and is not a directory"),
    (["data", "pack", "--input", "{text}", "--tokenizer", "{vocab}", "--seq-len", "4", "--out", "{file}"], "{file} exists and is not a directory"),
    (["serve", "--port", "99999"], "--port must be between 1 and 65535, got 99999"),
    (["serve", "--max-seq-len", "-5"], "--max-seq-len must be >= 1"),
    (["serve", "--max-seq-len", "0"], "--max-seq-len must be >= 1"),
    (["info", "{truncated}"], "{truncated}/model.safetensors is truncated: its header describes"),
    (["info", "{file}"], "got a file: {file}"),
    (["chat", "--model", "{truncated}"], "model.safetensors is truncated"),
    (["generate", "--model", "{truncated}", "--prompt", "x"], "model.safetensors is truncated"),
    (["convert", "{truncated}", "{run}"], "model.safetensors is truncated"),
    (["merge-lora", "{truncated}", "{text}", "{run}"], "model.safetensors is truncated"),
    (["agent", "--model", "{truncated}", "--tools", "calculator", "hi"], "model.safetensors is truncated"),
    (["agent", "--timeout", "nan", "hi"], "--timeout must be a number of seconds > 0, got nan"),
    (["demo", "build", "--work", "{file}"], "--work {file} exists and is not a directory"),
    (["demo", "build", "--work", "{run}", "--out", "{file}"], "{file} exists and is a file"),
    (["demo", "eval", "--count", "0"], "--count must be >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "expected"), BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_inputs_give_one_line_errors(bad_inputs, args, expected, capsys):
    code = main([a.format(**bad_inputs) for a in args])
    assert_one_line_error(code, capsys.readouterr().err, expected.format(**bad_inputs))
    assert not Path(bad_inputs["run"]).exists()  # refused before anything was written


def test_bad_inputs_through_the_entry_point(bad_inputs):
    """Two of the cases above as a user runs them: `python -m qwenkit`, stderr and the exit status."""
    env = {"QWENKIT_HOME": bad_inputs["run"] + "-home", "PATH": "/usr/bin:/bin"}
    cases = [
        (["pretrain", "--config", "{png}", "--out", "{run}"], "picture.png is not a YAML recipe"),
        (["serve", "--port", "99999"], "--port must be between 1 and 65535, got 99999"),
    ]
    for args, expected in cases:
        args = [a.format(**bad_inputs) for a in args]
        done = subprocess.run(
            [sys.executable, "-m", "qwenkit", *args], capture_output=True, text=True, env=env
        )
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith("qwenkit: error: ") and done.stderr.count("\n") == 1, done.stderr
        assert expected.format(**bad_inputs) in done.stderr


def test_served_api_schema_says_what_the_server_answers(small_checkpoint):
    """400 (not FastAPI's 422) with OpenAI's error JSON in the schema, Allow on 405, and with an API
    key the schema behind the key and the docs pages off (README, Serve)."""
    from fastapi.testclient import TestClient

    from qwenkit.serve.api import create_app

    model, tokenizer = load(small_checkpoint)
    with TestClient(create_app(model, tokenizer, "small", max_batch=1)) as client:
        schema = client.get("/openapi.json").json()
        responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        assert (
            '"422"' not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
        )
        invalid = client.post("/v1/chat/completions", json={"messages": "hi"})
        error = schema["components"]["schemas"]["Error"]["properties"]["error"]
        assert invalid.status_code == 400 and sorted(invalid.json()["error"]) == sorted(error["required"])
        wrong_method = client.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert client.get("/docs").status_code == 200
    with TestClient(create_app(model, tokenizer, "small", api_key="sekret", max_batch=1)) as client:
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        keyed = client.get("/openapi.json", headers={"Authorization": "Bearer sekret"}).json()
        assert "401" in keyed["paths"]["/v1/models"]["get"]["responses"]
        assert "401" not in keyed["paths"]["/health"]["get"]["responses"]
        assert keyed["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
        assert client.get("/health").status_code == 200


def test_python_m_qwenkit_entry_point(tiny_checkpoint, tmp_path):
    env = {"QWENKIT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    failed = subprocess.run(
        [sys.executable, "-m", "qwenkit", "info", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr == f"qwenkit: error: checkpoint not found: {tmp_path / 'nowhere'}\n"

    chat = subprocess.run(
        [sys.executable, "-m", "qwenkit", "chat", "--model", str(tiny_checkpoint), "--seed", "1"],
        input=":conf max_new_tokens=4\nhello\n:q\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert "User> Assistant> " in chat.stdout and chat.stderr == ""
