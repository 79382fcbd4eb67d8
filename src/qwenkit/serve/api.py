"""The OpenAI-compatible HTTP API (`qwenkit serve`): FastAPI + uvicorn + sse-starlette over the
continuous-batching Engine.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Chat messages
become the official ChatML prompt; content is always encoded as plain text, so no message can
inject control tokens. Function calling (current `tools` and legacy `functions`) uses the
official ReAct prompt, with calls and results rendered as SFT data renders them (qwenkit.chatml,
qwenkit.agent.react), so the server reads what the model was trained on: the instruction goes
before the last user message, generation stops at "Observation:", and earlier calls and results
continue the same assistant turn. Unlike the original server, streaming works with tools.

Single-model server: any `model` name is accepted and answered by the loaded model (responses
name it). Every client mistake is a 4xx with OpenAI's error JSON; with an API key set, /v1 routes
need `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
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

from qwenkit.agent.react import Turn, parse_reply, react_question, react_turns, step_text
from qwenkit.chatml import DEFAULT_SYSTEM, render_turns
from qwenkit.errors import QwenkitError
from qwenkit.generation import REPETITION_PENALTY_RANGE
from qwenkit.serve.engine import Chunk, Engine, GenerationFailed, SamplingParams
from qwenkit.tokenizer import Tokenizer

MAX_N = 16  # choices per request
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
    logprobs: bool | int | None = None
    user: str | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedTool | None = None
    functions: list[FunctionSpec] | None = None
    function_call: Literal["auto", "none"] | NamedFunction | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


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
    prefix: str  # reply text already written into the prompt (a forced Action)
    legacy: bool  # answer with function_call instead of tool_calls


def plan_chat(tokenizer: Tokenizer, body: ChatRequest) -> ChatPlan:
    """Build the prompt of a chat request: ChatML, plus the ReAct instruction when tools are given."""
    if body.tools and body.functions:
        raise APIError("give either tools or functions, not both", param="functions")
    legacy = body.functions is not None or body.function_call is not None
    tools = [t.function for t in body.tools or []] or list(body.functions or [])
    choice = body.function_call if legacy else body.tool_choice
    choice = choice or ("auto" if tools else "none")
    forced = choice if isinstance(choice, NamedTool | NamedFunction) else None
    if forced is not None or choice == "required":
        name = forced.function.name if isinstance(forced, NamedTool) else forced.name if forced else None
        if not tools:
            raise APIError("a tool choice other than 'auto' or 'none' needs tools", param="tool_choice")
        if name is not None:
            tools = [f for f in tools if f.name == name]
            if not tools:
                raise APIError(
                    f"tool_choice names {name!r}, which is not among the tools", param="tool_choice"
                )
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
    if forced is not None or choice == "required":
        prefix = step_text("", tools[0].name if forced is not None else None, first=not is_open)
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
    if body.logprobs:
        raise APIError("logprobs are not supported", param="logprobs")
    if not 1 <= body.n <= MAX_N:
        raise APIError(f"n must be between 1 and {MAX_N}", param="n")
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
    )


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
    max_seq_len: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `model` under `model_name`; its Engine starts now and stops on shutdown.
    Prompts are rendered and tokenized in worker threads, so a long one never stalls the event loop."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
    chat_stops = [tokenizer.im_end_id, tokenizer.im_start_id]

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()

    # With an API key the schema needs the key too, and the /docs and /redoc pages are off: a browser
    # loading them cannot send the key (README, Serve).
    docs = {"docs_url": None, "redoc_url": None} if api_key is not None else {}
    app = FastAPI(title="qwenkit", lifespan=lifespan, **docs)
    app.openapi = lambda: _openapi_schema(app, keyed=api_key is not None)
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
        return {"status": "ok", "model": model_name, "running": engine.active, "max_batch": engine.max_batch}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "qwenkit"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_options(body)
        plan = await run_in_threadpool(plan_chat, tokenizer, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        extra = ["Observation:"] if plan.react else []
        jobs = [(plan.prompt, _params(body, max_tokens, chat_stops, extra, i)) for i in range(body.n)]
        _check(engine, plan.prompt, jobs[0][1])
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        call_reason = "function_call" if plan.legacy else "tool_calls"

        def call_fields(call) -> dict:
            function = {"name": call.name, "arguments": call.arguments}
            if plan.legacy:
                return {"function_call": function}
            return {"tool_calls": [{"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                    "function": function}]}  # fmt: skip

        if not body.stream:
            choices, completion_tokens = [], 0
            results = await _all_unless_disconnected(request, jobs, engine)
            for i, result in enumerate(results):
                message: dict[str, Any] = {"role": "assistant", "content": result.text}
                reason = result.finish_reason
                if plan.react:
                    reader = ReactOutput(plan.prefix, plan.allow_calls)
                    content = reader.feed(result.text)
                    rest, call = reader.finish()
                    message["content"] = content + rest
                    if call is not None:
                        fields = call_fields(call)
                        for entry in fields.get("tool_calls", []):
                            del entry["index"]
                        message.update(fields)
                        message["content"] = message["content"] or None
                        reason = call_reason
                choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": None})
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

        def chunk(index: int, delta: dict, reason: str | None = None) -> dict:
            data = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]}  # fmt: skip
            if include_usage:
                data["usage"] = None
            return {"data": json.dumps(data, ensure_ascii=False)}

        async def events():
            readers = [ReactOutput(plan.prefix, plan.allow_calls) if plan.react else None for _ in jobs]
            for i in range(len(jobs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            completion_tokens = 0
            try:
                async for i, piece in _merged(engine, jobs):
                    reader, reason = readers[i], piece.finish_reason
                    text = reader.feed(piece.text) if reader else piece.text
                    if text:
                        yield chunk(i, {"content": text})
                    if reason is None:
                        continue
                    completion_tokens += piece.completion_tokens
                    if reader is not None:
                        rest, call = reader.finish()
                        if rest:
                            yield chunk(i, {"content": rest})
                        if call is not None:
                            yield chunk(i, call_fields(call))
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

        def prepare() -> tuple[list[list[int]], list[tuple[list[int], SamplingParams]], list[str]]:
            """(prompts, jobs, echoed prompt texts); run in a worker thread, off the event loop."""
            prompts = _completion_prompts(tokenizer, body.prompt)
            jobs = []
            for prompt in prompts:
                choices = [(prompt, _params(body, max_tokens, [], [], i)) for i in range(body.n)]
                _check(engine, prompt, choices[0][1])  # the choices differ only in their seeds
                jobs += choices
            return prompts, jobs, [tokenizer.decode(p) if body.echo else "" for p in prompts]

        prompts, jobs, echoes = await run_in_threadpool(prepare)
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)

        if not body.stream:
            results = await _all_unless_disconnected(request, jobs, engine)
            choices = [
                {"index": i, "text": echoes[i // body.n] + r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ]  # fmt: skip
            usage = _usage(prompt_tokens, sum(r.completion_tokens for r in results))
            return {"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage}  # fmt: skip

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, text: str, reason: str | None) -> dict:
            data = {"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]}  # fmt: skip
            if include_usage:
                data["usage"] = None
            return {"data": json.dumps(data, ensure_ascii=False)}

        async def events():
            if body.echo:
                for i in range(len(jobs)):
                    yield chunk(i, echoes[i // body.n], None)
            completion_tokens = 0
            try:
                async for i, piece in _merged(engine, jobs):
                    if piece.finish_reason is not None:
                        completion_tokens += piece.completion_tokens
                    if piece.text or piece.finish_reason:
                        yield chunk(i, piece.text, piece.finish_reason)
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
    if len(prompts) > MAX_N:
        raise APIError(f"at most {MAX_N} prompts per request", param="prompt")
    return prompts
