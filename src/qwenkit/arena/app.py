"""The rating page: a FastAPI app over an ArenaStore whose answers are already generated.

    GET  /                the page (static/index.html, app.js, style.css under /static)
    GET  /api/info        {"title", "models": how many} (never which: the answers are anonymous)
    POST /api/next        {"rater"} -> the rater's comparison to rate now (the same one until rated),
                          {"id", "instruction", "context", "category", "left", "right", "progress"}, or
                          {"done": true, "progress"} when the rater has rated them all
    POST /api/rate        {"rater", "id", "verdict": left|right|tie|both_bad, "reason"} -> {"progress"}

Errors are {"error": message} with 400 (bad input), 404 (a comparison not shown to this rater),
409 (already rated) or 413 (a body over MAX_BODY_BYTES). Raters are who they say they are: the
page is for a trusted group (serve it on localhost or a private network).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenkit.arena.store import MAX_RATER, MAX_REASON, AlreadyRated, ArenaStore, UnknownAssignment
from qwenkit.errors import QwenkitError

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 64 * 1024


class NextRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    rater: Annotated[str, Field(min_length=1, max_length=MAX_RATER)]


class RateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    rater: Annotated[str, Field(min_length=1, max_length=MAX_RATER)]
    id: Annotated[int, Field(ge=1, lt=2**63)]
    verdict: Literal["left", "right", "tie", "both_bad"]
    reason: Annotated[str, Field(max_length=MAX_REASON)] = ""


class LimitBody:
    """ASGI middleware: 413 for a request whose Content-Length is over `max_bytes`, or that has none
    (the page always sends one), before anything reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope.get("headers", [])).get(b"content-length", b"")
            if not length.isdigit() or int(length) > self.max_bytes:
                response = JSONResponse({"error": f"the request body must be under {self.max_bytes} bytes, "
                                                  "with a Content-Length"}, status_code=413)  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_arena_app(
    store: ArenaStore, models: Sequence[str], title: str = "qwenkit arena", seed: int | None = None
) -> FastAPI:
    """The rating page comparing `models` (their answers must be in `store`); `seed` fixes the order
    comparisons are handed out and shown in (None: random)."""
    if len(set(models)) < 2:
        raise QwenkitError("the arena compares at least two models")
    known = store.models()
    missing = [m for m in models if m not in known]
    if missing:
        raise QwenkitError(f"models not in {store.path}: {', '.join(missing)}")
    models = sorted(set(models))
    rng = random.Random(seed)
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.models = store, models

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(UnknownAssignment)
    async def unknown(_: Request, exc: UnknownAssignment) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(AlreadyRated)
    async def rated(_: Request, exc: AlreadyRated) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(QwenkitError)
    async def bad_input(_: Request, exc: QwenkitError) -> JSONResponse:
        return error(400, str(exc))

    def progress(rater: str) -> dict[str, int]:
        done, total = store.progress(rater.strip(), models)
        return {"rated": done, "total": total}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info")
    def info() -> dict:
        return {"title": title, "models": len(models)}

    @app.post("/api/next")
    def next_comparison(body: NextRequest) -> dict:
        shown = store.next_assignment(body.rater, models, rng)
        if shown is None:
            return {"done": True, "progress": progress(body.rater)}
        messages = shown.prompt.messages
        return {
            "done": False,
            "id": shown.id,
            "instruction": messages[-1]["content"],
            "context": messages[:-1],
            "category": shown.prompt.category,
            "left": shown.left,
            "right": shown.right,
            "progress": progress(body.rater),
        }

    @app.post("/api/rate")
    def rate(body: RateRequest) -> dict:
        store.rate(body.rater, body.id, body.verdict, body.reason)
        return {"progress": progress(body.rater)}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(LimitBody, max_bytes=MAX_BODY_BYTES)
    return app
