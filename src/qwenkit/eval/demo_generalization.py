"""`demo-generalization`: does the demo model hold up on prompts its own generator never wrote (issue 17)?

Two sets, neither made by qwenkit.demo.data nor used to tune it:

- "handwritten": `eval/data/demo_handwritten.jsonl`, conversations written by hand;
- "generated": drawn here (`generated_items`) from word lists and templates written separately from the
  training generator: other wording, other tools, numbers in words, typos and casing, politeness,
  questions outside the model's knowledge, 3-turn conversations that change topic and language.

An item is 1-3 user turns, the tools offered (by name: TOOL_SPECS), the intent of its last turn and
what that answer must contain. The model answers each turn in order with its own earlier replies as
the history, as in a chat session; when it calls a tool, the tool runs and the model continues with
the result (at most MAX_CALLS calls a turn). A local model runs through qwenkit's decoding core on the
prompts training renders (qwenkit.chatml.render_messages: ChatML, the ReAct instruction when tools
are offered); `--api` sends the same conversations to the server's /v1/chat/completions with the tools
in the request (its function-calling path). Greedy decoding.

Measures (each a rate over the turns or items it applies to; TARGETS holds the issue's):

- language: every answer in the language of the user turn it answers;
- im_end: every turn ends with <|im_end|> (API: finish_reason "stop", not "length");
- no_react_without_tools: no tools offered: the reply has no ReAct text (Thought:/Action:/Final Answer:...);
- tool_call: a calculation asked with the calculator offered: the first reply calls the calculator
  with an expression whose value is the right one (any spelling of it);
- tool_result: the final answer of that turn contains the calculator's result;
- no_call_when_not_needed: tools offered, the question needs none: no tool call;
- dont_know: a question outside the model's knowledge: it says it does not know (DONT_KNOW);
- multi_turn: 3-turn conversations: the last answer is in the last turn's language, on its topic
  (contains what it must, or says it does not know) and repeats no earlier answer;
- greeting, identity, knowledge: a greeting answered in kind (GREETING) / names itself Qwen Demo /
  contains the fact (no target: informative).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.agent.react import calculate, calculator
from qwenkit.errors import QwenkitError
from qwenkit.eval.base import Backend, EvalSettings, LocalBackend, Prediction, TaskResult, progress, task

HANDWRITTEN_FILE = "demo_handwritten.jsonl"
GENERATED_ITEMS = 200  # the generated set's size when --limit is not given
MAX_CALLS = 2  # tool calls a turn may make before its answer counts as missing
MAX_NEW_TOKENS = 128
DEMO_NAME = "Qwen Demo"
INTENTS = ("greeting", "identity", "knowledge", "unknown", "calculation")

TARGETS = {"language": 0.95, "im_end": 1.0, "no_react_without_tools": 0.99, "tool_call": 0.9,
           "tool_result": 0.9, "dont_know": 0.8, "multi_turn": 0.9}  # fmt: skip
MEASURES = {
    "language": "answers in the language of the question (every turn)",
    "im_end": "turns ending with <|im_end|>",
    "no_react_without_tools": "no tools offered: no ReAct text in the reply",
    "tool_call": "calculation, calculator offered: a calculator call with the right expression",
    "tool_result": "calculation, calculator offered: final answer contains the tool's result",
    "no_call_when_not_needed": "tools offered, none needed: no tool call",
    "dont_know": "outside its knowledge: says it does not know",
    "multi_turn": "3-turn conversations: last answer in the last turn's language and topic",
    "greeting": "greetings and thanks answered in kind (not with an unrelated fact)",
    "identity": "names itself Qwen Demo when asked who it is",
    "knowledge": "knowledge of its world (capitals, simple facts) answered correctly",
}

REACT_TEXT = re.compile(r"\b(Thought|Action|Action Input|Observation|Final Answer)\s*:")
DONT_KNOW = re.compile(
    r"(don'?t know|do not know|not sure|no idea|can'?t (?:answer|tell|say|know)|cannot (?:answer|tell|say|know)"
    r"|unable to|not able to|don'?t have|do not have|outside (?:of )?my|beyond my"
    r"|不知道|不清楚|不确定|无法|不了解|答不上|回答不了|没有(?:这方面|相关|这个)?的?(?:信息|资料|数据|知识))",
    re.IGNORECASE,
)

# The tools an item may offer. Only the calculator is ever needed; the other two are decoys the model
# never saw in training, with fixed results should it call them.
TOOL_SPECS = {
    "calculator": calculator.spec(),
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    "translate": {"type": "function", "function": {
        "name": "translate", "description": "Translate a text into another language.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}, "target": {"type": "string"}},
                       "required": ["text", "target"]}}},
}  # fmt: skip
DECOY_RESULTS = {
    "get_weather": "Sunny, 22 degrees Celsius.",
    "translate": "Error: translation service unavailable",
}


def is_chinese(text: str) -> bool:
    """More CJK characters than Latin letters."""
    return len(re.findall(r"[\u4e00-\u9fff]", text)) > len(re.findall(r"[A-Za-z]", text))


def in_language(reply: str, chinese: bool) -> bool:
    """Chinese: more CJK characters than Latin letters (its own name aside); English: no CJK at all."""
    cjk = len(re.findall(r"[\u4e00-\u9fff]", reply))
    latin = len(re.findall(r"[A-Za-z]", reply.replace(DEMO_NAME, "").replace("qwenkit", "")))
    return cjk > latin if chinese else cjk == 0 and bool(reply.strip())


GREETING = re.compile(
    r"\b(hello|hi|hey|good (?:morning|afternoon|evening|day)|nice to meet|welcome|thank|glad|happy|help you"
    r"|doing (?:well|great|fine)|how are you|bye)\b|你好|嗨|早上好|下午好|晚上好|很高兴|谢谢|不客气|欢迎|帮你|再见|我很好|聊",
    re.IGNORECASE,
)


def answers_in_kind(reply: str) -> bool:
    """A greeting or thanks answered with one (not with an unrelated fact)."""
    return GREETING.search(reply) is not None


def says_dont_know(reply: str) -> bool:
    return DONT_KNOW.search(reply) is not None


# --- items -------------------------------------------------------------------------------------------


@dataclass
class Item:
    id: str
    turns: list[str]  # the user's messages, in order
    intent: str  # of the last turn: greeting | identity | knowledge | unknown | calculation
    tools: list[str] = field(default_factory=list)  # names in TOOL_SPECS
    expect: list[str] = field(default_factory=list)  # the last answer contains one of these (any case)
    result: str = ""  # calculation: the value of the expression asked for (calculate's spelling)

    @property
    def category(self) -> str:
        if len(self.turns) > 1:
            return "multi_turn"
        if self.intent == "calculation":
            return "calculation_with_tool" if "calculator" in self.tools else "calculation_without_tool"
        return "tool_not_needed" if self.tools else self.intent


def item_from_row(row: dict[str, Any], where: str) -> Item:
    """An item from a JSON object; one-line errors name the file and line."""
    turns, intent, tools = row.get("turns"), row.get("intent"), row.get("tools", [])
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise QwenkitError(f"{where}: 'turns' must be a non-empty list of user messages")
    if intent not in INTENTS:
        raise QwenkitError(f"{where}: 'intent' must be one of {', '.join(INTENTS)}, got {intent!r}")
    if not isinstance(tools, list) or any(t not in TOOL_SPECS for t in tools):
        raise QwenkitError(f"{where}: 'tools' must list names among {', '.join(TOOL_SPECS)}")
    expect = row.get("expect", [])
    if not isinstance(expect, list) or not all(isinstance(e, str) and e for e in expect):
        raise QwenkitError(f"{where}: 'expect' must be a list of strings")
    result = row.get("result", "")
    if intent == "calculation":
        if not isinstance(row.get("expression"), str):
            raise QwenkitError(f"{where}: a calculation needs its 'expression' (e.g. \"37 * 43\")")
        try:
            result = calculate(row["expression"])
        except (ValueError, SyntaxError, ZeroDivisionError):
            raise QwenkitError(f"{where}: 'expression' {row['expression']!r} is not arithmetic") from None
    return Item(str(row.get("id", where)), turns, intent, tools, expect, result)


def handwritten_items(path: Path | None = None) -> list[Item]:
    """The hand-written set (or the JSONL file `path` in its format)."""
    from qwenkit.eval.base import read_jsonl
    from qwenkit.eval.tools import packaged_data

    path = Path(path) if path is not None else packaged_data(HANDWRITTEN_FILE)
    return [item_from_row(row, f"{path}:{number}") for number, row in read_jsonl(path)]


# --- the independent generator -------------------------------------------------------------------
# Written for this evaluation only, apart from qwenkit.demo.data and never used to tune it.

EN_HELLOS = [
    "hey",
    "hiya",
    "good evening",
    "greetings",
    "howdy",
    "hello again",
    "morning",
    "hey there friend",
]
EN_HELLO_TAILS = ["", " how's it going?", " nice to meet you.", " what's up?", " how is your day going?"]
ZH_HELLOS = ["哈喽", "嘿", "晚上好", "下午好", "你好呀", "在吗", "嗨嗨"]
ZH_HELLO_TAILS = ["", "最近怎么样？", "很高兴认识你。", "今天过得好吗？"]
EN_WHO = ["what's your name", "who am i chatting with", "describe yourself in one sentence", "what are you exactly",
          "are you an ai", "what can you help me with", "introduce yourself briefly", "which model is this",
          "tell me a little about who you are"]  # fmt: skip
EN_WHO_LEADS = ["", "so, ", "quick one: ", "hey, ", "i'm curious, ", "before we start, "]
ZH_WHO = ["你叫啥", "你是哪个模型", "能简单介绍下自己吗", "你是人工智能吗", "你都会些什么", "我在跟谁聊天",
          "说说你是谁", "用一句话介绍一下你自己"]  # fmt: skip
ZH_WHO_LEADS = ["", "请问，", "那个，", "嗨，", "开始之前，"]
# (country, capital) pairs of the model's world, in English and Chinese
KNOWN_CAPITALS = [("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("Egypt", "Cairo", "埃及", "开罗"),
                  ("Italy", "Rome", "意大利", "罗马"), ("Canada", "Ottawa", "加拿大", "渥太华"),
                  ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Germany", "Berlin", "德国", "柏林"),
                  ("Spain", "Madrid", "西班牙", "马德里")]  # fmt: skip
EN_CAPITAL_ASKS = ["capital of {c}?", "{c}'s capital city is which one?", "in {c}, which city is the capital?",
                   "where is the capital of {c}", "i forgot the capital of {c}, can you remind me?"]  # fmt: skip
ZH_CAPITAL_ASKS = [
    "{c}首都是哪儿？",
    "{c}的首都在哪个城市",
    "你知道{c}首都叫啥吗？",
    "我忘了{c}的首都是哪里了，提醒我一下？",
]
# (English question, accepted answers, Chinese question, accepted answers)
KNOWN_FACTS = [
    ("how many legs has a spider got?", ["eight", "8"], "蜘蛛一共几条腿呀？", ["八", "8"]),
    ("a week has how many days?", ["seven", "7"], "一个星期有多少天？", ["七", "7"]),
    ("which planet is the biggest one in our solar system?", ["Jupiter"], "咱们太阳系里个头最大的行星是？", ["木星"]),
    ("what do bees produce?", ["honey"], "蜜蜂能产出什么？", ["蜂蜜"]),
    ("what's a panda's favourite food?", ["bamboo"], "大熊猫最爱吃啥？", ["竹"]),
    ("grass is what colour?", ["green"], "小草是什么颜色？", ["绿"]),
]  # fmt: skip
EN_UNKNOWN = ["who is the mayor of {town}?", "what's the population of {town}?", "when was {town} founded?",
              "what's the capital of {country}?", "how many people live in {country}?", "who wrote {book}?",
              "what will the weather be like in {town} next week?", "what is my favourite colour?",
              "what did i have for breakfast today?", "what is the phone number of my dentist?"]  # fmt: skip
EN_TOWNS, EN_COUNTRIES = (
    ["Lyon", "Osaka", "Porto", "Leeds", "Curitiba"],
    ["Mongolia", "Chile", "Nepal", "Iceland", "Ghana"],
)
EN_BOOKS = ["War and Peace", "Don Quixote", "Hamlet", "One Hundred Years of Solitude"]
ZH_UNKNOWN = ["{town}的市长是谁？", "{town}有多少人口？", "{country}的首都是哪里？", "{country}有多少人？", "{book}是谁写的？",
              "{town}下周天气怎么样？", "我最喜欢什么颜色？", "我今天早饭吃了什么？", "我牙医的电话号码是多少？"]  # fmt: skip
ZH_TOWNS, ZH_COUNTRIES = (
    ["里昂", "大阪", "波尔图", "利兹", "库里蒂巴"],
    ["蒙古", "智利", "尼泊尔", "冰岛", "加纳"],
)
ZH_BOOKS = ["《战争与和平》", "《堂吉诃德》", "《哈姆雷特》", "《百年孤独》"]
EN_OPS = {"+": ["plus", "+", "added to"], "-": ["minus", "-", "take away"], "*": ["times", "*", "x", "multiplied by"],
          "/": ["divided by", "/", "over"]}  # fmt: skip
ZH_OPS = {
    "+": ["加", "+", "加上"],
    "-": ["减", "-", "减去"],
    "*": ["乘", "×", "乘以"],
    "/": ["除以", "÷", "/"],
}
EN_CALC_ASKS = ["what's {e}? use the calculator.", "could you calculate {e} for me", "i need {e}", "{e} = ?",
                "work out {e} please", "hey, what is {e}", "use your calculator tool: {e}", "how much do i get for {e}?"]  # fmt: skip
ZH_CALC_ASKS = ["{e}是多少？用计算器算一下。", "帮我算算{e}", "{e}等于几？", "请计算：{e}", "麻烦算一下{e}的结果",
                "用计算器帮我算{e}吧"]  # fmt: skip


def _noisy_english(rng: random.Random, text: str) -> str:
    """Casing, a doubled letter (typo), punctuation dropped or doubled."""
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        words = text.split(" ")
        k = rng.randrange(len(words))
        if len(words[k]) > 3:
            c = rng.randrange(1, len(words[k]) - 1)
            words[k] = words[k][:c] + words[k][c] + words[k][c:]
        text = " ".join(words)
    roll = rng.random()
    if roll < 0.15:
        text = text.rstrip("?.!")
    elif roll < 0.25 and text.endswith("?"):
        text += "?"
    return text


def _noisy_chinese(rng: random.Random, text: str) -> str:
    roll = rng.random()
    if roll < 0.2:
        return text.rstrip("？。！?")
    if roll < 0.3:
        return text.replace("？", "?")
    return text


def _number(rng: random.Random, n: int, chinese: bool) -> str:
    if rng.random() < 0.3:
        import cn2an
        from num2words import num2words

        return cn2an.an2cn(n) if chinese else num2words(n)
    return str(n)


def _expression(rng: random.Random) -> tuple[str, int, int]:
    symbol = rng.choice("+-*/")
    a, b = rng.randint(2, 999), rng.randint(2, 99 if symbol in "*/" else 999)
    if symbol == "/":
        a = b * rng.randint(2, 60)
    return symbol, a, b


def _draw_turn(
    rng: random.Random, intent: str, chinese: bool, calculator_offered: bool
) -> tuple[str, list[str], str]:
    """(user message, what the answer must contain, calculation result) for one turn."""
    if intent == "greeting":
        if chinese:
            return rng.choice(ZH_HELLOS) + rng.choice(["！", "，", "~"]) + rng.choice(ZH_HELLO_TAILS), [], ""
        return (
            _noisy_english(
                rng, rng.choice(EN_HELLOS) + rng.choice(["!", ",", "."]) + rng.choice(EN_HELLO_TAILS)
            ),
            [],
            "",
        )
    if intent == "identity":
        if chinese:
            return _noisy_chinese(rng, rng.choice(ZH_WHO_LEADS) + rng.choice(ZH_WHO) + "？"), [DEMO_NAME], ""
        return _noisy_english(rng, rng.choice(EN_WHO_LEADS) + rng.choice(EN_WHO) + "?"), [DEMO_NAME], ""
    if intent == "knowledge":
        if rng.random() < 0.5:
            country, capital, country_zh, capital_zh = rng.choice(KNOWN_CAPITALS)
            if chinese:
                return _noisy_chinese(rng, rng.choice(ZH_CAPITAL_ASKS).format(c=country_zh)), [capital_zh], ""
            return _noisy_english(rng, rng.choice(EN_CAPITAL_ASKS).format(c=country)), [capital], ""
        en, en_keys, zh, zh_keys = rng.choice(KNOWN_FACTS)
        return (_noisy_chinese(rng, zh), zh_keys, "") if chinese else (_noisy_english(rng, en), en_keys, "")
    if intent == "unknown":
        if chinese:
            text = rng.choice(ZH_UNKNOWN).format(town=rng.choice(ZH_TOWNS), country=rng.choice(ZH_COUNTRIES),
                                                 book=rng.choice(ZH_BOOKS))  # fmt: skip
            return _noisy_chinese(rng, text), [], ""
        text = rng.choice(EN_UNKNOWN).format(town=rng.choice(EN_TOWNS), country=rng.choice(EN_COUNTRIES),
                                             book=rng.choice(EN_BOOKS))  # fmt: skip
        return _noisy_english(rng, text), [], ""
    symbol, a, b = _expression(rng)
    if not calculator_offered:  # small numbers: answerable without a tool
        a, b, symbol = rng.randint(1, 12), rng.randint(1, 12), rng.choice("+-")
    result = calculate(f"{a} {symbol} {b}")
    if chinese:
        expression = _number(rng, a, True) + rng.choice(ZH_OPS[symbol]) + _number(rng, b, True)
        asks = ZH_CALC_ASKS if calculator_offered else ["{e}等于几？", "{e}是多少呀？", "心算一下{e}"]
        return _noisy_chinese(rng, rng.choice(asks).format(e=expression)), [result], result
    expression = f"{_number(rng, a, False)} {rng.choice(EN_OPS[symbol])} {_number(rng, b, False)}"
    asks = (
        EN_CALC_ASKS
        if calculator_offered
        else ["what's {e}?", "quick maths: {e}", "do you know what {e} is?"]
    )
    return _noisy_english(rng, rng.choice(asks).format(e=expression)), [result], result


def generated_items(count: int, seed: int = 0) -> list[Item]:
    """`count` items from `seed`: single questions of every intent with and without tools, and 3-turn
    conversations whose turns change intent and (half the time) language; the last turn's intent is
    neither earlier turn's."""
    rng = random.Random(f"demo-generalization/{seed}")
    categories = ["greeting", "identity", "knowledge", "unknown", "calculation_with_tool", "tool_not_needed",
                  "calculation_without_tool", "multi_turn"]  # fmt: skip
    weights = [0.1, 0.12, 0.12, 0.12, 0.2, 0.1, 0.06, 0.18]
    items = []
    for k in range(count):
        category = rng.choices(categories, weights)[0]
        chinese = rng.random() < 0.5
        if category == "multi_turn":
            intents = [rng.choice(INTENTS[:4]) for _ in range(2)]
            # the last turn asks something unlike both earlier ones: the same question asked twice
            # has the same right answer, which the multi_turn measure would count as a repeat
            intents.append(rng.choice([i for i in INTENTS[:4] if i not in intents]))
            languages = [chinese]
            for _ in range(2):
                languages.append(languages[-1] if rng.random() < 0.5 else not languages[-1])
            turns = [_draw_turn(rng, i, c, False) for i, c in zip(intents, languages, strict=True)]
            items.append(Item(f"g{k}", [t[0] for t in turns], intents[-1], [], turns[-1][1]))
            continue
        if category == "calculation_with_tool":
            intent, tools = "calculation", ["calculator"] + (["get_weather"] if rng.random() < 0.3 else [])
        elif category == "calculation_without_tool":
            intent, tools = "calculation", []
        elif category == "tool_not_needed":
            intent = rng.choice(INTENTS[:4])
            tools = ["calculator"] + (["translate"] if rng.random() < 0.4 else [])
        else:
            intent, tools = category, []
        rng.shuffle(tools)
        text, expect, result = _draw_turn(rng, intent, chinese, "calculator" in tools)
        items.append(Item(f"g{k}", [text], intent, tools, expect, result))
    return items


# --- running conversations ------------------------------------------------------------------------


@dataclass
class Step:
    """One reply of the model: the text a user sees, a tool call if it made one, and whether it ended
    properly (at <|im_end|>, or for a call at its Observation)."""

    content: str
    raw: str
    call: tuple[str, str] | None
    ended: bool


def local_steps(backend: LocalBackend, conversations: Sequence[tuple[list[dict], list[str]]],
                max_new_tokens: int) -> list[Step]:  # fmt: skip
    """One reply per (messages, tool names), rendered as training renders conversations; with tools
    the reply stops at its Observation and is read by the server's reader (serve.api.ReactOutput):
    a call, the Final Answer, or the text."""
    from qwenkit.chatml import render_messages
    from qwenkit.demo.evaluate import generate_replies
    from qwenkit.serve.api import ReactOutput

    tokenizer = backend.tokenizer
    steps: list[Step | None] = [None] * len(conversations)
    for with_tools in (False, True):
        chosen = [i for i, (_, tools) in enumerate(conversations) if bool(tools) == with_tools]
        if not chosen:
            continue
        prompts = []
        for i in chosen:
            messages, tools = conversations[i]
            specs = [TOOL_SPECS[t] for t in tools] or None
            prompts.append(render_messages(tokenizer, messages, specs, prompt=True).input_ids)
        stops = ["Observation:"] if with_tools else []
        replies = generate_replies(
            backend.model, tokenizer, prompts, stops, max_new_tokens, backend.batch_size
        )
        for i, reply in zip(chosen, replies, strict=True):
            if not with_tools:
                steps[i] = Step(reply.text.strip(), reply.text, None, reply.ended)
                continue
            reader = ReactOutput()  # the server's own reading of a ReAct reply
            content = reader.feed(reply.text)
            rest, call = reader.finish()
            content += rest
            called = (call.name, call.arguments) if call is not None else None
            steps[i] = Step(content.strip(), reply.text, called, reply.ended)
    return steps  # type: ignore[return-value]


def api_steps(
    backend, conversations: Sequence[tuple[list[dict], list[str]]], max_new_tokens: int
) -> list[Step]:
    """One reply per (messages, tool names) from the server's /v1/chat/completions, tools in the request,
    `backend.batch_size` requests at a time (the server batches them)."""

    def ask(conversation: tuple[list[dict], list[str]]) -> Step:
        messages, tools = conversation
        body: dict[str, Any] = {"model": backend.name, "messages": messages, "temperature": 0.0,
                                "max_tokens": max_new_tokens}  # fmt: skip
        if tools:
            body["tools"] = [TOOL_SPECS[t] for t in tools]
        choice = backend._request("POST", "/chat/completions", body)["choices"][0]
        message = choice.get("message") or {}
        content = message.get("content") or ""
        calls = message.get("tool_calls") or []
        call = (calls[0]["function"]["name"], calls[0]["function"]["arguments"]) if calls else None
        return Step(content.strip(), content, call, choice.get("finish_reason") in ("stop", "tool_calls"))

    with ThreadPoolExecutor(max_workers=max(1, backend.batch_size)) as pool:
        return list(pool.map(ask, conversations))


def run_tool(name: str, arguments: str) -> str:
    if name == "calculator":
        return calculator.call(arguments)
    return DECOY_RESULTS.get(name, f"Error: there is no tool named {name!r}")


@dataclass
class Transcript:
    """What happened in one item: the messages (with the model's replies) and each turn's steps."""

    messages: list[dict] = field(default_factory=list)
    turns: list[list[Step]] = field(default_factory=list)


def run_items(backend: Backend, items: Sequence[Item], settings: EvalSettings, desc: str) -> list[Transcript]:
    """Play every item's turns in order, all items together (each round of replies is one batch)."""
    from qwenkit.eval.remote import ApiBackend

    max_new_tokens = settings.max_new_tokens or MAX_NEW_TOKENS
    if isinstance(backend, LocalBackend):
        replies = local_steps
    elif isinstance(backend, ApiBackend):
        replies = api_steps
    else:
        raise QwenkitError("demo-generalization runs a local model (--model) or a server (--api)")
    transcripts = [Transcript() for _ in items]
    with progress(sum(len(i.turns) for i in items), desc, settings.progress) as bar:
        for turn in range(max(len(i.turns) for i in items)):
            active = [k for k, item in enumerate(items) if turn < len(item.turns)]
            for k in active:
                transcripts[k].messages.append({"role": "user", "content": items[k].turns[turn]})
                transcripts[k].turns.append([])
            calls = 0
            while active:
                conversations = [(transcripts[k].messages, items[k].tools) for k in active]
                steps = replies(backend, conversations, max_new_tokens)
                waiting = []
                for k, step in zip(active, steps, strict=True):
                    t = transcripts[k]
                    t.turns[-1].append(step)
                    if step.call is None or calls == MAX_CALLS:
                        t.messages.append({"role": "assistant", "content": step.content})
                        continue
                    name, arguments = step.call
                    call_id = f"call_{turn}_{calls}"
                    t.messages += [
                        {"role": "assistant", "content": step.content, "tool_calls": [
                            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                        {"role": "tool", "tool_call_id": call_id, "content": run_tool(name, arguments)},
                    ]  # fmt: skip
                    waiting.append(k)
                active, calls = waiting, calls + 1
            bar.update(sum(1 for item in items if turn < len(item.turns)))
    return transcripts


# --- scoring ----------------------------------------------------------------------------------------


def score_item(item: Item, transcript: Transcript) -> dict[str, list[bool]]:
    """The item's checks: measure -> one result per turn or item it applies to."""
    checks: dict[str, list[bool]] = {}

    def check(measure: str, passed: bool) -> None:
        checks.setdefault(measure, []).append(bool(passed))

    answers = []
    for turn, steps in zip(item.turns, transcript.turns, strict=True):
        final = steps[-1]
        answer = final.content if final.call is None else ""
        answers.append(answer)
        check("language", in_language(answer, is_chinese(turn)))
        check("im_end", final.call is None and final.ended)
        if not item.tools:
            check(
                "no_react_without_tools", all(s.call is None and not REACT_TEXT.search(s.raw) for s in steps)
            )
    last, answer = transcript.turns[-1], answers[-1]
    first_call = last[0].call
    if item.intent == "calculation" and "calculator" in item.tools and len(item.turns) == 1:
        right = first_call is not None and first_call[0] == "calculator"
        check("tool_call", right and calculator.call(first_call[1]) == item.result)
        check("tool_result", any(s.call is not None for s in last) and item.result in answer)
    if item.tools and item.intent != "calculation":
        check("no_call_when_not_needed", all(s.call is None for s in last))
    on_topic = any(e.lower() in answer.lower() for e in item.expect) if item.expect else bool(answer)
    if item.intent == "unknown":
        check("dont_know", says_dont_know(answer))
        on_topic = says_dont_know(answer)
    elif item.intent == "greeting":
        on_topic = answers_in_kind(answer)
        check("greeting", on_topic)
    elif item.intent == "identity":
        check("identity", on_topic)
    elif item.intent == "knowledge":
        check("knowledge", on_topic)
    if len(item.turns) > 1:
        fresh = answer.strip() not in {a.strip() for a in answers[:-1]}
        check("multi_turn", in_language(answer, is_chinese(item.turns[-1])) and on_topic and fresh)
    return checks


def summarize(checks: Sequence[dict[str, list[bool]]]) -> dict[str, dict[str, float]]:
    """measure -> {"rate", "n"} over all items' checks, in MEASURES order."""
    totals: dict[str, list[bool]] = {}
    for item_checks in checks:
        for measure, results in item_checks.items():
            totals.setdefault(measure, []).extend(results)
    return {
        m: {"rate": sum(totals[m]) / len(totals[m]), "n": float(len(totals[m]))}
        for m in MEASURES
        if totals.get(m)
    }


def score_table(sets: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per measure, one column per set (rate and count), the target."""
    names = list(sets)
    rows = ["| measure | " + " | ".join(names) + " | target |", "|---|" + "---|" * len(names) + "---|"]
    for measure, text in MEASURES.items():
        if not any(measure in s for s in sets.values()):
            continue
        cells = [
            f"{s[measure]['rate']:.1%} ({int(s[measure]['n'])})" if measure in s else ""
            for s in sets.values()
        ]
        target = f">= {TARGETS[measure]:.0%}" if measure in TARGETS else ""
        name = text.replace("|", "\\|")  # a table cell: "<|im_end|>" must not split it
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {target} |")
    return "\n".join(rows)


def scores_by_set(result: TaskResult) -> dict[str, dict[str, dict[str, float]]]:
    """set -> measure -> {"rate", "n"} of a demo-generalization result (what score_table takes)."""
    return {name: {m: {"rate": rate, "n": result.groups[f"{name} (counted)"][m]} for m, rate in scores.items()}
            for name, scores in result.groups.items() if not name.endswith("(counted)")}  # fmt: skip


@task("demo-generalization",
      description="the demo model on prompts its generator never wrote: hand-written and independently generated")  # fmt: skip
def run_demo_generalization(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """Issue 17's measures on the hand-written set (--data: another file in its format) and on
    --limit (default 200) items of the independent generator with --seed; --limit also caps the
    hand-written set."""
    if backend is None:
        raise QwenkitError("demo-generalization needs a model (--model, default the demo model, or --api)")
    started = time.perf_counter()
    sets = {"handwritten": handwritten_items(settings.data),
            "generated": generated_items(settings.limit or GENERATED_ITEMS, settings.seed)}  # fmt: skip
    if settings.limit is not None:
        sets["handwritten"] = sets["handwritten"][: settings.limit]
    metrics: dict[str, float] = {}
    groups: dict[str, dict[str, float]] = {}
    predictions = []
    for name, items in sets.items():
        transcripts = run_items(backend, items, settings, f"demo-generalization ({name})")
        checks = [score_item(i, t) for i, t in zip(items, transcripts, strict=True)]
        scores = summarize(checks)
        metrics.update({f"{name}.{m}": s["rate"] for m, s in scores.items()})
        groups[name] = {m: s["rate"] for m, s in scores.items()}
        groups[f"{name} (counted)"] = {m: s["n"] for m, s in scores.items()}
        for item, transcript, item_checks in zip(items, transcripts, checks, strict=True):
            replies = [steps[-1].content if steps[-1].call is None else "" for steps in transcript.turns]
            predictions.append(Prediction(
                f"{name}/{item.id}", replies, item.expect or item.result or None,
                all(all(v) for v in item_checks.values()), item.category,
                {"turns": item.turns, "tools": item.tools, "intent": item.intent, "checks": item_checks,
                 "transcript": transcript.messages,
                 "raw": [[s.raw for s in steps] for steps in transcript.turns]},
            ))  # fmt: skip
    return TaskResult(
        "demo-generalization",
        metrics,
        predictions,
        groups,
        {"seed": settings.seed, "generated": len(sets["generated"]), "handwritten": len(sets["handwritten"])},
        time.perf_counter() - started,
    )
