"""The web chat page in headless Chromium against a live server with a tiny random model: streamed
replies equal the API's greedy text, history, regenerate, clear, Markdown rendered and sanitized,
agent steps with a real code-interpreter figure inline, and the API key."""

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SYSTEM = "You are a helpful assistant."

if importlib.util.find_spec("qwenkit.serve.api") is None:
    pytest.skip("the server module qwenkit.serve.api is not available", allow_module_level=True)
if importlib.util.find_spec("playwright") is None:
    pytest.skip("playwright (Python) is not installed", allow_module_level=True)
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (scripts/install_system.sh installs it)", allow_module_level=True)

from conftest import LiveServer  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from qwenkit.serve.api import create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(chat_model, official_tokenizer) -> Iterator[LiveServer]:
    live = LiveServer(create_app(chat_model, official_tokenizer, "tiny-web"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context()  # fresh storage: no conversation or settings carried over
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_greedy(page: Page, max_tokens: int) -> None:
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))


def api_reply(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": "tiny-web", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def conversation(page: Page) -> list[dict]:
    return json.loads(page.evaluate("sessionStorage.getItem('qwenkit.conversation') ?? '[]'"))


def send(page: Page, text: str) -> dict:
    """Type and send a message; wait for the reply; return the JSON body the page posted."""
    with page.expect_request(lambda r: r.method == "POST" and "/v1/" in r.url) as request:
        page.fill("#prompt", text)
        page.press("#prompt", "Enter")
    wait_idle(page)
    return request.value.post_data_json


def wait_idle(page: Page) -> None:
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    expect(page.locator("article.streaming")).to_have_count(0)


def test_chat_streams_keeps_history_regenerates_and_clears(server, page):
    page.goto(server.url)
    expect(page.locator("#model-name")).to_have_text("tiny-web")
    set_greedy(page, 12)
    # count how often the reply's text changes on screen while it streams
    page.evaluate("""() => {
        window.renders = new Set();
        new MutationObserver(() => {
            const reply = document.querySelector('article.assistant .content');
            if (reply && reply.textContent) window.renders.add(reply.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    body = send(page, "Hello")
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 12
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    first = api_reply(server.url, body["messages"], 12)
    assert first.strip(), "the tiny model's greedy reply is empty; pick another prompt"
    assert conversation(page) == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
    ]
    assert page.evaluate("window.renders.size") >= 2, "the reply appeared at once, not streamed"
    expect(page.locator("article.assistant .content")).not_to_be_empty()

    # the second turn sends the whole history, the first reply exactly as streamed
    body = send(page, "And then?")
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"},
               {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]  # fmt: skip
    assert body["messages"] == history
    second = api_reply(server.url, history, 12)
    assert conversation(page)[-1] == {"role": "assistant", "content": second}
    expect(page.locator("article.assistant")).to_have_count(2)

    # regenerate drops the last reply and asks again with the same history
    page.fill("#max_tokens", "6")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.click("#regenerate")
    wait_idle(page)
    assert request.value.post_data_json["messages"] == history
    expect(page.locator("article.assistant")).to_have_count(2)
    assert conversation(page)[-1] == {"role": "assistant", "content": api_reply(server.url, history, 6)}

    # the conversation survives a reload of the tab
    page.reload()
    expect(page.locator("article.message")).to_have_count(4)

    page.click("#clear")
    expect(page.locator("article.message")).to_have_count(0)
    assert conversation(page) == []
    body = send(page, "Hello")
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    assert conversation(page)[-1]["content"] == api_reply(server.url, body["messages"], 6)


def test_markdown_is_rendered_highlighted_and_sanitized(server, page):
    reply = "\n".join([
        "Here is **bold** and a table:", "", "| a | b |", "|---|---|", "| 1 | 2 |", "",
        "```python", "def add(a, b):", "    return a + b", "```", "",
        '<img src="x" onerror="window.pwned = 1"> <script>window.pwned = 2</script>',
        "[click](javascript:window.pwned=3) and [docs](https://example.org)",
    ])  # fmt: skip
    page.goto(server.url)
    stored = [{"role": "user", "content": "Show me <b>code</b>"}, {"role": "assistant", "content": reply}]
    page.evaluate("c => sessionStorage.setItem('qwenkit.conversation', JSON.stringify(c))", stored)
    page.reload()
    answer = page.locator("article.assistant .content")
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer.locator("table td")).to_have_text(["1", "2"])
    code = answer.locator("pre code.language-python")
    expect(code).to_contain_text("return a + b")
    assert "hljs" in code.get_attribute("class")
    expect(code.locator("span.hljs-keyword").first).to_have_text("def")
    # user text is shown as typed, never as HTML
    expect(page.locator("article.user .content")).to_have_text("Show me <b>code</b>")
    # DOMPurify removed the handlers, the script and the javascript: link; real links open safely
    assert page.evaluate("window.pwned") is None
    assert answer.locator("script").count() == 0
    assert answer.locator("img").get_attribute("onerror") is None
    assert answer.get_by_text("click").get_attribute("href") is None
    docs = answer.get_by_text("docs")
    assert docs.get_attribute("href") == "https://example.org"
    assert docs.get_attribute("rel") == "noopener noreferrer"


def scripted_model(replies: list[str], prompts: list[list[dict]]):
    """An agent text generator that writes `replies` in turn (the tiny random model writes no ReAct),
    recording the messages it is given; the tools it calls run for real."""

    def make_complete(engine, tokenizer, params):
        def complete(messages, stop):
            prompts.append(messages)
            text = replies[len(prompts) - 1]
            for i in range(0, len(text), 7):
                yield text[i : i + 7]

        return complete

    return make_complete


def test_agent_steps_and_figure_inline(server, page):
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\nprint(6 * 7)"
    replies = [
        'Thought: add first\nAction: calculator\nAction Input: {"expression": "2 + 3"}\n',
        f"I will plot it.\nAction: python\nAction Input: ```py\n{code}\n```\n",
        "I now know the final answer\nFinal Answer: The sum is **5** and the plot is above.",
    ]
    prompts: list[list[dict]] = []
    server.app.state.agent_complete = scripted_model(replies, prompts)
    try:
        page.goto(server.url)
        set_greedy(page, 16)
        page.check("#use-tools")
        body = send(page, "Add 2 and 3, then plot something")
    finally:
        del server.app.state.agent_complete
    assert body["tools"] == ["calculator", "python"] and len(body["session"]) == 32
    # the loop fed each real tool result back to the model
    assert prompts[1][-1]["content"].endswith("Observation: 5\nThought:")
    fed_back = prompts[2][-1]["content"]
    assert "Observation: 42\n" in fed_back and "[image 1: PNG" in fed_back

    steps = page.locator("article.assistant li.step")
    expect(steps).to_have_count(3)
    expect(steps.locator(".thought")).to_have_text(
        ["Thought: add first", "Thought: I will plot it.", "Thought: I now know the final answer"]
    )
    expect(steps.nth(0).locator(".tool-name")).to_have_text("calculator")
    expect(steps.nth(0).locator(".output")).to_have_text("5")
    expect(steps.nth(1).locator(".tool-name")).to_have_text("python")
    expect(steps.nth(1).locator(".action pre code")).to_contain_text("plt.plot([1, 3, 2])")
    expect(steps.nth(1).locator(".action pre code")).not_to_contain_text("```")  # the fence is not shown
    expect(steps.nth(1).locator(".output")).to_contain_text("42")
    expect(steps.nth(2).locator(".action")).to_have_count(0)
    figure = steps.nth(1).locator("img.figure")
    expect(figure).to_have_count(1)
    assert figure.evaluate("img => img.decode().then(() => img.naturalWidth)") > 100  # a real PNG
    expect(page.locator("article.assistant .content strong")).to_have_text("5")
    assert conversation(page)[-1]["content"] == "The sum is **5** and the plot is above."

    # the steps and the figure come back after a reload; the next question sends the answer as history
    page.reload()
    expect(page.locator("article.assistant img.figure")).to_have_count(1)
    server.app.state.agent_complete = scripted_model(["Final Answer: done"], prompts := [])
    try:
        body = send(page, "Thanks")
    finally:
        del server.app.state.agent_complete
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == "The sum is **5** and the plot is above."
    expect(page.locator("article.assistant").last.locator(".content")).to_have_text("done")

    # Clear ends the session's interpreter on the server
    with page.expect_response(lambda r: r.request.method == "DELETE") as ended:
        page.click("#clear")
    assert ended.value.status == 204


def test_stop_ends_the_agent_run_and_frees_the_session(server, page):
    closed = threading.Event()

    def make_complete(engine, tokenizer, params):
        def complete(messages, stop):
            try:
                yield "Thought: thinking"
                for _ in range(600):  # 30 s unless stopped
                    time.sleep(0.05)
                    yield "."
            finally:
                closed.set()

        return complete

    server.app.state.agent_complete = make_complete
    try:
        page.goto(server.url)
        set_greedy(page, 16)
        page.check("#use-tools")
        page.fill("#prompt", "Think forever")
        page.press("#prompt", "Enter")
        expect(page.locator("li.step .thought")).to_contain_text("Thought: thinking")
        session = page.evaluate("sessionStorage.getItem('qwenkit.session')")
        busy = {"messages": [{"role": "user", "content": "hi"}], "session": session}
        assert httpx.post(f"{server.url}/v1/agent", json=busy, timeout=30).status_code == 409
        page.click("#stop")
        expect(page.locator("article.assistant .note")).to_have_text("Stopped.")
        assert closed.wait(10), "the server kept generating after the page stopped"
        wait_idle(page)
        assert conversation(page)[-1]["steps"][0]["thought"].startswith("Thought: thinking.")
        # the session is free again: the next question runs
        server.app.state.agent_complete = scripted_model(["Final Answer: ok"], [])
        body = send(page, "Hello again")
    finally:
        del server.app.state.agent_complete
    assert body["session"] == session
    expect(page.locator("article.assistant").last.locator(".content")).to_have_text("ok")
    expect(page.locator("[role=alert]")).to_have_count(0)


def test_agent_endpoint_rejects_bad_requests(server):
    url = f"{server.url}/v1/agent"
    good = {"messages": [{"role": "user", "content": "hi"}], "session": "abcdefgh"}
    cases = [
        {**good, "messages": []},
        {**good, "messages": [{"role": "assistant", "content": "hi"}]},
        {**good, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {**good, "messages": [{"role": "tool", "content": "hi"}]},
        {**good, "tools": ["shell"]},
        {**good, "session": "../../etc"},
        {**good, "temperature": -1},
        {**good, "max_tokens": 0},
    ]
    for case in cases:
        response = httpx.post(url, json=case, timeout=30)
        assert response.status_code == 400, (case, response.text)
        assert response.json()["error"]["message"]
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400
    assert httpx.delete(f"{url}/sessions/nosuchsession", timeout=30).status_code == 404


def test_api_key_is_asked_for_and_used(chat_model, official_tokenizer, browser):
    live = LiveServer(create_app(chat_model, official_tokenizer, "tiny-key", api_key="sesame"))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(live.url)
        expect(page.locator("#model-name")).to_have_text("(API key needed)")
        set_greedy(page, 4)
        send(page, "Hello")
        expect(page.locator("article.assistant [role=alert]")).to_contain_text("API key")
        agent = {"messages": [{"role": "user", "content": "hi"}], "session": "abcdefgh"}
        assert httpx.post(f"{live.url}/v1/agent", json=agent, timeout=30).status_code == 401

        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model-name")).to_have_text("tiny-key")
        with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
            page.click("#regenerate")
        wait_idle(page)
        assert request.value.headers["authorization"] == "Bearer sesame"
        expect(page.locator("[role=alert]")).to_have_count(0)  # the failed attempt is replaced
        assert conversation(page)[-1]["role"] == "assistant"
    finally:
        context.close()
        live.stop()


def test_vendored_libraries_are_recorded():
    vendor = Path(__file__).parents[1] / "src/qwenkit/serve/static/vendor"
    readme = (vendor / "README.md").read_text()
    for name, version in [("marked", "18.2.1"), ("DOMPurify", "3.4.18"), ("highlight.js", "11.12.0")]:
        assert name in readme and version in readme
    assert "marked v18.2.1" in (vendor / "marked.esm.js").read_text()[:200]
    assert "DOMPurify 3.4.18" in (vendor / "purify.es.mjs").read_text()[:200]
    assert "Highlight.js v11.12.0" in (vendor / "highlight/core.min.js").read_text()[:200]


def test_sessions_are_locked_per_run_and_evicted_least_recently_used():
    from fastapi import HTTPException

    from qwenkit.serve.web import Sessions

    sessions = Sessions(limit=2)
    a, evicted = sessions.acquire("session-a")
    assert evicted is None
    with pytest.raises(HTTPException) as busy:
        sessions.acquire("session-a")
    assert busy.value.status_code == 409
    b, _ = sessions.acquire("session-b")
    with pytest.raises(HTTPException) as full:
        sessions.acquire("session-c")
    assert full.value.status_code == 429  # both sessions are running
    a.lock.release()
    b.lock.release()
    assert sessions.acquire("session-a")[0] is a  # the same kernel for the same tab
    a.lock.release()
    c, evicted = sessions.acquire("session-c")  # b is now the least recently used
    assert evicted is b and list(sessions.sessions) == ["session-a", "session-c"]
    c.lock.release()
    assert sessions.end("session-c") and not sessions.end("session-c")
    sessions.close()
    with pytest.raises(HTTPException) as closing:
        sessions.acquire("session-a")
    assert closing.value.status_code == 503
