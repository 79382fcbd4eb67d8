"""The OpenAI-compatible HTTP API (`qwenkit serve`): FastAPI + uvicorn + sse-starlette over the
continuous-batching Engine.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Chat messages
become the official ChatML prompt; content is always encoded as plain text, so no message can
inject control tokens. Function calling (current `tools` and legacy `functions`) uses the
official ReAct prompt, with calls and results rendered as SFT data renders them (qwenkit.chatml,
qwenkit.agent.react), so the server reads what the model was trained on: the instruction goes
before the last user message, generation stops at "Observation:", and earlier calls and results
continue the same assistant turn. Unlike the original server, streaming works with tools.
A checkpoint whose chat template reads tools (Qwen2.5) is served in its own format instead
(`tool_format`, plan_hermes_chat): every chat prompt is the template's (qwenkit.chat_template), and
its Hermes <tool_call> replies are read by qwenkit.agent.hermes.

Log-probabilities follow OpenAI: /v1/completions' legacy `logprobs` object (with `echo`, the
prompt's own, scored by Engine.score; `max_tokens` 0 with `echo` scores only, as lm-evaluation-
harness asks), chat's `logprobs` + `top_logprobs` content entries.

Single-model server: any `model` name is accepted and answered by the loaded model (responses
name it). Every client mistake is a 4xx with OpenAI's error JSON; with an API key set, /v1 routes
need `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.util
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenkit.agent.hermes import OPEN as TOOL_CALL_OPEN
from qwenkit.agent.hermes import HermesOutput, ToolFormat, resolve_tool_format
from qwenkit.agent.react import Turn, parse_reply, react_question, react_turns, step_text
from qwenkit.chat_template import encode_chat
from qwenkit.chatml import DEFAULT_SYSTEM, render_turns
from qwenkit.errors import QwenkitError
from qwenkit.generation import REPETITION_PENALTY_RANGE, TokenLogprob, check_prompt
from qwenkit.serve.engine import Chunk, Completion, Engine, GenerationFailed, SamplingParams, kv_memory_bytes
from qwenkit.tokenizer import StreamDecoder, Tokenizer

MAX_N = 16  # choices per request
MAX_PROMPTS = 1024  # prompts per completions request; the engine queues what does not fit in a batch
MAX_LOGPROBS = 5  # top alternatives per token in /v1/completions, as OpenAI
MAX_TOP_LOGPROBS = 20  # top alternatives per token in /v1/chat/completions, as OpenAI
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_BODY_BYTES = 8 * 2**20  # bodies beyond it get 413 before anything parses them (see README)
STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    """A client error answered as OpenAI's error JSON with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# ---- request bodies (strict: wrong-typed values are errors, not coerced) ------------------------


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionCall(Body):
    name: str
    arguments: str = ""


class ToolCallIn(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None


class FunctionSpec(Body):
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class ToolSpec(Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(Body):
    name: str


class NamedTool(Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    model: str = ""
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None  # < 1e-5: greedy
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # extension (vLLM's): -1 or 0 = off
    repetition_penalty: (
        Annotated[
            float, Field(ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1], allow_inf_nan=False)
        ]
        | None
    ) = None  # extension
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedTool | None = None
    functions: list[FunctionSpec] | None = None
    function_call: Literal["auto", "none"] | NamedFunction | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


# ---- prompts --------------------------------------------------------------------------------


def _text(message: Message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def _legacy_to_current(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as plain dicts in the current form: function_call -> tool_calls, role function -> tool."""
    out = []
    for i, m in enumerate(messages):
        entry: dict[str, Any] = {"role": "tool" if m.role == "function" else m.role, "content": _text(m)}
        calls = m.tool_calls or ([ToolCallIn(function=m.function_call)] if m.function_call else [])
        if calls and m.role != "assistant":
            raise APIError(f"messages[{i}]: only assistant messages carry tool calls", param=f"messages.{i}")
        if calls:
            entry["tool_calls"] = [{"function": c.function.model_dump()} for c in calls]
        out.append(entry)
    return out


def chat_turns(messages: list[dict[str, Any]]) -> tuple[str, list[Turn], bool]:
    """(system, turns, open): leading system messages joined, each tool-calling run of assistant
    messages and their results as ONE ReAct assistant turn (react_turns); `open` when the
    conversation ends inside such a turn (after a tool result), so the model continues it."""
    system_parts = []
    while messages and messages[0]["role"] == "system":
        system_parts.append(messages[0]["content"])
        messages = messages[1:]
    system = "\n".join(system_parts) if system_parts else DEFAULT_SYSTEM
    try:
        turns, _, is_open = react_turns(messages, allow_open=True, first_index=len(system_parts))
    except QwenkitError as e:
        raise APIError(str(e), param="messages") from None
    if not is_open and (not turns or turns[-1][0] != "user"):
        raise APIError("the last message must be from the user, or a tool result", param="messages")
    return system, turns, is_open


@dataclass
class ChatPlan:
    """What one chat request turns into: prompt ids and how to read the reply."""

    prompt: list[int]
    react: bool  # parse the reply as ReAct
    allow_calls: bool
    prefix: str  # reply text already written into the prompt (a forced Action or <tool_call>)
    legacy: bool  # answer with function_call instead of tool_calls
    hermes: bool = False  # rendered with the checkpoint's chat template; read <tool_call> blocks

    def reader(self) -> ReactOutput | HermesOutput | None:
        """A fresh reader of one reply (None: the reply is plain content)."""
        if self.hermes:
            return HermesOutput(self.prefix, self.allow_calls)
        return ReactOutput(self.prefix, self.allow_calls) if self.react else None


def _tool_choice(body: ChatRequest) -> tuple[bool, list[FunctionSpec], str, str | None]:
    """(legacy, offered functions, choice "auto"/"none"/"required"/"named", forced name)."""
    if body.tools and body.functions:
        raise APIError("give either tools or functions, not both", param="functions")
    legacy = body.functions is not None or body.function_call is not None
    tools = [t.function for t in body.tools or []] or list(body.functions or [])
    choice = body.function_call if legacy else body.tool_choice
    choice = choice or ("auto" if tools else "none")
    name = None
    if isinstance(choice, NamedTool | NamedFunction):
        name = choice.function.name if isinstance(choice, NamedTool) else choice.name
        choice = "named"
    if choice in ("named", "required") and not tools:
        raise APIError("a tool choice other than 'auto' or 'none' needs tools", param="tool_choice")
    if name is not None and all(f.name != name for f in tools):
        raise APIError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return legacy, tools, choice, name


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Request messages as a chat template reads them (OpenAI's current form): legacy function_call
    becomes tool_calls, role "function" becomes "tool" (its name kept); calls keep their ids."""
    out = _legacy_to_current(messages)
    for entry, m in zip(out, messages, strict=True):
        if "tool_calls" in entry:
            ids = [c.id for c in m.tool_calls] if m.tool_calls else [None]
            entry["tool_calls"] = [{**({"id": i} if i else {}), "type": "function", **call}
                                   for i, call in zip(ids, entry["tool_calls"], strict=True)]  # fmt: skip
            entry["content"] = entry["content"] if m.content is not None else None
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                entry[key] = getattr(m, key)
    if out[-1]["role"] not in ("user", "tool"):
        raise APIError("the last message must be from the user, or a tool result", param="messages")
    return out


def plan_hermes_chat(tokenizer: Tokenizer, body: ChatRequest) -> ChatPlan:
    """The prompt of a chat request rendered with the checkpoint's chat template (tools as its
    `tools`), read as Hermes <tool_call> blocks. tool_choice "none" keeps the tools in the prompt and
    reads no calls (vLLM's default); "required" and a named function write the start of the call
    into the prompt (`<tool_call>` + the JSON up to the name, or up to `"arguments":`, ending where
    the model's own tokens would, so the model continues as if it had written it)."""
    legacy, functions, choice, name = _tool_choice(body)
    if body.functions is not None:
        tools = [{"type": "function", "function": f.model_dump(exclude_unset=True)} for f in functions]
    else:
        tools = [{"type": "function", **t.model_dump(exclude_unset=True)} for t in body.tools or []]
    prefix = ""
    if choice == "required":
        prefix = f'{TOOL_CALL_OPEN}\n{{"name": "'
    elif choice == "named":
        prefix = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments":'
    try:
        prompt = encode_chat(tokenizer, template_messages(body.messages), tools=tools or None)
    except QwenkitError as e:
        raise APIError(str(e), param="messages") from None
    allowed = {TOOL_CALL_OPEN} & set(tokenizer.special_tokens)  # written as the model writes it
    prompt += tokenizer.encode(prefix, allowed_special=allowed)
    return ChatPlan(prompt, react=False, allow_calls=bool(tools) and choice != "none", prefix=prefix,
                    legacy=legacy, hermes=True)  # fmt: skip


def plan_chat(
    tokenizer: Tokenizer, body: ChatRequest, tool_format: Literal["react", "hermes"] = "react"
) -> ChatPlan:
    """Build the prompt of a chat request. "react": ChatML, plus the ReAct instruction when tools are
    given; "hermes": the checkpoint's chat template (plan_hermes_chat)."""
    if tool_format == "hermes":
        return plan_hermes_chat(tokenizer, body)
    legacy, tools, choice, name = _tool_choice(body)
    forced = name is not None
    if forced:
        tools = [f for f in tools if f.name == name]
    system, turns, is_open = chat_turns(_legacy_to_current(body.messages))
    specs = [f.model_dump() for f in tools]
    if specs and choice != "none":
        users = [k for k, (role, _) in enumerate(turns) if role == "user"]
        if not users:
            raise APIError("tools need a user message to answer", param="messages")
        last_user = users[-1]
        question = turns[last_user][1][0][0]
        turns[last_user] = ("user", [(react_question(specs, question), False)])
    prefix = ""
    if forced or choice == "required":
        prefix = step_text("", tools[0].name if forced else None, first=not is_open)
    history_calls = any(
        role == "assistant" and any("\nAction:" in text for text, _ in pieces) for role, pieces in turns
    )
    role, pieces = turns.pop() if is_open else ("assistant", [])  # the turn the model writes
    turns.append((role, [*pieces, (prefix, False)]))
    return ChatPlan(
        prompt=render_turns(tokenizer, [("system", [(system, False)]), *turns], open=True).input_ids,
        react=bool(specs) or is_open or history_calls,
        allow_calls=bool(specs) and choice != "none",
        prefix=prefix,
        legacy=legacy,
    )


class ReactOutput:
    """Reads a ReAct reply piece by piece: `feed` returns the content to send now, `finish` the
    rest and the tool call, if any. The same reading serves streamed and whole responses, so both
    give the same content.

    Until the model's choice is known nothing is sent. After "Final Answer:" the answer is sent as
    it comes (surrounding whitespace trimmed); on "Action:" the thought before it is sent at once
    and the call is parsed at the end (qwenkit.agent.react.parse_reply). A reply with neither is
    sent whole at the end."""

    def __init__(self, prefix: str = "", allow_calls: bool = True):
        self.text, self.allow_calls = prefix, allow_calls
        self.state = "undecided"
        self.sent = 0  # how much of self.text is read
        self.scanned = 0  # how much of self.text holds no marker
        self.held_space, self.started = "", False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.state == "undecided":
            start = self.scanned  # no marker starts before it: each character is searched about once
            self.scanned = max(len(self.text) - len("Final Answer:"), 0)
            answer = self.text.find("Final Answer:", start)
            newline = self.text.find("\nAction:", start)
            action = 0 if self.text.startswith("Action:") else newline + 1 if newline >= 0 else -1
            if action >= 0 and (answer < 0 or action <= answer):
                self.state, self.sent = "action", max(action - 1, 0)  # the rest starts at "\nAction:"
                return self.text[:action].strip().removeprefix("Thought:").strip()
            if answer >= 0:
                self.state, self.sent = "answer", answer + len("Final Answer:")
        if self.state != "answer":
            return ""
        held = self.held_space + self.text[self.sent :]
        self.sent = len(self.text)
        if not self.started:
            held = held.lstrip()
        body = held.rstrip()
        self.held_space = held[len(body) :]  # sent once more text follows; dropped at the end
        self.started = self.started or bool(body)
        return body

    def finish(self):
        """(content still to send, ToolCall or None)."""
        if self.state == "answer":
            return "", None
        if self.state == "undecided":
            return self.text.strip(), None
        call = parse_reply(self.text) if self.allow_calls else None
        if call is not None and hasattr(call, "arguments"):
            return "", call
        return self.text[self.sent :].rstrip(), None


def _finish(reader: ReactOutput | HermesOutput) -> tuple[str, list]:
    """(content still to send, the reply's calls) from either reader."""
    rest, calls = reader.finish()
    if isinstance(calls, list):
        return rest, calls
    return rest, [] if calls is None else [calls]


# ---- the app --------------------------------------------------------------------------------


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# OpenAI's error JSON (what `_error` sends) as the OpenAPI schema advertises it.
ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _openapi_schema(app: FastAPI, keyed: bool) -> dict:
    """FastAPI's schema made to say what the server answers: a request that fails validation gets
    400 with OpenAI's error JSON (FastAPI would advertise 422), and with an API key the /v1 routes
    take a bearer token and may answer 401."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for path, item in schema["paths"].items():
            for operation in item.values():
                responses = operation["responses"]
                if responses.pop("422", None) is not None:
                    responses["400"] = {"description": "Invalid request", **error}
                if keyed and path.startswith("/v1"):
                    responses["401"] = {"description": "Missing or incorrect API key", **error}
                    operation["security"] = [{"apiKey": []}]
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas["Error"] = ERROR_SCHEMA
        if keyed:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    if not loc:
        return f"the request body must be a JSON object ({first['msg']})", None
    param = ".".join(loc) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


class RequireAPIKey:
    """ASGI middleware: /v1 routes and the OpenAPI schema answer 401 without `Authorization: Bearer
    KEY`. (Plain ASGI rather than an http middleware so streamed responses still see client
    disconnects.)"""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1", "/openapi.json")):
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing or incorrect API key (send Authorization: Bearer KEY)"
                await _error(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBodySize:
    """ASGI middleware: a request body over `max_bytes` is answered 413 as soon as that shows (from
    Content-Length, or while a chunked body arrives), before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.reject(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its whole body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self.reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: wait for the client to disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def reject(self, scope, receive, send) -> None:
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        await _error(413, message, code="request_too_large")(scope, receive, send)


def _error_event(error: Exception) -> dict[str, str]:
    """OpenAI's error JSON as an SSE event: how a stream that already began reports a failure."""
    body = {"error": {"message": str(error), "type": "server_error", "param": None, "code": None}}
    return {"data": json.dumps(body, ensure_ascii=False)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _check_options(body: Sampling) -> None:
    if body.presence_penalty or body.frequency_penalty:
        raise APIError("presence_penalty and frequency_penalty are not supported; use repetition_penalty")
    if not 1 <= body.n <= MAX_N:
        raise APIError(f"n must be between 1 and {MAX_N}", param="n")
    if getattr(body, "top_logprobs", None) is not None and not getattr(body, "logprobs", None):
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(f"stop: at most {MAX_STOP_STRINGS} stop sequences, got {len(stop)}", param="stop")
    if any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise APIError(f"stop: a stop sequence is at most {MAX_STOP_LENGTH} characters", param="stop")


def _params(body: Sampling, max_tokens: int | None, stop_ids: list[int], extra_stop: list[str], i: int):
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if max_tokens is not None and max_tokens < 1:
        raise APIError("max_tokens must be at least 1", param="max_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0) if body.top_k is not None else None,
        repetition_penalty=body.repetition_penalty,
        seed=None if body.seed is None else (body.seed + i) % 2**63,  # choices differ, reproducibly
        stop=stop + extra_stop,
        stop_token_ids=stop_ids,
        logprobs=_asked_logprobs(body),
    )


def _asked_logprobs(body: Sampling) -> int | None:
    """Top alternatives a request wants per token, or None for no log-probabilities."""
    if isinstance(body, ChatRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return getattr(body, "logprobs", None)


def _check(engine: Engine, prompt: list[int], params: SamplingParams) -> None:
    try:
        engine.validate(prompt, params)
    except QwenkitError as e:
        code = "context_length_exceeded" if "context window" in str(e) else None
        raise APIError(str(e), code=code, param="max_tokens" if "max_tokens" in str(e) else None) from None


async def _merged(
    engine: Engine, jobs: list[tuple[list[int], SamplingParams]]
) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from several engine requests running together; leaving early cancels all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt: list[int], params: SamplingParams) -> None:
        try:
            async for chunk in engine.astream(prompt, params):
                queue.put_nowait((index, chunk))
        except Exception as e:  # delivered to the consumer, which raises it
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, p, s)) for i, (p, s) in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _all_unless_disconnected(
    request: Request, jobs: list[tuple[list[int], SamplingParams]], engine: Engine
):
    """The completions of `jobs`; a client that leaves first, or a job that fails, cancels them all
    (their rows are freed). A failure inside the engine is a 500."""
    tasks = [asyncio.ensure_future(engine.agenerate(p, s)) for p, s in jobs]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.1, return_when=asyncio.FIRST_EXCEPTION)
            errors = [e for e in (task.exception() for task in done) if e is not None]
            if errors:
                raise errors[0]
            if pending and await request.is_disconnected():
                raise APIError("the client disconnected", status=499)  # nginx's code; nobody reads it
        return [task.result() for task in tasks]
    except GenerationFailed as e:
        raise APIError(str(e), status=500) from None
    finally:
        for task in tasks:
            task.cancel()


def create_app(
    model, tokenizer: Tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 16,
    max_seq_len: int | None = None, max_body_bytes: int = MAX_BODY_BYTES, tool_format: ToolFormat = "auto",
    kv_memory: str | int | float | None = None,
) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `model` under `model_name`; its Engine starts now and stops on shutdown.
    Prompts are rendered and tokenized in worker threads, so a long one never stalls the event loop.
    `tool_format` (resolve_tool_format): how chat requests are rendered and their tool calls read.
    `kv_memory` bounds the KV cache: bytes, a size ("2GiB") or a fraction of the memory available now
    (0.3 or "0.3"); None: the engine's default (Engine, kv_memory_bytes)."""
    chat_format = resolve_tool_format(tokenizer, tool_format)
    budget = kv_memory_bytes(kv_memory, model.device) if kv_memory is not None else None
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, kv_memory_bytes=budget)
    chat_stops = [tokenizer.im_end_id, tokenizer.im_start_id]
    if chat_format == "hermes":  # a template checkpoint's turn also ends at its eos and <|endoftext|>
        eos = tokenizer.special_tokens.get(getattr(tokenizer, "eos_token", None) or "")
        chat_stops += [t for t in (tokenizer.eod_id, eos) if t is not None and t not in chat_stops]

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()

    # With an API key the schema needs the key too, and the /docs and /redoc pages are off: a browser
    # loading them cannot send the key (README, Serve).
    docs = {"docs_url": None, "redoc_url": None} if api_key is not None else {}
    app = FastAPI(title="qwenkit", lifespan=lifespan, **docs)
    app.openapi = lambda: _openapi_schema(app, keyed=api_key is not None)
    app.state.tool_format = chat_format
    app.state.engine, app.state.tokenizer, app.state.model_name, app.state.model = (
        engine,
        tokenizer,
        model_name,
        model,
    )

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(QwenkitError)
    async def qwenkit_error(_: Request, exc: QwenkitError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)  # e.g. 405's Allow

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}")

    if api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=api_key)
    app.add_middleware(LimitBodySize, max_bytes=max_body_bytes)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "running": engine.active, "max_batch": engine.max_batch,
                "max_model_len": engine.max_seq_len, "kv_cache": engine.kv_report()}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        # max_model_len: the context length (prompt + reply tokens) under vLLM's name for it
        card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "qwenkit",
                "max_model_len": engine.max_seq_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_options(body)
        plan = await run_in_threadpool(plan_chat, tokenizer, body, chat_format)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        extra = ["Observation:"] if plan.react else []
        jobs = [(plan.prompt, _params(body, max_tokens, chat_stops, extra, i)) for i in range(body.n)]
        _check(engine, plan.prompt, jobs[0][1])
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        call_reason = "function_call" if plan.legacy else "tool_calls"

        def call_fields(calls: list, first: int = 0, streamed: bool = False) -> dict:
            """The message (or delta) fields of `calls`, numbered from `first`; the legacy form holds
            the first call only (function_call has room for one)."""
            functions = [{"name": c.name, "arguments": c.arguments} for c in calls]
            if plan.legacy:
                return {"function_call": functions[0]} if first == 0 and functions else {}
            entries = [{"id": getattr(c, "id", None) or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": f} for c, f in zip(calls, functions, strict=True)]  # fmt: skip
            if streamed:
                entries = [{"index": first + k, **entry} for k, entry in enumerate(entries)]
            return {"tool_calls": entries} if entries else {}

        if not body.stream:
            choices, completion_tokens = [], 0
            results = await _all_unless_disconnected(request, jobs, engine)
            for i, result in enumerate(results):
                message: dict[str, Any] = {"role": "assistant", "content": result.text}
                reason = result.finish_reason
                reader = plan.reader()
                if reader is not None:
                    content = reader.feed(result.text)
                    rest, calls = _finish(reader)
                    message["content"] = content + rest
                    if calls:
                        message.update(call_fields(calls))
                        message["content"] = message["content"] or None
                        reason = call_reason
                logprobs = {"content": chat_logprobs(tokenizer, result.logprobs)} if body.logprobs else None
                choices.append(
                    {"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs}
                )
                completion_tokens += result.completion_tokens
            return {
                "id": reply_id,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": _usage(len(plan.prompt), completion_tokens),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        unsent = [[] for _ in jobs]  # log-probabilities of each choice's tokens not sent yet

        def chunk(index: int, delta: dict, reason: str | None = None) -> dict:
            logprobs = None
            if body.logprobs and (delta.get("content") or reason is not None):
                logprobs, unsent[index] = {"content": chat_logprobs(tokenizer, unsent[index])}, []
            data = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]}  # fmt: skip
            if include_usage:
                data["usage"] = None
            return {"data": json.dumps(data, ensure_ascii=False)}

        async def events():
            readers = [plan.reader() for _ in jobs]
            sent_calls = [0] * len(jobs)  # calls already streamed, per choice
            for i in range(len(jobs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            completion_tokens = 0
            try:
                async for i, piece in _merged(engine, jobs):
                    reader, reason = readers[i], piece.finish_reason
                    unsent[i] += piece.logprobs
                    text = reader.feed(piece.text) if reader else piece.text
                    if text:
                        yield chunk(i, {"content": text})
                    done = getattr(reader, "calls", [])  # Hermes calls are known as each one closes
                    if len(done) > sent_calls[i]:
                        if fields := call_fields(done[sent_calls[i] :], sent_calls[i], streamed=True):
                            yield chunk(i, fields)
                        sent_calls[i] = len(done)
                    if reason is None:
                        continue
                    completion_tokens += piece.completion_tokens
                    if reader is not None:
                        rest, calls = _finish(reader)
                        if rest:
                            yield chunk(i, {"content": rest})
                        new = calls[sent_calls[i] :]
                        if new and (fields := call_fields(new, sent_calls[i], streamed=True)):
                            yield chunk(i, fields)
                        if calls:
                            reason = call_reason
                    yield chunk(i, {}, reason)
            except QwenkitError as e:  # failed inside the engine: this request ends, with the error
                yield _error_event(e)
            else:
                if include_usage:
                    usage = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                             "model": model_name, "choices": [], "usage": _usage(len(plan.prompt), completion_tokens)}  # fmt: skip
                    yield {"data": json.dumps(usage)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_options(body)
        if body.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise APIError("best_of is not supported", param="best_of")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default here
        scoring_only = max_tokens == 0  # with echo: the prompt and its log-probabilities, nothing new
        if scoring_only and not body.echo:
            raise APIError("max_tokens 0 needs echo (it returns the prompt alone)", param="max_tokens")

        def prepare() -> tuple[list[list[int]], list[tuple[list[int], SamplingParams]], list[str]]:
            """(prompts, jobs, echoed prompt texts); run in a worker thread, off the event loop."""
            prompts = _completion_prompts(tokenizer, body.prompt)
            jobs = []
            for prompt in prompts:
                if scoring_only:
                    _check_scoring(engine, prompt)
                    continue
                choices = [(prompt, _params(body, max_tokens, [], [], i)) for i in range(body.n)]
                if body.echo and body.logprobs is not None:  # scored in the prefill's own pass
                    choices = [(p, dataclasses.replace(s, prompt_logprobs=body.logprobs)) for p, s in choices]
                _check(engine, prompt, choices[0][1])  # the choices differ only in their seeds
                jobs += choices
            return prompts, jobs, [tokenizer.decode(p) if body.echo else "" for p in prompts]

        prompts, jobs, echoes = await run_in_threadpool(prepare)
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        scored: list = [None] * len(prompts)  # each prompt's TokenLogprobs, when only scored
        if scoring_only and body.logprobs is not None:
            try:
                scored = await engine.ascore(prompts, body.logprobs)
            except GenerationFailed as e:
                raise APIError(str(e), status=500) from None
        choices_count = len(prompts) * body.n
        builders = [CompletionLogprobs(tokenizer) if body.logprobs is not None else None
                    for _ in range(choices_count)]  # fmt: skip

        def prompt_logprobs(index: int, entries: list | None) -> dict | None:
            """The logprobs of choice `index`'s echoed prompt (empty lists without echo)."""
            builder, k = builders[index], index // body.n
            if builder is None:
                return None
            return builder.prompt(prompts[k], entries, echoes[k]) if body.echo else builder.part([])

        if not body.stream:
            if scoring_only:
                results = [
                    Completion("", "length", len(prompts[i // body.n]), 0) for i in range(choices_count)
                ]
            else:
                results = await _all_unless_disconnected(request, jobs, engine)
            choices = []
            for i, r in enumerate(results):
                logprobs = prompt_logprobs(i, r.prompt_logprobs or scored[i // body.n])
                if logprobs is not None:
                    _extend(logprobs, builders[i].part(r.logprobs))
                choices.append({"index": i, "text": echoes[i // body.n] + r.text, "finish_reason": r.finish_reason,
                                "logprobs": logprobs})  # fmt: skip
            usage = _usage(prompt_tokens, sum(r.completion_tokens for r in results))
            return {"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage}  # fmt: skip

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
            data = {"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}]}  # fmt: skip
            if include_usage:
                data["usage"] = None
            return {"data": json.dumps(data, ensure_ascii=False)}

        async def events():
            if scoring_only:
                for i in range(choices_count):
                    yield chunk(i, echoes[i // body.n], "length", prompt_logprobs(i, scored[i // body.n]))
            echoed = [not body.echo] * choices_count  # a choice's echo comes with its first piece
            completion_tokens = 0
            try:
                async for i, piece in _merged(engine, jobs):
                    if not echoed[i]:
                        echoed[i] = True
                        yield chunk(i, echoes[i // body.n], None, prompt_logprobs(i, piece.prompt_logprobs))
                    if piece.finish_reason is not None:
                        completion_tokens += piece.completion_tokens
                    if piece.text or piece.finish_reason:
                        logprobs = builders[i].part(piece.logprobs) if builders[i] is not None else None
                        yield chunk(i, piece.text, piece.finish_reason, logprobs)
            except QwenkitError as e:  # failed inside the engine: this request ends, with the error
                yield _error_event(e)
            else:
                if include_usage:
                    usage = {"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                             "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}  # fmt: skip
                    yield {"data": json.dumps(usage)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    if (STATIC / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC / "index.html")

    if importlib.util.find_spec("qwenkit.serve.web") is not None:
        from qwenkit.serve import web

        app.include_router(web.router)
    return app


def _check_scoring(engine: Engine, prompt: list[int]) -> None:
    """APIError unless `prompt` can be scored (non-empty, known ids, within the context window)."""
    try:
        check_prompt(prompt, engine.model.config.vocab_size, engine.max_seq_len, owner="this server's")
    except QwenkitError as e:
        code = "context_length_exceeded" if "context window" in str(e) else None
        raise APIError(str(e), code=code, param="prompt") from None


def token_piece(tokenizer: Tokenizer, token: int) -> str:
    """A token as OpenAI's legacy logprobs name it: its text, or `bytes:\\xNN...` when its bytes are
    not whole UTF-8 characters (part of a multi-byte character)."""
    data = tokenizer.token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class CompletionLogprobs:
    """OpenAI's legacy `logprobs` object of one completion choice, built piece by piece as its text
    is: `tokens` (token_piece), `token_logprobs` (None for the first prompt token), `top_logprobs`
    ({piece: logprob} of the most likely tokens, plus the chosen one, as vLLM; None where the token
    has none) and `text_offset`, in characters from the start of the choice's text (the echoed
    prompt included; special tokens of the reply count as no text, as the reply shows them)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.offset = tokenizer, 0
        self.reply = StreamDecoder(tokenizer, skip_special_tokens=True)

    def prompt(self, tokens: list[int], scored: list[TokenLogprob | None] | None, echo: str) -> dict:
        """The lists for the echoed prompt `tokens` (whose text is `echo`) and their log-probabilities."""
        out = self._lists(tokens, scored or [None] * len(tokens), StreamDecoder(self.tokenizer))
        self.offset = len(echo)
        return out

    def part(self, entries: list[TokenLogprob]) -> dict:
        """The lists for the next generated tokens."""
        return self._lists([e.token for e in entries], entries, self.reply)

    def _lists(self, tokens: list[int], entries: list[TokenLogprob | None], text: StreamDecoder) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries, strict=True):
            piece = token_piece(self.tokenizer, token)
            out["tokens"].append(piece)
            out["text_offset"].append(self.offset)
            self.offset += len(text.push(token))
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {token_piece(self.tokenizer, t): lp for t, lp in entry.top}
            top.setdefault(piece, entry.logprob)
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append(top)
        return out


def _extend(logprobs: dict, more: dict) -> None:
    for key, values in more.items():
        logprobs[key] += values


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's chat `logprobs.content` entries: each token's text (incomplete UTF-8 as U+FFFD), its
    exact bytes, its log-probability and the most likely tokens at its position."""

    def entry(token: int, logprob: float) -> dict:
        data = tokenizer.token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries]


def _completion_prompts(tokenizer: Tokenizer, prompt) -> list[list[int]]:
    """The prompt field (text, texts, ids or lists of ids) as token id lists; base-model text is
    encoded as plain text too."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError("the prompt is empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    return prompts
