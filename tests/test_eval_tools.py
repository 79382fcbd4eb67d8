"""tool-use and code-interpreter: the parsing and scoring of QwenLM/Qwen eval/evaluate_plugin.py and
Qwen-Agent's code-interpreter benchmark on hand-made replies (goldens: what the official functions
return on the same strings, run once outside the project), Rouge-L against an LCS computed here,
the shipped case files, and a tiny model end to end through LocalBackend."""

import json

import pytest
import torch
from conftest import make_tiny_model

from qwenkit import GenerationConfig, QwenkitError
from qwenkit.agent.interpreter import CodeInterpreter, PythonTool, bwrap_path
from qwenkit.agent.react import react_question
from qwenkit.chat import make_context
from qwenkit.eval.base import Backend, EvalSettings, LocalBackend, get_task
from qwenkit.eval.tools import (
    CaseRun,
    Cell,
    action_input_rouge,
    code_interpreter_cases,
    executable,
    react_action,
    run_case,
    score_case,
    token_string,
    tool_selected,
    tool_use_cases,
    tool_use_prompt,
    transcript_answer,
)

needs_bwrap = pytest.mark.skipif(
    bwrap_path() is None, reason="bubblewrap (bwrap) is not installed; no sandbox"
)

WEATHER = 'Thought: check\nAction: get_weather\nAction Input: {"city": "Paris", "date": "2024-06-02"}'

# (reply, evaluate_plugin.process_res's action and action_input): the official function's values
PARSE_GOLDENS = [
    (WEATHER + "\nObservation: sunny", "get_weather", '{"city": "Paris", "date": "2024-06-02"}'),
    ("Thought: x\nAction: GET_Weather \nAction Input: {city: 'Paris', date: '2024-06-02',}", "GET_Weather",
     '{"city": "Paris", "date": "2024-06-02"}'),
    ("Thought: x\nAction: web_search\nAction Input: Paris weather", "web_search", ""),
    ('Action: get_weather\nAction Input: {"city": "Paris"}', "get_weather", '{"city": "Paris"}'),
    ("Final Answer: 42", "Answer: 42", ""),
    ("Thought: no tool\nFinal Answer: The capital is Paris.", "t: no tool\nFinal Answer: The capital is Paris.", ""),
    ("", "", ""),
    ('Thought: x\nAction: translate\nAction Input: {"text": "今天天气很好", "target_language": "英文"}\nObservation:',
     "translate", '{"target_language": "英文", "text": "今天天气很好"}'),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "action", "action_input"), PARSE_GOLDENS)
def test_parse_like_evaluate_plugin(reply, action, action_input):
    assert react_action(reply) == (action, action_input)


def test_tool_selection():
    assert tool_selected(WEATHER, WEATHER)
    assert tool_selected(WEATHER.replace("get_weather", " GET_WEATHER"), WEATHER)  # case and spaces ignored
    assert not tool_selected(WEATHER.replace("get_weather", "web_search"), WEATHER)
    assert not tool_selected(WEATHER.removeprefix("Thought: check\n"), WEATHER)  # no "\nAction: " in it
    assert not tool_selected("Thought: x\nFinal Answer: sunny", WEATHER)


def lcs_f1(a: list[str], b: list[str]) -> float:
    """Rouge-L F1 from a longest common subsequence computed here."""
    if not a or not b:
        return 0.0
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def test_rouge_l_of_action_inputs(official_tokenizer):
    tok = official_tokenizer
    assert action_input_rouge(tok, WEATHER, WEATHER) == 1.0
    assert action_input_rouge(tok, "Thought: x\nFinal Answer: no", WEATHER) == 0.0  # no input: 0
    pairs = [
        (WEATHER.replace("06-02", "06-03"), WEATHER),
        ('Thought: a\nAction: translate\nAction Input: {"text": "今天天气不错", "target_language": "英语"}',
         'Thought: b\nAction: translate\nAction Input: {"text": "今天天气很好", "target_language": "英文"}'),
        ('Thought: a\nAction: web_search\nAction Input: {"query": "2023年诺贝尔文学奖"}',
         'Thought: b\nAction: web_search\nAction Input: {"query": "2023年诺贝尔文学奖得主"}'),
    ]  # fmt: skip
    # the values evaluate_plugin.py gives with the official tokenizer
    official = [0.9523809523809523, 0.8666666666666667, 0.9285714285714286]
    for (reply, reference), expected in zip(pairs, official, strict=True):
        score = action_input_rouge(tok, reply, reference)
        tokens = [token_string(tok, react_action(t)[1]).split() for t in (reply, reference)]
        assert score == pytest.approx(expected) == pytest.approx(lcs_f1(*tokens))
    # Chinese is compared by tokens (characters or words of the vocabulary), not whole strings
    assert len(token_string(tok, "今天天气很好").split()) > 1


class CannedBackend(Backend):
    def __init__(self, replies, tokenizer):
        self.replies, self.tokenizer, self.name, self.context_length = (
            dict(replies),
            tokenizer,
            "canned",
            10**6,
        )
        self.seen = []

    def next_token_logprobs(self, prompts, candidates):
        raise AssertionError("not used")

    def score(self, prompts):
        raise AssertionError("not used")

    def generate(self, prompts, max_new_tokens, stop=(), temperature=0.0, seed=0):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.seen += texts
        return [next(r for key, r in self.replies.items() if key in t) for t in texts]


SEARCH = {"name": "web_search", "description": "Search the web.", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}  # fmt: skip
WEATHER_TOOL = {"name": "get_weather", "description": "Weather of a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "date": {"type": "string"}}}}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tool_use_scores_hand_made_replies(tmp_path, byte_tokenizer):
    tools = [WEATHER_TOOL, SEARCH]
    rows = [
        {"id": "right", "tools": tools, "query": "Weather in Paris on 2024-06-02?", "response": WEATHER},
        {
            "id": "wrong",
            "tools": tools,
            "query": "Weather in Rome?",
            "response": WEATHER.replace("Paris", "Rome"),
        },
        {"id": "calm", "tools": tools, "query": "Say hi.", "response": "Thought: none\nFinal Answer: hi"},
        {
            "id": "eager",
            "tools": tools,
            "query": "Tell a joke.",
            "response": "Thought: none\nFinal Answer: ...",
        },
    ]
    replies = {
        "Paris on": "  " + WEATHER + "\nObservation: sunny\nThought: done\nFinal Answer: sunny  ",
        "Rome?": 'Thought: search\nAction: web_search\nAction Input: {"query": "Rome weather"}',
        "Say hi.": "Thought: no tool\nFinal Answer: hi!",
        "a joke.": 'Thought: search\nAction: web_search\nAction Input: {"query": "joke"}',
    }
    backend = CannedBackend(replies, byte_tokenizer)
    result = get_task("tool-use").run(backend, EvalSettings(data=write_jsonl(tmp_path / "cases.jsonl", rows),
                                                            progress=False))  # fmt: skip
    by_id = {p.id: p for p in result.predictions}
    assert by_id["right"].correct and by_id["right"].extra["rouge_l"] == 1.0
    assert not by_id["wrong"].correct and by_id["wrong"].prediction == "web_search"
    assert (
        by_id["wrong"].extra["rouge_l"]
        == action_input_rouge(byte_tokenizer, replies["Rome?"], rows[1]["response"])
        < 1
    )
    assert by_id["calm"].correct and not by_id["eager"].correct and by_id["eager"].extra["calls_tool"]
    assert result.metrics["tool_selection_accuracy"] == 0.5 and result.metrics["false_positive_rate"] == 0.5
    assert result.metrics["action_input_rouge_l"] == pytest.approx((1 + by_id["wrong"].extra["rouge_l"]) / 2)
    # the prompt: model.chat's ChatML around qwenkit's ReAct question
    assert backend.seen[0].startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    question = react_question(tools, rows[0]["query"])
    assert any(text.endswith(f"user\n{question}<|im_end|>\n<|im_start|>assistant\n") for text in backend.seen)


def test_tool_use_reads_evaluate_plugin_files(tmp_path, byte_tokenizer):
    (tmp_path / "exam_plugin_v20231206_react_positive.jsonl").write_text(
        json.dumps({"prompt": "PROMPT-1", "response": WEATHER}) + "\n")  # fmt: skip
    (tmp_path / "exam_plugin_v20231206_react_negative.jsonl").write_text(
        json.dumps({"prompt": "PROMPT-2", "response": "Thought: x\nFinal Answer: y"}) + "\n")  # fmt: skip
    cases = tool_use_cases(tmp_path)
    assert [(c["prompt"], c["positive"]) for c in cases] == [("PROMPT-1", True), ("PROMPT-2", False)]
    backend = CannedBackend({"PROMPT-1": WEATHER, "PROMPT-2": WEATHER}, byte_tokenizer)
    result = get_task("tool-use").run(backend, EvalSettings(data=tmp_path, progress=False))
    assert result.metrics == {
        "tool_selection_accuracy": 1.0,
        "action_input_rouge_l": 1.0,
        "false_positive_rate": 1.0,
    }


def test_shipped_cases_and_bad_files(tmp_path):
    cases = tool_use_cases(None)
    positive = [c for c in cases if c["positive"]]
    assert 20 <= len(cases) <= 40 and 0 < len(positive) < len(cases)
    assert {c["lang"] for c in cases} == {"en", "zh"} and all(1 < len(c["tools"]) <= 5 for c in cases)
    for case in positive:  # every reference calls one of the tools it offers, with a JSON input
        action, action_input = react_action(case["response"])
        assert action in [t["name"] for t in case["tools"]] and json.loads(action_input)
    ci = code_interpreter_cases(None)
    assert 10 <= len(ci) <= 20 and {c["tag"] for c in ci} == {"math", "visualization", "general"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "x"}\n{oops\n')
    with pytest.raises(QwenkitError, match=r"bad.jsonl:2: not valid JSON"):
        tool_use_cases(bad)
    bad.write_text('{"response": "x", "query": "q"}\n{"response": 3}\n')
    with pytest.raises(QwenkitError, match=r'bad.jsonl:2: "response" must be a string'):
        tool_use_cases(bad)
    with pytest.raises(QwenkitError, match=r'bad.jsonl:1: a case needs "prompt", or "tools"'):
        tool_use_prompt(tool_use_cases(bad.write_text('{"response": "x", "query": "q"}\n') and bad)[0])
    bad.write_text('{"query": "q", "tag": "math"}\n')
    with pytest.raises(QwenkitError, match=r'bad.jsonl:1: a math case needs a numeric "answer"'):
        code_interpreter_cases(bad)
    bad.write_text('{"query": "q"}\n')
    with pytest.raises(QwenkitError, match=r"bad.jsonl:1: missing 'tag'"):
        code_interpreter_cases(bad)


# (transcript, Qwen-Agent metrics/gsm8k.py extract_answer): the official function's values
TRANSCRIPT_GOLDENS = [
    ("Thought: done\nFinal Answer: The sum is 76127.", 76127),
    ("Final Answer: $1,234", 1),  # "\d*" takes "1" first, and ",234" follows no space
    ("Final Answer: -3.25 meters", -3.25),
    ("Observation: 45\nThought: ok\nFinal Answer: 45", 45),
    ("The answer is 42 .", 42),
    ("x -.5 y", -0.5),
    ("x 007 y", None),
    ("Observation:\n45", None),  # right after a line break: not seen
    ("no numbers", None),
    ("it is 3.50 now", 3),
]


@pytest.mark.parametrize(("transcript", "answer"), TRANSCRIPT_GOLDENS)
def test_transcript_answer_like_the_benchmark(transcript, answer):
    assert transcript_answer(transcript) == answer


def test_executable_rules():
    ok, bad, plot = Cell("x", True, 0, ""), Cell("x", False, 0, ""), Cell("x", True, 1, "")
    assert executable("math", CaseRun("", [ok, ok])) and not executable("math", CaseRun("", [ok, bad]))
    assert not executable("math", CaseRun("", []))
    assert executable("visualization", CaseRun("", [plot])) and not executable(
        "visualization", CaseRun("", [ok])
    )
    assert executable("general", CaseRun("", [ok, bad])) and not executable("general", CaseRun("", [bad, ok]))


@pytest.fixture(scope="module")
def interpreter():
    if bwrap_path() is None:
        pytest.skip("bubblewrap (bwrap) is not installed; the sandbox tests need it")
    with CodeInterpreter(timeout=60) as sandbox:
        yield sandbox


def scripted(replies):
    """An agent `complete` that answers with the given replies in turn (what a model would write)."""
    replies = iter(replies)

    def complete(messages, stop):
        yield next(replies)

    return complete


def call(code: str) -> str:
    return f"Thought: I will run code.\nAction: python\nAction Input: ```py\n{code}\n```\n"


@needs_bwrap
def test_code_interpreter_scoring_on_fixed_code(interpreter):
    math_case = {"id": "m", "tag": "math", "query": "sum of 0..9?", "answer": 45}
    run = run_case("q", scripted([call("print(sum(range(10)))"), " I now know the final answer\nFinal Answer: It is 45."]),
                   interpreter, 3)  # fmt: skip
    assert [c.ok for c in run.cells] == [True] and run.transcript.endswith("Final Answer: It is 45.")
    assert " 45\nThought:" in run.transcript  # the observation, as the agent appended it
    prediction = score_case(math_case, run, 0)
    assert prediction.correct and prediction.extra["executable"] and prediction.prediction == 45
    # a failing cell ends the run (no second reply is asked for): not executable, not correct
    run = run_case("q", scripted([call("print(1 / 0)")]), interpreter, 3)
    prediction = score_case(math_case, run, 0)
    assert [c.ok for c in run.cells] == [False] and "ZeroDivisionError" in run.transcript
    assert not prediction.extra["executable"] and not prediction.correct
    # a wrong number runs but is wrong
    run = run_case(
        "q", scripted([call("print(44)"), " I now know the final answer\nFinal Answer: 44"]), interpreter, 3
    )
    prediction = score_case(math_case, run, 0)
    assert prediction.extra["executable"] and not prediction.correct and prediction.prediction == 44
    # no code at all: not executable
    run = run_case("q", scripted(["The answer is 45"]), interpreter, 3)
    assert run.cells == [] and not score_case(math_case, run, 0).extra["executable"]
    # plotting: a figure makes it executable, a cell without one does not
    plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()"
    vis = {"id": "v", "tag": "visualization", "query": "plot"}
    run = run_case(
        "q", scripted([call(plot), " I now know the final answer\nFinal Answer: done"]), interpreter, 3
    )
    assert score_case(vis, run, 0).extra["executable"] and run.cells[0].images == 1
    run = run_case(
        "q", scripted([call("x = 1"), " I now know the final answer\nFinal Answer: done"]), interpreter, 3
    )
    assert not score_case(vis, run, 0).extra["executable"]
    # each case gets a fresh kernel; the cell limit ends a run
    run = run_case("q", scripted([call("print(x)")] * 2), interpreter, 1)
    assert len(run.cells) == 1 and not run.cells[0].ok and "NameError" in run.cells[0].output


def tiny_backend(byte_tokenizer):
    model = make_tiny_model(vocab_size=512, max_position_embeddings=2048, num_hidden_layers=1)
    model.generation_config = GenerationConfig(
        vocab_size=byte_tokenizer.vocab_size, pad_token_id=byte_tokenizer.eod_id
    )
    return model, LocalBackend(model, byte_tokenizer, batch_size=4)


def greedy(model, tokenizer, ids, steps):
    """Plain greedy decoding (a full forward pass per token) to the end of the turn."""
    ids, start = list(ids), len(ids)
    stops = {tokenizer.special_tokens[n] for n in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1, : tokenizer.vocab_size].argmax())
            if token in stops:
                break
            ids.append(token)
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_tool_use_tiny_model_end_to_end(tmp_path, byte_tokenizer):
    model, backend = tiny_backend(byte_tokenizer)
    rows = [
        {"id": "p", "tools": [SEARCH], "query": "Who won?", "response": 'Thought: x\nAction: web_search\nAction Input: {"query": "winner"}'},
        {"id": "n", "tools": [SEARCH], "query": "Hi!", "response": "Thought: x\nFinal Answer: Hello"},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "cases.jsonl", rows)
    result = get_task("tool-use").run(backend, EvalSettings(data=data, max_new_tokens=8, progress=False))
    for row, prediction in zip(rows, result.predictions, strict=True):
        ids = make_context(byte_tokenizer, react_question(row["tools"], row["query"]), None,
                           "You are a helpful assistant.", 2048)[1]  # fmt: skip
        assert prediction.extra["reply"] == greedy(model, byte_tokenizer, ids, 8).strip()
    assert result.metrics["tool_selection_accuracy"] == 0.0  # a random model writes no "\nAction: "
    assert result.metrics["false_positive_rate"] == 0.0 and set(result.metrics) == {
        "tool_selection_accuracy", "action_input_rouge_l", "false_positive_rate"}  # fmt: skip


@needs_bwrap
def test_code_interpreter_tiny_model_end_to_end(tmp_path, byte_tokenizer):
    model, backend = tiny_backend(byte_tokenizer)
    data = write_jsonl(tmp_path / "ci.jsonl", [{"id": "m1", "tag": "math", "query": "2+2?", "answer": 4}])
    result = get_task("code-interpreter").run(
        backend, EvalSettings(data=data, max_new_tokens=6, progress=False)
    )
    (prediction,) = result.predictions
    question = react_question([PythonTool().spec()], "2+2?")
    ids = make_context(byte_tokenizer, question, None, "You are a helpful assistant.", 2048)[1]
    assert prediction.extra["transcript"] == greedy(model, byte_tokenizer, ids, 6)  # the model's reply
    assert (
        prediction.extra["cells"] == 0 and not prediction.extra["executable"]
    )  # a random model writes no code
    assert prediction.correct is False and prediction.reference == 4
    assert result.metrics == {"executable_rate": 0.0, "math_executable_rate": 0.0, "math_accuracy": 0.0}
