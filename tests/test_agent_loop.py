"""The ReAct agent loop, the tool registry, the local-model adapter and `qwenkit agent`.

The loop logic is driven by a scripted generator (the generator is an injected dependency, so this
tests the loop itself); the adapter and the CLI run a real tiny qwenkit model.
"""

import subprocess
import sys

import pytest
import torch
from conftest import as_loaded, make_tiny_model

from qwenkit import QwenkitError, save
from qwenkit.agent import loop
from qwenkit.agent.interpreter import bwrap_path
from qwenkit.agent.loop import (
    Final,
    TextDelta,
    ToolCalled,
    ToolRegistry,
    ToolResult,
    event_dict,
    local_complete,
    react_messages,
    run_agent,
    split_messages,
    tool_from_spec,
)
from qwenkit.agent.react import calculator, react_instruction
from qwenkit.chat import DEFAULT_SYSTEM, make_context, stop_words_ids
from qwenkit.cli import main
from qwenkit.tokenizer import Tokenizer


class Scripted:
    """A generator that plays fixed replies, a few characters at a time, and records its prompts."""

    def __init__(self, *replies: str, chunk: int = 3):
        self.replies = list(replies)
        self.calls: list[tuple[list[dict], list[str]]] = []
        self.chunk = chunk

    def __call__(self, messages, stop):
        self.calls.append(([dict(m) for m in messages], list(stop)))
        reply = self.replies[min(len(self.calls), len(self.replies)) - 1]
        for stop_string in stop:  # a real generator stops before the stop string
            reply = reply.split(stop_string)[0]
        for i in range(0, len(reply), self.chunk):
            yield reply[i : i + self.chunk]


CALL = 'Thought: I should multiply.\nAction: calculator\nAction Input: {"expression": "6 * 7"}\nObservation:'


def test_loop_runs_the_tool_and_continues_the_same_turn():
    complete = Scripted(CALL, " I now know the final answer\nFinal Answer: 42")
    events = list(run_agent("What is 6 times 7?", complete, [calculator]))

    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == CALL.removesuffix("Observation:") + " I now know the final answer\nFinal Answer: 42"
    steps = [e for e in events if not isinstance(e, TextDelta)]
    assert steps[:2] == [ToolCalled("calculator", '{"expression": "6 * 7"}'), ToolResult("calculator", "42")]
    final = steps[2]
    assert final.answer == "42" and final.reason == "final_answer"

    # the official prompt: instruction + "\n\nQuestion: " as the user turn, stop at Observation:
    (first, stop), (second, _) = complete.calls
    assert stop == ["Observation:"]
    assert first[0] == {"role": "system", "content": DEFAULT_SYSTEM}
    assert first[1]["content"] == react_instruction([calculator.spec()]) + "\n\nQuestion: What is 6 times 7?"
    assert first[2] == {"role": "assistant", "content": ""}
    # the tool result is appended to the same assistant turn as " {result}\nThought:"
    assert second[2]["content"] == CALL + " 42\nThought:"
    assert final.transcript == CALL + " 42\nThought: I now know the final answer\nFinal Answer: 42"
    assert loop.DEFAULT_SYSTEM == DEFAULT_SYSTEM


def test_step_limit_ends_the_run_with_a_clear_reason():
    complete = Scripted(CALL)  # the model never stops calling the tool
    events = list(run_agent("loop forever", complete, [calculator], max_steps=3))
    assert sum(isinstance(e, ToolResult) for e in events) == 3
    final = events[-1]
    assert final == Final(None, "max_steps", (CALL + " 42\nThought:") * 3)
    assert len(complete.calls) == 4  # three tool calls and the reply that wanted a fourth


def test_unknown_tool_and_bad_input_go_back_to_the_model():
    complete = Scripted(
        "Thought: search\nAction: search\nAction Input: qwen\n",
        ' x\nAction: calculator\nAction Input: {"expression": "os.getcwd()"}\n',
        " I now know the final answer\nFinal Answer: none",
    )
    results = [e for e in run_agent("q", complete, ToolRegistry([calculator])) if isinstance(e, ToolResult)]
    assert results[0].text == "Error: there is no tool named 'search'; use one of calculator"
    assert results[1].text.startswith("Error: ValueError: not arithmetic")
    assert complete.calls[1][0][-1]["content"].endswith(
        "Action Input: qwen\nObservation: Error: there is no tool named 'search'; use one of calculator\nThought:"
    )


class BrokenPython(loop.PythonTool):
    """A python tool whose interpreter fails outside the code it runs (as a kernel whose connection
    file was replaced by a directory once did): an OSError escapes the tool itself."""

    def run(self, arguments):
        raise IsADirectoryError(21, "Is a directory", "/tmp/run/kernel.json")


def test_a_failing_tool_never_ends_the_loop():
    complete = Scripted("Thought: run it\nAction: python\nAction Input: print(1)\n", "Final Answer: gave up")
    events = list(run_agent("q", complete, [BrokenPython()]))
    result = next(e for e in events if isinstance(e, ToolResult))
    assert (
        result.text
        == "Error: the tool 'python' failed: IsADirectoryError: [Errno 21] Is a directory: '/tmp/run/kernel.json'"
    )
    assert events[-1] == Final("gave up", "final_answer", events[-1].transcript)


def test_a_reply_without_react_format_is_the_answer():
    events = list(run_agent("hi", Scripted("Hello there! "), [calculator]))
    assert events[-1] == Final("Hello there!", "plain_reply", "Hello there! ")
    assert event_dict(events[-1])["reason"] == "plain_reply" and event_dict(events[0]) == {
        "type": "text",
        "text": "Hel",
    }


def test_history_and_system_prompt_are_passed_on():
    complete = Scripted("Final Answer: ok")
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    list(run_agent("q", complete, [calculator], system="Be brief.", history=history))
    messages = complete.calls[0][0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[1:3] == history
    assert split_messages(messages) == ("Be brief.", [("a", "b")], messages[3]["content"], "")


def test_registry_tools_from_functions_and_json_schemas():
    def weather(city: str, days: int = 1) -> str:
        """Weather forecast for a city."""
        return f"{city}: sunny for {days} days"

    spec = {"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}  # fmt: skip
    registry = ToolRegistry([calculator, weather])
    registry.add_spec(spec, lambda word: word.upper())
    assert [t.name for t in registry] == ["calculator", "weather", "lookup"]
    assert registry.specs()[2] == spec
    assert registry.run("weather", '{"city": "Hangzhou", "days": 2}').text == "Hangzhou: sunny for 2 days"
    assert registry.run("lookup", "qwen").text == "QWEN"  # one string parameter: plain text works
    assert (
        "weather: Call this tool to interact with the weather API"
        in react_messages("q", list(registry))[1]["content"]
    )

    with pytest.raises(QwenkitError, match="two tools are named 'calculator'"):
        registry.add(calculator)
    with pytest.raises(QwenkitError, match="unknown tool 'browser'; built-in tools: calculator, python"):
        ToolRegistry.from_names(["calculator", "browser"])
    with pytest.raises(QwenkitError, match="needs a name"):
        tool_from_spec({"function": {"name": "has space"}}, print)
    with pytest.raises(QwenkitError, match="parameters must be a JSON schema"):
        tool_from_spec({"name": "x", "parameters": {"properties": []}}, print)
    with pytest.raises(QwenkitError, match="must be callable"):
        tool_from_spec({"name": "x"}, "not a function")
    with pytest.raises(QwenkitError, match="at least one tool"):
        list(run_agent("q", Scripted("x"), []))
    with pytest.raises(QwenkitError, match="max_steps"):
        list(run_agent("q", Scripted("x"), [calculator], max_steps=0))


def test_split_messages_rejects_malformed_conversations():
    with pytest.raises(QwenkitError, match="must end with a user message"):
        split_messages([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(QwenkitError, match="alternate"):
        split_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap (bwrap) is not installed")
def test_python_tool_in_the_loop_keeps_state_and_returns_figures():
    complete = Scripted(
        "Thought: compute\nAction: python\nAction Input: ```py\nimport matplotlib.pyplot as plt\nxs = [1, 4, 9]\n"
        "plt.plot(xs)\nplt.show()\nprint(sum(xs))\n```\n",
        ' plot again\nAction: python\nAction Input: {"code": "print(len(xs))"}\n',
        " I now know the final answer\nFinal Answer: 14",
    )
    with ToolRegistry.from_names(["python"], timeout=60) as tools:
        results = [e for e in run_agent("q", complete, tools) if isinstance(e, ToolResult)]
        interpreter = tools["python"].interpreter
    assert results[0].text.startswith("14\n[image 1: PNG")
    assert results[0].images[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert results[1].text == "3" and results[1].images == []
    assert event_dict(results[0])["images"][0].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    assert interpreter.closed and not interpreter.root.exists()


# --- a real tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(official_tokenizer):
    model = as_loaded(make_tiny_model(max_position_embeddings=1024), official_tokenizer)
    return model, official_tokenizer


def greedy_text(model, tokenizer, ids: list[int], n: int) -> str:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         stop=stop_words_ids(tokenizer, "chatml"))  # fmt: skip
    new = [t for t in out[0, len(ids) :].tolist() if t < tokenizer.eod_id]
    return tokenizer.decode(new)


def test_local_model_adapter_end_to_end(tiny):
    model, tok = tiny
    complete = local_complete(model, tok, max_new_tokens=12, do_sample=False)
    messages = react_messages("What is 6 * 7?", [calculator])
    _, ids = make_context(tok, messages[1]["content"], [], DEFAULT_SYSTEM)

    events = list(run_agent("What is 6 * 7?", complete, [calculator]))
    expected = greedy_text(model, tok, ids, 12)
    assert expected and events[-1] == Final(
        expected.strip(), "plain_reply", expected
    )  # random weights: no ReAct

    # a begun assistant turn continues after the ChatML header, as plain text (never control tokens)
    prefix = "Thought: <|im_end|>"
    continued = "".join(complete([*messages, {"role": "assistant", "content": prefix}], []))
    assert continued == greedy_text(model, tok, ids + tok.encode(prefix), 12)
    # stop strings end the text before them
    cut = expected[2:5]
    assert (
        "".join(complete([*messages, {"role": "assistant", "content": ""}], [cut]))
        == expected[: expected.find(cut)]
    )


# --- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    model, tok = tiny
    return str(save(model, tok, tmp_path_factory.mktemp("agent") / "tiny"))


def qwenkit(*args: str, home) -> subprocess.CompletedProcess:
    env = {"QWENKIT_HOME": str(home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qwenkit", *args], capture_output=True, text=True, env=env,
                          timeout=180)  # fmt: skip


def test_cli_errors_are_one_line(tmp_path, capsys):
    result = qwenkit("agent", "--tools", "calculator,browser", "What is 2 + 2?", home=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "qwenkit: error: unknown tool 'browser'; built-in tools: calculator, python\n"
    for args, message in [
        (["--tools", " , "], "--tools needs at least one tool name"),
        (["--max-steps", "0"], "--max-steps must be >= 1"),
        (["--save-images", __file__], "exists and is not a directory"),
        (["--model", str(tmp_path / "nowhere"), "--tools", "calculator"], "checkpoint not found"),
    ]:
        assert main(["agent", *args, "What is 2 + 2?"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("qwenkit: error: ") and err.count("\n") == 1, err
        assert message in err


def test_cli_runs_a_tiny_model(checkpoint, tiny, tmp_path):
    model, tok = tiny
    result = qwenkit("agent", "--model", checkpoint, "--tools", "calculator", "--greedy", "--max-new-tokens", "12",
                     "What is 6 * 7?", home=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, ids = make_context(
        tok, react_messages("What is 6 * 7?", [calculator])[1]["content"], [], DEFAULT_SYSTEM
    )
    expected = greedy_text(model, tok, ids, 12)
    assert result.stdout == f"{expected}\n\nAnswer: {expected.strip()}\n"
    assert result.stderr == ""


def test_cli_prints_steps_observations_and_the_step_limit(checkpoint, tmp_path, monkeypatch, capsys):
    # the generator is the injected dependency: a scripted one shows how the CLI prints each step
    monkeypatch.setattr(loop, "local_complete", lambda *args, **kwargs: Scripted(CALL))
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path))
    code = main(
        ["agent", "--model", checkpoint, "--tools", "calculator", "--max-steps", "2", "What is 6 * 7?"]
    )
    out, err = capsys.readouterr()
    step = CALL.removesuffix("Observation:") + "Observation: 42\nThought:"
    assert code == 1 and out == step * 2 + CALL.removesuffix("Observation:") + "\n"
    assert err == "qwenkit: error: no final answer within 2 tool calls (see --max-steps)\n"


@pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap (bwrap) is not installed")
def test_cli_saves_figures(checkpoint, tmp_path, monkeypatch, capsys):
    plot = "Thought: plot\nAction: python\nAction Input: ```py\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\n```\n"
    monkeypatch.setattr(
        loop, "local_complete", lambda *args, **kwargs: Scripted(plot, " done\nFinal Answer: drawn")
    )
    code = main(
        ["agent", "--model", checkpoint, "--tools", "python", "--save-images", str(tmp_path / "figs"), "Plot"]
    )
    out = capsys.readouterr().out
    figure = tmp_path / "figs" / "image-1.png"
    assert code == 0 and f"[image 1: {figure}]\nThought: done\nFinal Answer: drawn\n\nAnswer: drawn\n" in out
    assert figure.read_bytes().startswith(b"\x89PNG")


# --- the Hermes format (chat-template checkpoints) -----------------------------------------------------


class ScriptedTemplate:
    """A template-style generator (`complete(messages, stop, tools)`) playing fixed replies."""

    def __init__(self, *replies: str):
        self.replies, self.prompts = list(replies), []

    def __call__(self, messages, stop, tools=None):
        self.prompts.append(([dict(m) for m in messages], tools))
        reply = self.replies[min(len(self.prompts), len(self.replies)) - 1]
        for i in range(0, len(reply), 4):
            yield reply[i : i + 4]


HERMES_CALLS = ('Two sums.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')  # fmt: skip


def test_hermes_loop_runs_every_call_and_answers_with_tool_messages():
    complete = ScriptedTemplate(HERMES_CALLS, "It is 42.")
    events = list(run_agent("What is 6 times 7?", complete, [calculator], tool_format="hermes"))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Two sums.It is 42."
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCalled)] == [
        ("calculator", '{"expression": "6 * 7"}'), ("nope", "{}")]  # fmt: skip
    results = [e.text for e in events if isinstance(e, ToolResult)]
    assert results[0] == "42" and "no tool named 'nope'" in results[1]
    assert events[-1].answer == "It is 42." and events[-1].reason == "final_answer"
    assert events[-1].transcript.startswith(HERMES_CALLS) and events[-1].transcript.endswith("It is 42.")

    (first, tools), (second, _) = complete.prompts
    assert first == [{"role": "user", "content": "What is 6 times 7?"}]  # the template's own system prompt
    assert tools == [calculator.spec()]
    assistant, *answers = second[1:]
    ids = [c["id"] for c in assistant["tool_calls"]]
    assert assistant["content"] == "Two sums." and len(set(ids)) == 2
    assert [(m["role"], m["tool_call_id"], m["content"]) for m in answers] == [
        ("tool", ids[0], "42"), ("tool", ids[1], results[1])]  # fmt: skip


def test_hermes_loop_step_limit_counts_calls():
    events = list(
        run_agent("q", ScriptedTemplate(HERMES_CALLS), [calculator], max_steps=3, tool_format="hermes")
    )
    assert sum(isinstance(e, ToolCalled) for e in events) == 2
    assert events[-1].answer is None and events[-1].reason == "max_steps"


def test_template_complete_prompts_as_transformers(qwen25_dir):
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.from_file(qwen25_dir)
    seen = []

    def stream(ids, stop_strings, stop_ids):
        seen.append((ids, stop_ids))
        yield "ok"

    complete = loop.template_complete(tokenizer, stream)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6*7?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]  # fmt: skip
    assert "".join(complete(messages, [], tools=[calculator.spec()])) == "ok"
    reference = transformers.AutoTokenizer.from_pretrained(qwen25_dir)
    hf_messages = [dict(m) for m in messages]
    hf_messages[2] = {**messages[2], "tool_calls": [{**messages[2]["tool_calls"][0], "function": {
        "name": "calculator", "arguments": {"expression": "6*7"}}}]}  # fmt: skip
    want = reference.apply_chat_template(hf_messages, tools=[calculator.spec()], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)  # fmt: skip
    assert seen[0][0] == list(want)
    assert {tokenizer.im_end_id, tokenizer.eod_id} <= set(seen[0][1])


def test_cli_tool_format_hermes_needs_a_template(checkpoint, capsys):
    assert (
        main(["agent", "--model", checkpoint, "--tools", "calculator", "--tool-format", "hermes", "2+2?"])
        == 1
    )
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "chat template reads tools" in err
