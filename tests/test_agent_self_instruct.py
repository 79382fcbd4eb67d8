"""Self-instructed agent data (qwenkit.agent.self_instruct, `qwenkit data self-instruct`): a run on the
demo model keeps only samples that pass every rule and trains with `qwenkit sft`; each rule rejects a
sample that breaks it; --api against a served model; user tools; one-line errors."""

import copy
import json
from pathlib import Path

import pytest
from conftest import LiveServer

import qwenkit
from qwenkit.agent import self_instruct as si
from qwenkit.agent.loop import Final, TextDelta, ToolCalled, ToolRegistry, ToolResult
from qwenkit.agent.react import calculator
from qwenkit.cli import main
from qwenkit.errors import QwenkitError

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "messages": [
        {"role": "user", "content": "What is 37 * 48?"},
        {"role": "assistant", "content": "I need to calculate 37 * 48.", "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "calculator", "arguments": "{\"expression\": \"37 * 48\"}"}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "1776"},
        {"role": "assistant", "content": "The answer is 1,776."},
    ],
    "tools": [calculator.spec()],
}  # fmt: skip


@pytest.fixture(scope="module")
def tools():
    with ToolRegistry.from_names(["calculator"]) as registry:
        yield registry


def changed(edit) -> dict:
    sample = copy.deepcopy(GOOD)
    edit(sample["messages"])
    return sample


def set_arguments(text):
    def edit(m):
        m[1]["tool_calls"][0]["function"]["arguments"] = text

    return edit


def test_a_good_sample_passes_with_recorded_and_with_rerun_observations(tools):
    si.check_sample(GOOD, tools, ["1776"])
    si.check_sample(GOOD, tools)


@pytest.mark.parametrize(
    "reason, edit",
    [
        ("format_error", lambda m: m.pop(2)),  # a call without its result
        ("format_error", lambda m: m[3].update(content="Final Answer: 1776")),  # ReAct text in a message
        ("format_error", lambda m: m[3].update(content=" ")),
        ("format_error", lambda m: m.pop()),  # ends after the tool result
        ("no_tool_call", lambda m: m.__delitem__(slice(1, 3))),
        ("unknown_tool", lambda m: m[1]["tool_calls"][0]["function"].update(name="search")),
        ("invalid_arguments", set_arguments("{\"expr\": \"37 * 48\"}")),
        ("invalid_arguments", set_arguments("{\"expression\": 37}")),
        ("invalid_arguments", set_arguments("{\"expression\": \"37 * 48\"")),
        ("invalid_arguments", set_arguments("{}")),  # the required expression missing
        ("observation_mismatch", lambda m: m[2].update(content="1777")),
        ("inconsistent_answer", lambda m: m[3].update(content="The answer is 1777.")),
        ("inconsistent_answer", lambda m: m[3].update(content="I do not know.")),
    ],
)  # fmt: skip
def test_each_rule_rejects_a_sample_that_breaks_it(tools, reason, edit):
    with pytest.raises(si.Rejected) as caught:
        si.check_sample(changed(edit), tools)
    assert caught.value.reason == reason


def test_a_tool_not_offered_by_the_sample_is_unknown_even_if_registered(tools):
    sample = copy.deepcopy(GOOD)
    sample["tools"] = []
    with pytest.raises(si.Rejected, match="unknown_tool"):
        si.check_sample(sample, tools)


def test_tool_errors_and_empty_results_are_rejected(tools):
    def edit(m):
        m[1]["tool_calls"][0]["function"]["arguments"] = '{"expression": "1 / 0"}'
        m[2]["content"] = calculator.call('{"expression": "1 / 0"}')
        m[3]["content"] = "It cannot be divided: ZeroDivisionError"

    assert changed(edit)["messages"][2]["content"].startswith("Error")
    with pytest.raises(si.Rejected, match="tool_error"):
        si.check_sample(changed(edit), tools)
    assert si.is_tool_error("") and si.is_tool_error("Traceback (most recent call last):\n ...")


def test_plain_text_arguments_of_a_one_string_tool_are_read_as_the_tool_reads_them(tools):
    sample = changed(set_arguments("37 * 48"))
    si.check_sample(sample, tools)
    assert si.canonical_arguments(tools, "calculator", " 37 * 48 ") == '{"expression": "37 * 48"}'


@pytest.mark.parametrize(
    "answer, observation, agrees",
    [
        ("The answer is 1776.", "1776", True),
        ("The answer is 1,776.", "1776", True),
        ("答案是1776。", "1776", True),
        ("About 3.14.", "3.14159265", True),
        ("About 3.", "3.14159265", False),  # fewer than min(8, 2) decimals
        ("It is 7.75 km.", "7.75", True),
        ("It is 7.8 km.", "7.75", False),
        ("The answer is -5.", "-5", True),
        ("The answer is 5.", "-5", False),
        ("The first value is 1 and the sum is 6.", "[1, 2, 3]\n6", True),
        ("The capital is Paris.", "Paris, France", True),
        ("No idea.", "Paris, France", False),
        ("天气晴朗。", "北京：晴", True),
    ],
)
def test_answer_agrees_with_the_last_observation(answer, observation, agrees):
    assert si.answer_agrees(answer, observation) is agrees


def test_queries_near_duplicates_and_bad_ones():
    index = si.QueryIndex(0.7)
    index.check_and_add("What is 123 * 45?")
    index.check_and_add("What is 678 + 91?")  # different numbers and operator: far enough
    with pytest.raises(si.Rejected, match="near_duplicate"):
        index.check_and_add("what is  123 * 46 ?")  # case and spacing do not count
    for bad in (
        "",
        "x" * (si.MAX_QUERY_CHARS + 1),
        "Action: calculator",
        "Thought: I now know the final answer",
    ):
        with pytest.raises(si.Rejected, match="bad_query"):
            si.check_query(bad)
    assert si.clean_query("\n Question: What is 2 + 2?\nmore") == "What is 2 + 2?"
    with pytest.raises(QwenkitError):
        si.QueryIndex(0.0)


def test_jaccard_agrees_with_datasketch_minhash():
    datasketch = pytest.importorskip("datasketch")
    pairs = [("What is 123 * 45?", "What is 123 * 46?"), ("计算 456 * 78。", "请帮我算一下 1000 减 357。"),
             ("How far did I walk in all?", "How far did you walk today?")]  # fmt: skip
    for a, b in pairs:
        grams = si.ngrams(a), si.ngrams(b)
        hashes = []
        for g in grams:
            h = datasketch.MinHash(num_perm=512, seed=1)
            h.update_batch([x.encode() for x in g])
            hashes.append(h)
        assert abs(si.jaccard(*grams) - hashes[0].jaccard(hashes[1])) < 0.1


def test_react_runs_become_openai_messages_and_unfinished_runs_are_rejected(tools):
    events = [TextDelta("Thought: I need to calculate 2 + 2.\nAction: calculator\nAction Input: 2 + 2\n"),
              ToolCalled("calculator", "2 + 2"), ToolResult("calculator", "4"),
              TextDelta(" I now know the final answer\nFinal Answer: 4"),
              Final("4", "final_answer", "...")]  # fmt: skip
    run = si.react_run("What is 2 + 2?", iter(events), tools)
    assert run.observations == ["4"]
    assert run.messages[1]["content"] == "I need to calculate 2 + 2."
    assert run.messages[1]["tool_calls"][0]["function"]["arguments"] == '{"expression": "2 + 2"}'
    si.check_sample({"messages": run.messages, "tools": [calculator.spec()]}, tools, run.observations)
    with pytest.raises(si.Rejected, match="no_final_answer"):
        si.react_run("q", iter([*events[:3], Final(None, "max_steps", "")]), tools)
    with pytest.raises(si.Rejected, match="no_tool_call"):
        si.react_run("q", iter([TextDelta("Hello"), Final("Hello", "plain_reply", "Hello")]), tools)


def test_the_shipped_seeds_pass_every_rule():
    with ToolRegistry.from_names(["calculator", "python"], timeout=20) as registry:
        seeds = si.read_seeds(si.SEED_FILE, registry)
        assert {s["messages"][1]["tool_calls"][0]["function"]["name"] for s in seeds} == {
            "calculator",
            "python",
        }
        for seed in seeds:
            si.check_sample(seed, registry)
    with ToolRegistry.from_names(["calculator"]) as registry:  # only the seeds that use offered tools
        assert all(
            s["tools"][0]["function"]["name"] == "calculator" for s in si.read_seeds(si.SEED_FILE, registry)
        )


def test_user_tools_from_functions_files_and_json_schemas(tmp_path):
    (tmp_path / "mytools.py").write_text(
        'def shout(text: str) -> str:\n    """Upper-case a text."""\n    return text.upper()\n'
        "def weather(city: str, days: int = 1) -> str:\n    return f'{city}: sunny for {days} days'\n"
    )
    spec = {"name": "weather", "description": "The weather in a city.", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"], "additionalProperties": False}}  # fmt: skip
    (tmp_path / "weather.json").write_text(json.dumps(spec))
    spec_text = (
        f"{tmp_path / 'mytools.py'}:shout,{tmp_path / 'weather.json'}={tmp_path / 'mytools.py'}:weather"
    )
    with si.load_tools(f"calculator,{spec_text},qwenkit.agent.react:calculate") as registry:
        assert list(registry.tools) == ["calculator", "shout", "weather", "calculate"]
        assert registry["weather"].parameters == spec["parameters"]
        sample = {"messages": [
            {"role": "user", "content": "Weather in Paris for 2 days?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
            {"role": "tool", "content": "Paris: sunny for 2 days"},
            {"role": "assistant", "content": "It will be sunny in Paris for 2 days."}], "tools": registry.specs()}  # fmt: skip
        si.check_sample(sample, registry)
        sample["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris", "days": 0}'
        with pytest.raises(si.Rejected, match="invalid_arguments"):  # the schema's minimum, via jsonschema
            si.check_sample(sample, registry)
    (tmp_path / "bad.json").write_text(json.dumps({**spec, "parameters": {"type": "object", "properties": {
        "city": {"type": 5}}}}))  # fmt: skip
    for bad, message in [("searcher", "unknown tool"), ("qwenkit.agent.react:nothing", "no function"),
                         ("no_such_module_x:f", "cannot import"), (f"{tmp_path}/missing.py:f", "does not exist"),
                         (f"{tmp_path / 'bad.json'}={tmp_path / 'mytools.py'}:weather", "not a valid JSON schema"),
                         ("calculator,calculator", "two tools")]:  # fmt: skip
        with pytest.raises(QwenkitError, match=message):
            si.load_tools(bad)


def test_demo_model_run_keeps_samples_that_pass_the_rules_and_train_with_sft(tmp_path, capsys):
    out = tmp_path / "agent.jsonl"
    argv = ["data", "self-instruct", "--tools", "calculator", "--rounds", "2", "--per-round", "8",
            "--seed", "0", "--max-new-tokens", "96", "--max-steps", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "agent.jsonl.report.json").read_text())
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    # The shipped demo model (issue 17's build) mostly answers the query request with a ReAct thought, which
    # the rules reject (bad_query): how many survive depends on the model, the bookkeeping must not.
    assert report["attempted"] == 16 and report["kept"] == len(samples)
    assert report["kept"] + sum(report["rejected"].values()) == 16
    assert set(report["rejected"]) <= set(si.REASONS) and f"wrote {len(samples)} samples" in printed
    with ToolRegistry.from_names(["calculator"]) as registry:
        for sample in samples:
            si.check_sample(sample, registry)  # every rule again, with the tools run afresh
    seeds = {si.first_query(s) for s in si.read_seeds(si.SEED_FILE, registry)}
    assert not seeds & {si.first_query(s) for s in samples}
    if not samples:  # train on the seed samples instead: the same file format the verb writes
        with ToolRegistry.from_names(["calculator"]) as registry:
            seed_samples = si.read_seeds(si.SEED_FILE, registry)
        out.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in seed_samples))
    train = tmp_path / "sft"
    assert main(["sft", "--config", str(ROOT / "configs" / "sft" / "qwen-chat.yaml"),
                 "--model", str(qwenkit.default_model_path()), "--data", str(out), "--out", str(train),
                 "--train.max_steps", "2", "--train.micro_batch_size", "2", "--train.grad_accum", "1",
                 "--train.warmup_steps", "1", "--train.distributed", "ddp", "--data.max_len", "512", "--log.every", "1",
                 "--train.activation_checkpointing", "false", "--log.progress", "false"]) == 0  # fmt: skip
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)


def test_api_against_a_served_model(tmp_path):
    from qwenkit.serve.api import create_app

    model, tokenizer = qwenkit.load()
    live = LiveServer(create_app(model, tokenizer, "qwen-demo", max_batch=4))
    try:
        with ToolRegistry.from_names(["calculator"]) as registry:
            generator = si.ApiGenerator(live.url, model="qwen-demo")
            run = generator.answer("What is 37 * 48?", registry, max_steps=2)
            assert run.observations and run.messages[1]["tool_calls"][0]["function"]["name"] == "calculator"
            si.check_sample({"messages": run.messages, "tools": registry.specs()}, registry, run.observations)
            seeds = si.read_seeds(si.SEED_FILE, registry)
            result = si.self_instruct(
                generator, registry, seeds, rounds=1, per_round=6, seed=0, progress=False
            )
            generator.close()
        report = si.write_samples(tmp_path / "api.jsonl", result)
        counts = json.loads(report.read_text())
        assert counts["attempted"] == 6 and counts["kept"] + sum(counts["rejected"].values()) == 6
        with pytest.raises(QwenkitError, match="no model 'other'"):
            si.ApiGenerator(live.url, model="other")
    finally:
        live.stop()
    with pytest.raises(QwenkitError, match="cannot reach"):
        si.ApiGenerator(live.url)


def test_cli_errors_are_one_line(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps(GOOD) + "\n")
    base = ["data", "self-instruct", "--out", str(tmp_path / "o.jsonl")]
    for extra, message in [(["--api", "http://x", "--model", "m"], "either --model or --api"),
                           (["--tools", "nope"], "unknown tool"),
                           (["--tools", "python", "--seeds", str(seeds)], "no seed sample calls only")]:  # fmt: skip
        assert main([*base, *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_closes_the_api_client_even_when_a_round_fails(tmp_path, monkeypatch, capsys):
    closed = []

    class FailingApi:
        def __init__(self, *args, **kwargs):
            pass

        def write_queries(self, prompts, seed):
            raise QwenkitError("the server went away")

        def close(self):
            closed.append(True)

    monkeypatch.setattr(si, "ApiGenerator", FailingApi)
    assert main(["data", "self-instruct", "--api", "http://x", "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "the server went away" in capsys.readouterr().err and closed == [True]
