"""The web chat page's agent endpoints: the ReAct agent loop (qwenkit.agent.loop) over the server's
batching engine, streamed to the page as server-sent events.

    POST   /v1/agent                 {"messages", "tools", "session", temperature, top_p, max_tokens, seed}
    DELETE /v1/agent/sessions/{id}   end a session's code interpreter (the page's "Clear")

The routes live under /v1 so that the server's API key guards them like the OpenAI routes. Each
event is `data: {json}` in the form of qwenkit.agent.loop.event_dict (text, tool_call, tool_result
with base64 PNG images, final), an `{"type": "error", "message"}` event if the run fails, then
`data: [DONE]`. Every browser tab sends its own session id, and the server keeps one code-interpreter
kernel per session (the least recently used idle one is closed beyond MAX_SESSIONS), so variables
carry from one question to the next as in a notebook.

Tests and other front ends can swap the text generator: set `app.state.agent_complete` to a
callable (engine, tokenizer, SamplingParams) -> loop.Complete, and
`app.state.agent_interpreter_options` to keyword arguments for the interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi import Path as PathParameter
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from qwenkit.agent.interpreter import PythonTool
from qwenkit.agent.loop import Complete, Message, ToolRegistry, chatml_complete, event_dict, run_agent
from qwenkit.agent.react import calculator
from qwenkit.chatml import DEFAULT_SYSTEM
from qwenkit.errors import QwenkitError
from qwenkit.serve.engine import Engine, SamplingParams
from qwenkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
MAX_SESSIONS = 8  # live code-interpreter kernels per server (each is a process of its own)
MAX_STEPS = 8  # tool calls per question
SESSION_ID = r"^[A-Za-z0-9_-]{8,64}$"


class AgentMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class AgentRequest(BaseModel):
    """The conversation so far (ending with the user's question), the tools to offer, and sampling."""

    model_config = ConfigDict(strict=True, extra="forbid")

    messages: Annotated[list[AgentMessage], Field(min_length=1)]
    tools: Annotated[list[Literal["calculator", "python"]], Field(min_length=1)] = ["calculator", "python"]
    session: Annotated[str, Field(pattern=SESSION_ID)]
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None


@dataclass
class Session:
    python: PythonTool
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sessions:
    """One PythonTool (a code-interpreter kernel, started on first use) per browser session; beyond
    `limit` sessions the least recently used idle one is closed."""

    def __init__(self, limit: int = MAX_SESSIONS, **interpreter_options) -> None:
        self.limit, self.options = limit, interpreter_options
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.guard = threading.Lock()
        self.closed = False

    def acquire(self, session_id: str) -> tuple[Session, Session | None]:
        """The session, locked for one agent run (409 if it is already running one), and the idle
        session evicted to make room, if any, for the caller to close off the event loop."""
        evicted = None
        with self.guard:
            if self.closed:
                raise HTTPException(503, "the server is shutting down")
            session = self.sessions.get(session_id)
            if session is None:
                idle = [k for k, s in self.sessions.items() if not s.lock.locked()]
                if len(self.sessions) >= self.limit and not idle:
                    raise HTTPException(429, f"all {self.limit} agent sessions are busy; try again shortly")
                if len(self.sessions) >= self.limit:
                    evicted = self.sessions.pop(idle[0])
                session = self.sessions[session_id] = Session(PythonTool(**self.options))
            self.sessions.move_to_end(session_id)
            if not session.lock.acquire(blocking=False):
                raise HTTPException(409, "this session is already running an agent; wait for it or stop it")
        return session, evicted

    def end(self, session_id: str) -> bool:
        """Close a session's kernel; False if there is no such session."""
        with self.guard:
            session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        with session.lock:  # a run in progress finishes first
            session.python.close()
        return True

    def close(self) -> None:
        """End every session (server shutdown), runs in progress included."""
        with self.guard:
            self.closed = True
            sessions, self.sessions = list(self.sessions.values()), OrderedDict()
        for session in sessions:
            session.python.close()


def engine_complete(engine: Engine, tokenizer: Tokenizer, params: SamplingParams) -> Complete:
    """The agent loop's text generator over the batching engine (the ChatML prompt of
    qwenkit.agent.loop.chatml_complete, as for a local model)."""

    def stream(ids: list[int], stop_strings: list[str], stop_token_ids: list[int]) -> Iterator[str]:
        request = dataclasses.replace(params, stop=stop_strings, stop_token_ids=stop_token_ids)
        for chunk in engine.stream(ids, request):  # closing this generator cancels the engine request
            if chunk.text:
                yield chunk.text

    return chatml_complete(tokenizer, engine.max_seq_len, stream)


def conversation(messages: list[AgentMessage]) -> tuple[str, list[Message], str]:
    """(system, earlier user/assistant turns, question) of the page's messages."""
    items = [m.model_dump() for m in messages]
    system = items.pop(0)["content"] if items[0]["role"] == "system" else DEFAULT_SYSTEM
    if [m["role"] for m in items] != ["user", "assistant"] * (len(items) // 2) + ["user"]:
        raise HTTPException(400, "messages: an optional system message, then user and assistant turns "
                                 "in turn, ending with the user's question")  # fmt: skip
    return system, items[:-1], items[-1]["content"]


def sessions_of(app: FastAPI) -> Sessions:
    if getattr(app.state, "agent_sessions", None) is None:
        app.state.agent_sessions = Sessions(**getattr(app.state, "agent_interpreter_options", {}))
    return app.state.agent_sessions


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    sessions = getattr(app.state, "agent_sessions", None)
    if sessions is not None:
        await asyncio.to_thread(sessions.close)


router = APIRouter(lifespan=lifespan)


@router.post("/v1/agent")
async def agent(body: AgentRequest, request: Request) -> EventSourceResponse:
    """Answer the last user message with the ReAct agent, streaming every step as an SSE event."""
    app = request.app
    system, history, question = conversation(body.messages)
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed)  # fmt: skip
    try:
        ids = await asyncio.to_thread(app.state.tokenizer.encode, question)  # off the event loop
        app.state.engine.validate(ids, params)
    except QwenkitError as e:
        raise HTTPException(400, str(e)) from None
    cancelled = threading.Event()
    make_complete = getattr(app.state, "agent_complete", None) or engine_complete
    complete = make_complete(app.state.engine, app.state.tokenizer, params)
    sessions = sessions_of(app)
    session, evicted = sessions.acquire(body.session)  # nothing awaits from here to the thread's start
    chosen = dict.fromkeys(body.tools)
    tools = ToolRegistry([calculator if name == "calculator" else session.python for name in chosen])
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def put(item: dict[str, Any] | None) -> None:
        with contextlib.suppress(RuntimeError):  # the server is shutting down: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, item)

    def run() -> None:  # a thread of its own: the loop blocks on generation and on the kernel
        steps = run_agent(question, complete, tools, max_steps=MAX_STEPS, system=system, history=history)
        try:
            if evicted is not None:
                evicted.python.close()
            for event in steps:
                if cancelled.is_set():
                    break  # closing `steps` closes the generator, which cancels its engine request
                put(event_dict(event))
        except QwenkitError as e:
            put({"type": "error", "message": str(e)})
        except Exception as e:  # a failed run is reported to the page, never left hanging
            if sessions.closed:  # shutdown closed the kernel under the run
                put({"type": "error", "message": "the server is shutting down"})
            else:
                logger.exception("agent run failed")
                put({"type": "error", "message": f"internal error: {type(e).__name__}"})
        finally:
            steps.close()
            session.lock.release()
            put(None)

    threading.Thread(target=run, name=f"agent-{body.session[:8]}", daemon=True).start()

    async def stream() -> AsyncIterator[dict[str, str]]:
        try:
            while (event := await events.get()) is not None:
                yield {"data": json.dumps(event, ensure_ascii=False)}
            yield {"data": "[DONE]"}
        finally:
            cancelled.set()  # the client left: stop generating at the next token

    return EventSourceResponse(stream())


@router.delete("/v1/agent/sessions/{session_id}", status_code=204)
async def end_session(
    session_id: Annotated[str, PathParameter(pattern=SESSION_ID)], request: Request
) -> None:
    """End a session's code interpreter (its kernel and files); the next run starts a fresh one."""
    if not await asyncio.to_thread(sessions_of(request.app).end, session_id):
        raise HTTPException(404, "no such agent session")
