"""Self-instructed tool-use (ReAct) training data, as the Qwen report's agent data (§3.3): a model is
few-shot prompted with seed queries to write new ones for the offered tools, the agent loop answers
each with the tools executed for real, and only samples that pass every rule are kept. Several
rounds run; each round's prompts draw their examples from the previous round's kept samples.

The rules, each a rejection reason counted in the report (REASONS):

- bad_query: the written query is empty, longer than MAX_QUERY_CHARS, or holds ReAct keywords;
- near_duplicate: its character 3-gram Jaccard similarity to a seed or to any earlier query (kept or
  not) reaches `max_similarity` (default 0.7), compared after NFKC, lower case and one space per gap;
- format_error: the run or the sample does not parse (no ReAct reply, a reply cut by the token limit,
  tool calls without results, ReAct keywords inside message text, an empty final answer);
- no_final_answer: the step limit was reached; no_tool_call: the answer came without any tool;
- unknown_tool: an action names a tool that was not offered;
- invalid_arguments: the arguments are not a JSON object valid for the tool's JSON schema (jsonschema),
  or hold names the schema does not list (the tools refuse those too);
- observation_mismatch: a tool message is not what the tool returned (checked against the run's own
  record, or by running the tools again in a fresh session);
- tool_error: the last observation is an error ("Error..." or a Python traceback) or empty;
- inconsistent_answer: the final answer disagrees with the last observation: with a number in the
  observation, the answer must hold its last number (rounded to at least min(its decimals, 2) places);
  otherwise the answer must share a word of 3+ letters (or a CJK character) with it;
- generation_error: the generator refused the prompt (e.g. longer than the context).

The output is OpenAI-style JSONL, {"messages": [user, assistant with tool_calls, tool, ..., assistant],
"tools": [specs]} per line, which `qwenkit sft` reads unchanged (qwenkit.train.sft_data). The model
runs in the caller's process (`LocalGenerator`: the decoding core, the ReAct agent loop) or behind
any OpenAI-compatible server (`ApiGenerator`: /v1/chat/completions with `tools`, so a strong served
model can write data for a small one).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qwenkit.agent.interpreter import PythonTool, extract_code
from qwenkit.agent.loop import (
    BUILTIN_TOOLS,
    Final,
    TextDelta,
    ToolCalled,
    ToolRegistry,
    ToolResult,
    run_agent,
)
from qwenkit.agent.react import Tool, react_turns, tool
from qwenkit.errors import QwenkitError

SEED_FILE = Path(__file__).parent / "data" / "self_instruct_seeds.jsonl"
MAX_QUERY_CHARS = 500
NGRAM = 3
REACT_KEYWORDS = ("Thought:", "Action:", "Action Input:", "Observation:", "Final Answer:")
REASONS = {
    "bad_query": "the written query is empty, too long or holds ReAct keywords",
    "near_duplicate": "the query is too similar to a seed or an earlier query",
    "format_error": "the reply or the sample does not parse",
    "no_final_answer": "no final answer within the step limit",
    "no_tool_call": "answered without calling a tool",
    "unknown_tool": "an action names a tool that was not offered",
    "invalid_arguments": "the arguments do not validate against the tool's schema",
    "observation_mismatch": "a tool result is not what the tool returned",
    "tool_error": "the last observation is an error or empty",
    "inconsistent_answer": "the final answer disagrees with the last observation",
    "generation_error": "the generator refused the prompt",
}
# The wording that the demo model follows best of those tried (a longer one made it answer in ReAct
# instead); strong models need no more, and the first line of the reply is the query (clean_query).
QUERY_INSTRUCTION = "You write new questions for an assistant that has these tools: {tools}"
QUERY_REQUEST = "Write a new question."


class Rejected(Exception):
    """A sample that breaks a rule: `reason` is a key of REASONS, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# --- tools -------------------------------------------------------------------------------------------


def load_function(reference: str) -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    module_name, sep, name = reference.rpartition(":")
    if not sep or not module_name or not name.isidentifier():
        raise QwenkitError(f"a tool function is named module:function or file.py:function, got {reference!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise QwenkitError(f"tool file {path} does not exist")
            spec = importlib.util.spec_from_file_location(f"qwenkit_user_tools.{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except QwenkitError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import is reported in one line
        raise QwenkitError(
            f"cannot import the tool module {module_name!r}: {type(e).__name__}: {e}"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise QwenkitError(f"{module_name} has no function {name!r}")
    return function


def load_tools(spec: str, **interpreter_options) -> ToolRegistry:
    """A registry from a comma-separated tool list: built-in names (calculator, python), Python
    functions (`module:function`, `file.py:function`: the spec comes from the name, first docstring line
    and type hints) and JSON-schema tools (`spec.json=module:function`: the OpenAI function spec from
    the file, run by the function)."""
    from jsonschema import SchemaError, validators

    from qwenkit.agent.loop import tool_from_spec

    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise QwenkitError("--tools needs at least one tool")
    registry = ToolRegistry()
    try:
        for item in items:
            if item in BUILTIN_TOOLS:
                registry.add(next(iter(ToolRegistry.from_names([item], **interpreter_options))))
            elif "=" in item:
                schema_path, _, reference = item.partition("=")
                try:
                    body = json.loads(Path(schema_path).read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise QwenkitError(f"cannot read the tool spec {schema_path}: {e}") from None
                added = registry.add(tool_from_spec(body, load_function(reference)))
                try:
                    validators.validator_for(added.parameters).check_schema(added.parameters)
                except SchemaError as e:
                    raise QwenkitError(
                        f"tool {added.name}: parameters are not a valid JSON schema: {e.message}"
                    ) from None
            elif ":" in item:
                registry.add(tool(load_function(item)))
            else:
                raise QwenkitError(
                    f"unknown tool {item!r}: use {', '.join(BUILTIN_TOOLS)}, module:function, file.py:function "
                    "or spec.json=module:function"
                )
    except BaseException:
        registry.close()
        raise
    return registry


def reset_sessions(registry: ToolRegistry) -> None:
    """Restart the code interpreter kernels that have started, so samples never share state."""
    for t in registry:
        if isinstance(t, PythonTool) and t._interpreter is not None:
            t._interpreter.restart()


# --- queries -----------------------------------------------------------------------------------------


def normalize_query(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    """Character n-grams of the normalized text (the text itself when shorter than n)."""
    text = normalize_query(text)
    return frozenset(text[i : i + n] for i in range(len(text) - n + 1)) or frozenset([text])


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class QueryIndex:
    """The queries seen so far, for the near-duplicate rule. Exact Jaccard over every earlier query,
    written by hand: a run holds thousands of queries, which a set intersection each handles at once,
    and exact scores keep the rule free of MinHash's estimation error."""

    def __init__(self, max_similarity: float = 0.7) -> None:
        if not 0.0 < max_similarity <= 1.0:
            raise QwenkitError(f"max_similarity must be in (0, 1], got {max_similarity}")
        self.max_similarity = max_similarity
        self.queries: list[tuple[str, frozenset[str]]] = []

    def closest(self, query: str) -> tuple[float, str | None]:
        grams = ngrams(query)
        return max(((jaccard(grams, g), q) for q, g in self.queries), default=(0.0, None))

    def add(self, query: str) -> None:
        self.queries.append((query, ngrams(query)))

    def check_and_add(self, query: str) -> None:
        """Raise Rejected("near_duplicate") for a query too close to an earlier one, else remember it."""
        score, other = self.closest(query)
        if score >= self.max_similarity:
            raise Rejected("near_duplicate", f"Jaccard {score:.2f} with {other!r:.80}")
        self.add(query)


def clean_query(reply: str) -> str:
    """The query in a writer's reply: its first non-empty line, without a leading "Question:" label."""
    line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    return re.sub(r"^(?:Question|问题)\s*[:：]\s*", "", line).strip()


def check_query(query: str) -> None:
    if not query:
        raise Rejected("bad_query", "empty")
    if len(query) > MAX_QUERY_CHARS:
        raise Rejected("bad_query", f"{len(query)} characters (at most {MAX_QUERY_CHARS})")
    if any(k in query for k in REACT_KEYWORDS):
        raise Rejected("bad_query", f"ReAct keywords in {query!r:.80}")


def first_query(record: dict[str, Any]) -> str:
    """The user message a sample answers (its last user message before the first tool call)."""
    query = None
    for message in record["messages"]:
        if message.get("role") == "user":
            query = message.get("content")
        if message.get("tool_calls"):
            break
    if not isinstance(query, str):
        raise QwenkitError("a seed sample needs a user message before its tool calls")
    return query


def query_prompt(tools: Sequence[Tool], examples: Sequence[str]) -> list[dict[str, str]]:
    """The few-shot chat prompt that asks for one new query: the tools in the system message, then each
    example as the answer to QUERY_REQUEST, then the request once more."""
    lines = [
        f"- {t.name}: {t.description} Parameters: {json.dumps(t.parameters, ensure_ascii=False)}"
        for t in tools
    ]
    messages = [{"role": "system", "content": QUERY_INSTRUCTION.format(tools="\n".join(lines))}]
    for example in examples:
        messages += [{"role": "user", "content": QUERY_REQUEST}, {"role": "assistant", "content": example}]
    return [*messages, {"role": "user", "content": QUERY_REQUEST}]


# --- the rules on a finished sample -----------------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[\u4e00-\u9fff]|[^\W\d_\u4e00-\u9fff]{3,}")  # a CJK character, or 3+ letters


def _numbers(text: str) -> list[tuple[float, int]]:
    """(value, decimals) of each number in `text`; thousands separators are read as such."""
    found = []
    for m in _NUMBER.finditer(_THOUSANDS.sub("", text)):
        mantissa = m.group().lower().split("e")[0]
        found.append((float(m.group()), len(mantissa.split(".")[1]) if "." in mantissa else 0))
    return found


def answer_agrees(answer: str, observation: str) -> bool:
    """The consistency rule (module docstring): the last number of the observation appears in the
    answer, rounded to at least min(its decimals, 2) places; without numbers, a shared word."""
    observed = _numbers(observation)
    if observed:
        target, places = observed[-1]
        for value, decimals in _numbers(answer):
            if decimals >= min(places, 2) and abs(value - target) <= 0.5 * 10**-decimals + 1e-9 * abs(target):
                return True
        return False
    words = {w.lower() for w in _WORD.findall(observation)}
    return bool(words & {w.lower() for w in _WORD.findall(answer)})


def is_tool_error(observation: str) -> bool:
    text = observation.strip()
    return not text or text.startswith("Error") or "Traceback (most recent call last)" in text


def parse_arguments(tool_: Tool, arguments: str) -> dict[str, Any]:
    """The arguments object as the tool reads it: a JSON object, or plain text for a tool with one
    string parameter (code in fences or JSON for the python tool), validated against the tool's schema."""
    from jsonschema import ValidationError, validators

    properties = tool_.parameters.get("properties", {})
    text = arguments.strip()
    if text.startswith("{"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise Rejected("invalid_arguments", f"not valid JSON ({e.msg})") from None
    elif len(properties) == 1 and next(iter(properties.values())).get("type") == "string":
        name = next(iter(properties))
        values = {name: extract_code(text) if isinstance(tool_, PythonTool) else text}
    else:
        raise Rejected("invalid_arguments", "not a JSON object")
    if not isinstance(values, dict):
        raise Rejected("invalid_arguments", "not a JSON object")
    unknown = [name for name in values if name not in properties]
    if unknown:
        raise Rejected("invalid_arguments", f"unknown arguments {unknown}")
    try:
        validators.validator_for(tool_.parameters)(tool_.parameters).validate(values)
    except ValidationError as e:
        raise Rejected("invalid_arguments", e.message) from None
    return values


def check_sample(
    record: dict[str, Any], tools: ToolRegistry, observations: Sequence[str] | None = None
) -> None:
    """Raise Rejected for the first rule `record` breaks ({"messages", "tools"}, module docstring).
    `observations`: what the tools returned during the run, in call order; None runs the sample's
    calls again, in order, in fresh tool sessions, and compares their output."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Rejected("format_error", "no messages")
    body = messages[1:] if messages[0].get("role") == "system" else messages
    try:
        react_turns(body)
    except (QwenkitError, KeyError, TypeError, AttributeError) as e:
        raise Rejected("format_error", str(e)) from None
    if not body or body[-1].get("role") != "assistant" or body[-1].get("tool_calls"):
        raise Rejected("format_error", "the sample must end with the assistant's final answer")
    answer = body[-1].get("content") or ""
    if not answer.strip():
        raise Rejected("format_error", "empty final answer")
    for message in body:
        if message.get("role") == "assistant" and any(
            k in (message.get("content") or "") for k in REACT_KEYWORDS
        ):
            raise Rejected("format_error", "ReAct keywords inside an assistant message")
    calls = [
        call["function"] for m in body if m.get("role") == "assistant" for call in m.get("tool_calls") or []
    ]
    results = [m.get("content") or "" for m in body if m.get("role") == "tool"]
    if not calls:
        raise Rejected("no_tool_call")
    offered = {spec.get("function", spec).get("name") for spec in record.get("tools") or []}
    for call in calls:
        if call["name"] not in offered or call["name"] not in tools:
            raise Rejected("unknown_tool", repr(call["name"]))
        parse_arguments(tools[call["name"]], call["arguments"])
    if observations is None:
        reset_sessions(tools)
        observations = [tools.run(call["name"], call["arguments"]).text for call in calls]
    for k, (given, real) in enumerate(zip(results, observations, strict=True)):
        if given != real:
            raise Rejected("observation_mismatch", f"tool result {k}: {given!r:.60} is not {real!r:.60}")
    if is_tool_error(results[-1]):
        raise Rejected("tool_error", results[-1][:120])
    if not answer_agrees(answer, results[-1]):
        raise Rejected("inconsistent_answer", f"{answer!r:.60} against {results[-1]!r:.60}")


# --- generators --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One answered query: the sample's messages and what the tools returned, in call order."""

    messages: list[dict[str, Any]]
    observations: list[str]


class Generator(Protocol):
    def write_queries(self, prompts: list[list[dict[str, str]]], seed: int) -> list[str | Rejected]: ...

    def answer(self, query: str, tools: ToolRegistry, max_steps: int) -> Run: ...


def _call(k: int, name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": arguments}}


def canonical_arguments(tools: ToolRegistry, name: str, arguments: str) -> str:
    """The Action Input as a JSON string (OpenAI tool_calls form): a JSON object stays as written,
    plain text for a one-parameter tool becomes {"param": text}; other inputs are left as written
    (the arguments rule rejects them)."""
    if name not in tools or arguments.strip().startswith("{"):
        return arguments.strip()
    try:
        return json.dumps(parse_arguments(tools[name], arguments), ensure_ascii=False)
    except Rejected:
        return arguments.strip()


def react_run(query: str, events: Iterator[Any], tools: ToolRegistry) -> Run:
    """A ReAct agent run's events -> the sample's messages: each call's thought as the content of an
    assistant message with one tool call, its result as a tool message, then the final answer."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": query}]
    observations: list[str] = []
    reply = ""
    for event in events:
        if isinstance(event, TextDelta):
            reply += event.text
        elif isinstance(event, ToolCalled):
            thought = ("\n" + reply)[: ("\n" + reply).rfind("\nAction:")].strip()
            thought = re.sub(r"^Thought:\s*", "", thought).strip()
            arguments = canonical_arguments(tools, event.name, event.arguments)
            messages.append({"role": "assistant", "content": thought,
                             "tool_calls": [_call(len(observations), event.name, arguments)]})  # fmt: skip
            reply = ""
        elif isinstance(event, ToolResult):
            messages.append(
                {"role": "tool", "tool_call_id": f"call_{len(observations)}", "content": event.text}
            )
            observations.append(event.text)
        elif isinstance(event, Final):
            if event.reason == "max_steps":
                raise Rejected("no_final_answer")
            if event.reason != "final_answer":
                raise Rejected("no_tool_call" if not observations else "format_error", "no ReAct reply")
            messages.append({"role": "assistant", "content": event.answer})
    return Run(messages, observations)


class LocalGenerator:
    """A qwenkit model in this process: queries from the decoding core (one batch per round, sampled),
    answers from the ReAct agent loop (`agent_settings`, greedy by default)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 0.95, agent_settings: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.query_settings = {"max_new_tokens": max_new_tokens, "do_sample": True,
                               "temperature": temperature, "top_p": top_p}  # fmt: skip
        self.agent_settings = {"do_sample": False, "max_new_tokens": 256, **(agent_settings or {})}

    def write_queries(self, prompts, seed):
        from qwenkit.chatml import render_messages
        from qwenkit.generation import generate_text

        ids = [render_messages(self.tokenizer, p, prompt=True).input_ids for p in prompts]
        try:
            out = generate_text(self.model, self.tokenizer, ids, ["\n"], seed=seed, **self.query_settings)
        except QwenkitError as e:
            return [Rejected("generation_error", str(e))] * len(prompts)
        return [clean_query(c.text) for c in out]

    def answer(self, query, tools, max_steps):
        from qwenkit.agent.loop import local_complete

        complete = local_complete(self.model, self.tokenizer, **self.agent_settings)
        try:
            return react_run(query, run_agent(query, complete, tools, max_steps=max_steps), tools)
        except QwenkitError as e:
            raise Rejected("generation_error", str(e)) from None


class ApiGenerator:
    """An OpenAI-compatible server: queries and answers through /v1/chat/completions; answers use its
    function calling (`tools`), each requested call run here and sent back as a tool message."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 0.95,
                 agent_temperature: float = 0.0, agent_max_new_tokens: int = 256,
                 timeout: float = 600.0) -> None:  # fmt: skip
        import httpx

        from qwenkit.eval.remote import api_root

        self.url = api_root(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        try:
            served = [m.get("id") for m in self._request("GET", "/models").get("data") or []]
            if model is not None and model not in served:
                raise QwenkitError(
                    f"the server at {self.url} has no model {model!r}; it serves: {', '.join(map(str, served))}"
                )
            if not served and model is None:
                raise QwenkitError(f"the server at {self.url} serves no model; name one with --model-name")
        except BaseException:
            self.client.close()
            raise
        self.model = model or served[0]
        self.query_settings = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.agent_settings = {"temperature": agent_temperature, "max_tokens": agent_max_new_tokens}

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON answer; a 4xx is Rejected("generation_error") (this prompt only), anything else that
        goes wrong ends the run with a QwenkitError."""
        import httpx

        url = self.url + path
        try:
            response = self.client.request(method, url, json=body)
        except httpx.HTTPError as e:
            raise QwenkitError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            if response.status_code < 500 and response.status_code not in (401, 403, 404):
                raise Rejected("generation_error", f"{response.status_code}: {message}")
            raise QwenkitError(f"the server at {url} answered {response.status_code}: {message}")
        try:
            return response.json()
        except ValueError:
            raise QwenkitError(f"the server at {url} answered with something that is not JSON") from None

    def _chat(self, **body) -> tuple[dict[str, Any], str | None]:
        answer = self._request("POST", "/chat/completions", {"model": self.model, **body})
        try:
            choice = answer["choices"][0]
            return choice["message"], choice.get("finish_reason")
        except (KeyError, IndexError, TypeError):
            raise QwenkitError(
                f"the server at {self.url} answered without a chat completion choice"
            ) from None

    def write_queries(self, prompts, seed):
        queries: list[str | Rejected] = []
        for k, prompt in enumerate(prompts):
            try:
                message, _ = self._chat(messages=prompt, seed=seed + k, **self.query_settings)
                queries.append(clean_query(message.get("content") or ""))
            except Rejected as e:
                queries.append(e)
        return queries

    def answer(self, query, tools, max_steps):
        messages: list[dict[str, Any]] = [{"role": "user", "content": query}]
        observations: list[str] = []
        while True:
            message, finish = self._chat(messages=messages, tools=tools.specs(), **self.agent_settings)
            calls = message.get("tool_calls") or []
            if finish == "length":
                raise Rejected("format_error", "the reply reached the token limit")
            if not calls:
                content = message.get("content")
                if not isinstance(content, str):
                    raise Rejected("format_error", "a reply with neither content nor tool calls")
                messages.append({"role": "assistant", "content": content})
                return Run(messages, observations)
            if len(observations) + len(calls) > max_steps:
                raise Rejected("no_final_answer")
            entries = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if (
                    not isinstance(function, dict)
                    or not isinstance(function.get("name"), str)
                    or not isinstance(function.get("arguments"), str)
                ):
                    raise Rejected("format_error", "a tool call without a name and string arguments")
                entries.append(
                    _call(len(observations) + len(entries), function["name"], function["arguments"])
                )
            messages.append(
                {"role": "assistant", "content": message.get("content") or "", "tool_calls": entries}
            )
            for entry in entries:
                output = tools.run(entry["function"]["name"], entry["function"]["arguments"]).text
                messages.append({"role": "tool", "tool_call_id": entry["id"], "content": output})
                observations.append(output)

    def close(self) -> None:
        self.client.close()


# --- rounds ------------------------------------------------------------------------------------------


@dataclass
class RoundReport:
    round: int
    attempted: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few "query: detail" lines


@dataclass
class SelfInstructResult:
    samples: list[dict[str, Any]]
    rounds: list[RoundReport]

    def rejected(self) -> Counter:
        return sum((r.rejected for r in self.rounds), Counter())

    def report(self) -> dict[str, Any]:
        """The JSON report: totals and per-round counts by reason, with a few rejected queries each."""
        return {
            "kept": len(self.samples),
            "attempted": sum(r.attempted for r in self.rounds),
            "rejected": dict(sorted(self.rejected().items())),
            "reasons": REASONS,
            "rounds": [
                {
                    "round": r.round,
                    "attempted": r.attempted,
                    "kept": r.kept,
                    "rejected": dict(sorted(r.rejected.items())),
                    "examples": r.examples,
                }
                for r in self.rounds
            ],  # fmt: skip
        }


def read_seeds(path: str | Path, tools: ToolRegistry) -> list[dict[str, Any]]:
    """The seed samples (the output's JSONL format) whose tool calls all name offered tools."""
    from qwenkit.train.sft_data import read_sft_file

    seeds = []
    for record in read_sft_file(path):
        if record.error is not None:
            raise QwenkitError(f"{path}: sample {record.index}: {record.error}")
        names = [c["function"]["name"] for m in record.messages for c in m.get("tool_calls") or []]
        if names and all(name in tools for name in names):
            seeds.append({"messages": record.messages, "tools": record.tools})
    if not seeds:
        offered = ", ".join(t.name for t in tools)
        raise QwenkitError(f"{path}: no seed sample calls only the offered tools ({offered})")
    return seeds


def self_instruct(
    generator: Generator,
    tools: ToolRegistry,
    seeds: Sequence[dict[str, Any]],
    rounds: int = 2,
    per_round: int = 16,
    shots: int = 3,
    max_steps: int = 4,
    max_similarity: float = 0.7,
    seed: int = 0,
    progress: bool = True,
) -> SelfInstructResult:
    """Run `rounds` rounds of `per_round` written queries each (module docstring); each round's few-shot
    examples come from the previous round's kept samples (the seeds for the first round, and again
    whenever a round keeps nothing)."""
    from tqdm import tqdm

    if rounds < 1 or per_round < 1 or shots < 1 or max_steps < 1:
        raise QwenkitError("rounds, per_round, shots and max_steps must be at least 1")
    if not seeds:
        raise QwenkitError("self-instruct needs at least one seed sample")
    rng = random.Random(seed)
    index = QueryIndex(max_similarity)
    for record in seeds:
        index.add(first_query(record))
    pool = [first_query(record) for record in seeds]
    specs = tools.specs()
    samples: list[dict[str, Any]] = []
    reports = []
    for number in range(1, rounds + 1):
        report = RoundReport(number)
        prompts = [
            query_prompt(list(tools), rng.sample(pool, min(shots, len(pool)))) for _ in range(per_round)
        ]
        queries = generator.write_queries(prompts, seed=seed * 1_000_003 + number)
        kept: list[str] = []
        for query in tqdm(queries, desc=f"round {number}/{rounds}", unit="query", disable=not progress):
            report.attempted += 1
            try:
                if isinstance(query, Rejected):
                    raise query
                check_query(query)
                index.check_and_add(query)
                reset_sessions(tools)
                run = generator.answer(query, tools, max_steps)
                record = {"messages": run.messages, "tools": specs}
                check_sample(record, tools, run.observations)
            except Rejected as e:
                report.rejected[e.reason] += 1
                shown = report.examples.setdefault(e.reason, [])
                if len(shown) < 3:
                    shown.append(f"{str(query)!r:.100}: {e.detail}"[:240])
                continue
            samples.append(record)
            kept.append(query)
            report.kept += 1
        reports.append(report)
        pool = kept or pool
    return SelfInstructResult(samples, reports)


def write_samples(path: str | Path, result: SelfInstructResult) -> Path:
    """The kept samples as JSONL at `path`, the report as `path`.report.json; returns the report's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in result.samples:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    report_path = path.with_name(path.name + ".report.json")
    report_path.write_text(json.dumps(result.report(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report_path
