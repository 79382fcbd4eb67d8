"""The rating page against a live server whose answers two real models generated (the demo model
and a tiny random checkpoint): the JSON routes and their errors, ratings surviving a server restart,
and headless Chromium rating with the keyboard and the mouse, resuming after a reload, two raters at
once, and untrusted text shown as text."""

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer

import qwenkit
from qwenkit.arena.answers import AnswerSettings, ModelSpec, fill_answers
from qwenkit.arena.app import create_arena_app
from qwenkit.arena.store import ArenaStore, Prompt
from qwenkit.errors import QwenkitError

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
MODELS = ["demo", "small"]
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Tell me about <b>bold</b> & <i>tags</i>."]


@pytest.fixture(scope="module")
def db(tmp_path_factory, small_checkpoint) -> Path:
    """A database whose three prompts both models answered (greedy, 12 tokens): the file each test copies."""
    path = tmp_path_factory.mktemp("arena") / "answers.db"
    store = ArenaStore(path)
    store.add_prompts([Prompt([{"role": "user", "content": q}], "general") for q in QUESTIONS])
    settings = AnswerSettings(max_new_tokens=12)
    fill_answers(store, ModelSpec("demo", qwenkit.default_model_path()), settings, progress=False)
    fill_answers(store, ModelSpec("small", small_checkpoint), settings, progress=False)
    return path


@pytest.fixture
def store(db, tmp_path) -> ArenaStore:
    copy = tmp_path / "arena.db"
    copy.write_bytes(db.read_bytes())
    return ArenaStore(copy)


@pytest.fixture
def server(store) -> Iterator[LiveServer]:
    live = LiveServer(create_arena_app(store, MODELS, title="Test arena", seed=0))
    yield live
    live.stop()


def post(url: str, path: str, body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def test_routes_rate_and_resume_after_a_restart(store, server):
    info = httpx.get(server.url + "/api/info").json()
    assert info == {"title": "Test arena", "models": 2}
    shown = post(server.url, "/api/next", {"rater": "ann"}).json()
    assert set(shown) == {"done", "id", "instruction", "context", "category", "left", "right", "progress"}
    assert shown["progress"] == {"rated": 0, "total": 3} and shown["category"] == "general"
    meta = json.dumps({k: v for k, v in shown.items() if k not in ("instruction", "left", "right")})
    assert not any(name in meta for name in MODELS)  # anonymous: no model names sent
    assignment = store.next_assignment("ann", MODELS, None)  # the pending one
    assert assignment.id == shown["id"] and assignment.prompt.instruction == shown["instruction"]
    answers = store.answers(assignment.prompt.id)
    assert (shown["left"], shown["right"]) == (
        answers[assignment.left_model],
        answers[assignment.right_model],
    )
    assert post(server.url, "/api/next", {"rater": "ann"}).json()["id"] == shown["id"]  # the same until rated

    rated = post(
        server.url, "/api/rate", {"rater": "ann", "id": shown["id"], "verdict": "right", "reason": "B"}
    )
    assert rated.status_code == 200 and rated.json() == {"progress": {"rated": 1, "total": 3}}
    server.stop()  # a restart: a new server on the same file

    again = LiveServer(create_arena_app(ArenaStore(store.path), MODELS, seed=1))
    try:
        following = post(again.url, "/api/next", {"rater": "ann"}).json()
        assert following["progress"] == {"rated": 1, "total": 3} and following["id"] != shown["id"]
        ratings = ArenaStore(store.path).ratings()
        assert [(r.rater, r.verdict, r.reason, r.winner) for r in ratings] == [
            ("ann", "right", "B", assignment.right_model)
        ]
        for _ in range(2):
            current = post(again.url, "/api/next", {"rater": "ann"}).json()
            assert (
                post(
                    again.url, "/api/rate", {"rater": "ann", "id": current["id"], "verdict": "tie"}
                ).status_code
                == 200
            )
        assert post(again.url, "/api/next", {"rater": "ann"}).json() == {
            "done": True,
            "progress": {"rated": 3, "total": 3},
        }
    finally:
        again.stop()


def test_bad_requests_get_clear_4xx(server):
    shown = post(server.url, "/api/next", {"rater": "ann"}).json()
    cases = [
        ("/api/next", {"rater": ""}, 400, "rater"),
        ("/api/next", {"rater": "   "}, 400, "name is empty"),
        ("/api/next", {"rater": "x" * 65}, 400, "rater"),
        ("/api/next", {"rater": "a\u0007b"}, 400, "control characters"),
        ("/api/next", {"rater": 5}, 400, "rater"),
        ("/api/next", {"rater": "ann", "extra": 1}, 400, "extra"),
        ("/api/next", ["ann"], 400, "body"),
        ("/api/rate", {"rater": "ann", "id": shown["id"], "verdict": "better"}, 400, "verdict"),
        (
            "/api/rate",
            {"rater": "ann", "id": shown["id"], "verdict": "tie", "reason": "x" * 2001},
            400,
            "reason",
        ),
        ("/api/rate", {"rater": "bob", "id": shown["id"], "verdict": "tie"}, 404, "was shown to 'bob'"),
        ("/api/rate", {"rater": "ann", "id": 10**6, "verdict": "tie"}, 404, "no comparison"),
    ]
    for path, body, status, message in cases:
        response = post(server.url, path, body)
        assert response.status_code == status, (body, response.text)
        assert message in response.json()["error"], (body, response.text)
    assert (
        post(server.url, "/api/rate", {"rater": "ann", "id": shown["id"], "verdict": "tie"}).status_code
        == 200
    )
    twice = post(server.url, "/api/rate", {"rater": "ann", "id": shown["id"], "verdict": "left"})
    assert twice.status_code == 409 and "already rated" in twice.json()["error"]
    not_json = httpx.post(
        server.url + "/api/next", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    huge = post(server.url, "/api/next", {"rater": "ann", "pad": "x" * 70_000})
    assert huge.status_code == 413 and "under" in huge.json()["error"]
    assert httpx.get(server.url + "/api/missing").status_code == 404
    assert httpx.get(server.url + "/api/next").status_code == 405


def test_app_checks_its_models(store):
    with pytest.raises(QwenkitError, match="not in"):
        create_arena_app(store, ["demo", "other"])
    with pytest.raises(QwenkitError, match="at least two"):
        create_arena_app(store, ["demo", "demo"])


# --- the page in headless Chromium ---------------------------------------------------------------------

needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not CHROMIUM.is_file(),
    reason="playwright or /usr/bin/chromium is missing (scripts/install_system.sh installs them)",
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser):
    contexts, errors = [], []

    def make():
        context = browser.new_context()  # its own storage: one rater's browser
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page, url: str, name: str) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    page.fill("#rater", name)
    page.press("#rater", "Enter")
    expect(page.locator("#comparison")).to_be_visible()
    expect(page.locator("#rater-form")).to_be_hidden()
    expect(page.locator("#rater-name")).to_have_text(name)


def shown_texts(page) -> tuple[str, str, str]:
    return page.text_content("#instruction"), page.text_content("#left"), page.text_content("#right")


def expect_progress(page, rated: int) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#progress")).to_have_text(f"{rated} of 3 rated")


def matches(store: ArenaStore, rating, texts) -> bool:
    """The rating is of the comparison the page showed: same instruction, answers on the same sides."""
    answers = store.answers(rating.prompt.id)
    return texts == (rating.prompt.instruction, answers[rating.left_model], answers[rating.right_model])


@needs_browser
def test_rate_with_keyboard_and_mouse_then_done(store, server, new_page):
    from playwright.sync_api import expect

    page = new_page()
    sign_in(page, server.url, "Ann <img src=x onerror=window.pwned=1>")
    expect(page).to_have_title("Test arena")
    expect_progress(page, 0)
    first = shown_texts(page)
    expect(page.locator("#submit")).to_be_disabled()
    page.keyboard.press("2")  # B
    expect(page.locator("[data-verdict=right]")).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("ArrowLeft")  # changed my mind: A
    expect(page.locator("[data-verdict=left]")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#left-card")).to_have_class("answer chosen")
    page.fill("#reason", "A names 1 thing; B rambles")
    page.press("#reason", "Control+Enter")
    expect_progress(page, 1)
    second = shown_texts(page)
    assert second != first

    page.keyboard.press("t")
    page.keyboard.press("Enter")
    expect_progress(page, 2)
    third = shown_texts(page)

    page.click("[data-verdict=both_bad]")  # the mouse
    page.click("#submit")
    expect(page.locator("#done")).to_be_visible()
    expect_progress(page, 3)

    ratings = store.ratings()
    name = "Ann <img src=x onerror=window.pwned=1>"
    assert [(r.rater, r.verdict, r.reason) for r in ratings] == [
        (name, "left", "A names 1 thing; B rambles"), (name, "tie", ""), (name, "both_bad", "")]  # fmt: skip
    for rating, texts in zip(ratings, (first, second, third), strict=True):
        assert matches(store, rating, texts)
    assert page.evaluate("window.pwned") is None
    expect(page.locator("#rater-name")).to_have_text(name)  # as text, not markup


@needs_browser
def test_reload_resumes_the_same_comparison_and_draft(store, server, new_page):
    from playwright.sync_api import expect

    page = new_page()
    sign_in(page, server.url, "bob")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect_progress(page, 1)
    shown = shown_texts(page)
    page.keyboard.press("4")
    page.fill("#reason", "neither answers")
    page.reload()  # the name, the comparison and the unsent choice all come back
    expect(page.locator("#rater-name")).to_have_text("bob")
    expect_progress(page, 1)
    assert shown_texts(page) == shown
    expect(page.locator("#reason")).to_have_value("neither answers")
    expect(page.locator("[data-verdict=both_bad]")).to_have_attribute("aria-pressed", "true")
    page.click("#submit")
    expect_progress(page, 2)
    last = store.ratings()[-1]
    assert (last.rater, last.verdict, last.reason) == ("bob", "both_bad", "neither answers")
    assert matches(store, last, shown)
    # switching rater: another name starts from the beginning
    page.click("#switch-rater")
    expect(page.locator("#comparison")).to_be_hidden()
    page.fill("#rater", "carol")
    page.click("#start")
    expect_progress(page, 0)


@needs_browser
def test_two_raters_at_once(store, server, new_page):
    from playwright.sync_api import expect

    pages = {name: new_page() for name in ("dan", "eve")}
    for name, page in pages.items():
        sign_in(page, server.url, name)
    shown = {name: [] for name in pages}
    for step in range(3):  # interleaved: each rates while the other's comparison is open
        for name, page in pages.items():
            shown[name].append(shown_texts(page))
            page.keyboard.press("1" if name == "dan" else "2")
            page.keyboard.press("Enter")
            if step < 2:
                expect_progress(page, step + 1)
    for page in pages.values():
        expect(page.locator("#done")).to_be_visible()
    for name in pages:
        mine = [r for r in store.ratings() if r.rater == name]
        assert [r.verdict for r in mine] == ["left" if name == "dan" else "right"] * 3
        assert len({r.prompt.id for r in mine}) == 3
        for rating, texts in zip(mine, shown[name], strict=True):
            assert matches(store, rating, texts)
    # the two started on different prompts (the store spreads raters over the comparisons)
    assert shown["dan"][0][0] != shown["eve"][0][0]


@needs_browser
def test_untrusted_answers_are_shown_as_text(store, new_page):
    from playwright.sync_api import expect

    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    store.register_model("hostile", "/nowhere", {})
    store.add_answers("hostile", [(p.id, hostile, "stop") for p in store.prompts()])
    live = LiveServer(create_arena_app(store, ["demo", "hostile"], seed=0))
    try:
        page = new_page()
        sign_in(page, live.url, "fay")
        side = "#left" if page.text_content("#left") == hostile else "#right"
        expect(page.locator(side)).to_have_text(hostile)
        assert page.locator(f"{side} img, {side} script").count() == 0
        assert page.evaluate("window.pwned") is None
        page.keyboard.press("3")
        page.keyboard.press("Enter")
        expect_progress(page, 1)
    finally:
        live.stop()
