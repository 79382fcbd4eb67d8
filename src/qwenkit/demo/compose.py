"""The "composed" demo data (issue 17): every question is put together from independent parts, so the
model learns intents rather than a lookup table of templates.

A question is an opening, an optional politeness lead, one of several cores of its intent (direct
questions, and embedded ones after "could you tell me" / "你知道"), a closing, and noise: casing,
a letter dropped or swapped, punctuation missing or doubled, English and Chinese mixed in names
("What is the capital of 法国?"). Numbers are digits or words (num2words, cn2an). Conversations:

- identity, small talk (greetings, thanks, goodbyes and the SMALL_TALK table), knowledge (the
  capitals and facts of qwenkit.demo.data), refusals of what the model cannot know ("Sorry, I don't
  know that." in the question's language, never an unrelated fact);
- the calculator: offered and needed (any phrasing: "use the calculator", words or digits, x and ×),
  offered and not needed (a direct Final Answer; next to other tools it must leave alone), needed
  but not offered (small sums answered directly, larger ones: it says it needs its calculator);
- 2-3 turns where the topic and language change (each answer follows the last question) or the last
  question refers back ("And Japan?" after a capital).

The pretraining corpus adds to the tables' prose: the facts in several sentence forms, question and
answer pairs, short dialogues, and arithmetic with numbers in words.

Held-out prompts come from another seed with a few openings only they use, minus training prompts.
The tables-only generator of qwenkit.demo.data stays: it rebuilds the shipped model (`--data tables`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator

from qwenkit.agent.react import calculate, calculator
from qwenkit.data.synthetic import arithmetic, chinese_story, english_story
from qwenkit.demo.data import (  # the same system-prompt draw and turn as the tables data
    CAPITALS,
    DEMO_NAME,
    FACTS,
    IDENTITY_EN,
    IDENTITY_QUESTIONS_EN,
    IDENTITY_QUESTIONS_ZH,
    IDENTITY_ZH,
    OPERATIONS,
    SEARCH_TOOL,
    SMALL_TALK,
    Draw,
    Example,
    Generator,
    _system,
    _turn,
    generate_examples,
    is_chinese,
    knowledge_sentences,
    pretraining_documents,
    react_thought,
)

REFUSAL_EN = "Sorry, I don't know that. I am a small model and only know a few simple facts."
REFUSAL_ZH = "抱歉，我不知道。我是一个小模型，只知道一些简单的常识。"
NO_CALCULATOR_EN = "I can't work that out reliably without my calculator tool. Please enable the calculator."
NO_CALCULATOR_ZH = "没有计算器工具，我没法准确算出这个结果。请开启计算器工具。"

OPENINGS_EN = ["", "", "", "Hi, ", "Hello! ", "Hey, ", "Excuse me, ", "Quick question: ", "Ok, ", "Um, ",
               "Sorry to bother you, ", "One more thing: ", "I wonder, ", "Hi there. ", "Question: "]  # fmt: skip
OPENINGS_ZH = ["", "", "", "你好，", "您好，", "嗨，", "请问", "问一下，", "打扰一下，", "嗯，", "对了，", "我想问问，",
               "那个，", "有个问题：", "喂，"]  # fmt: skip
HELD_OUT_OPENINGS_EN, HELD_OUT_OPENINGS_ZH = ["Pardon me, ", "Just curious: "], ["劳驾，", "好奇问下，"]
ASK_EN = [
    "Could you tell me ",
    "Do you know ",
    "I'd like to know ",
    "Tell me ",
    "Please tell me ",
    "Can you tell me ",
]
ASK_ZH = ["你知道", "告诉我", "请告诉我", "我想知道", "能不能告诉我", "你能说说"]
CLOSINGS_EN = ["", "", "", " Thanks!", " Thank you.", " Please.", " Thanks in advance."]
CLOSINGS_ZH = ["", "", "", "谢谢！", "谢谢。", "麻烦了。", "多谢。"]

WHO_EN = ["who are you?", "what is your name?", "what are you?", "what can you do?", "introduce yourself.",
          "tell me about yourself.", "what should I call you?", "are you a bot?", "who created you?",
          "what kind of assistant are you?", "describe yourself.", "what model am I talking to?",
          "what are you able to do?", "your name?", "who is this?", "say something about yourself.",
          "what do you do?", "are you a person or a program?"]  # fmt: skip
WHO_ZH = ["你是谁？", "你叫什么？", "你是什么？", "你能干什么？", "介绍一下自己。", "说说你自己。", "怎么称呼你？",
          "你是机器人吗？", "谁创造了你？", "你是什么助手？", "描述一下你自己。", "我在和什么模型说话？", "你有什么本事？",
          "你的名字？", "这是谁？", "讲讲你是什么。", "你是做什么的？", "你是人还是程序？"]  # fmt: skip
WHO_EMBEDDED_EN = ["who you are", "what your name is", "what you can do", "a little about yourself"]
WHO_EMBEDDED_ZH = ["你是谁", "你叫什么名字", "你会做什么", "你是什么模型"]

HELLOS_EN = ["hello", "hi", "hey", "good morning", "good afternoon", "good evening", "hi there", "hello there",
             "hey hey", "greetings"]  # fmt: skip
HELLO_TAILS_EN = [
    "",
    "!",
    ". How are you?",
    "! How are you doing?",
    ", nice to meet you!",
    "! How's everything?",
]
HELLO_REPLIES_EN = {
    "good morning": "Good morning!",
    "good afternoon": "Good afternoon!",
    "good evening": "Good evening!",
}
HELLOS_ZH = ["你好", "您好", "嗨", "早上好", "下午好", "晚上好", "哈喽", "早啊", "大家好"]
HELLO_TAILS_ZH = ["", "！", "，最近好吗？", "，很高兴认识你！", "，你今天怎么样？"]
HELLO_REPLIES_ZH = {"早上好": "早上好！", "早啊": "早上好！", "下午好": "下午好！", "晚上好": "晚上好！"}
THANKS_EN = [
    "thanks",
    "thank you",
    "thanks a lot",
    "many thanks",
    "thank you so much",
    "thx",
    "great, thanks",
]
THANKS_ZH = ["谢谢", "多谢", "谢谢你", "太感谢了", "谢啦", "好的，谢谢"]
BYES_EN = ["bye", "goodbye", "see you", "see you later", "talk to you later", "good night", "bye for now"]
BYES_ZH = ["再见", "拜拜", "回头见", "晚安", "下次聊", "先走了，再见"]

CAPITAL_CORES_EN = ["what is the capital of {c}?", "which city is {c}'s capital?", "{c}'s capital?",
                    "what's the capital city of {c}?", "the capital of {c} is what?", "capital of {c}?",
                    "where is the capital of {c}?", "name the capital of {c}."]  # fmt: skip
CAPITAL_EMBEDDED_EN = ["what the capital of {c} is", "which city is the capital of {c}", "the capital of {c}"]
CAPITAL_CORES_ZH = ["{c}的首都是哪里？", "{c}首都是哪个城市？", "{c}的首都叫什么？", "哪座城市是{c}的首都？",
                    "{c}的首都在哪？", "{c}首都？", "{c}的首都是？"]  # fmt: skip
CAPITAL_EMBEDDED_ZH = ["{c}的首都是哪里", "{c}的首都", "哪座城市是{c}的首都"]
FOLLOW_UP_EN, FOLLOW_UP_ZH = ["And {c}?", "What about {c}?", "And the capital of {c}?", "How about {c}?"], [
    "那{c}呢？", "{c}呢？", "那{c}的首都呢？", "再问{c}的。"]  # fmt: skip

# Things outside the model's world: it must say it does not know them.
UNKNOWN_COUNTRIES = [("Finland", "芬兰"), ("Denmark", "丹麦"), ("Ireland", "爱尔兰"), ("Morocco", "摩洛哥"),
                     ("Colombia", "哥伦比亚"), ("Pakistan", "巴基斯坦"), ("Nigeria", "尼日利亚"), ("Malaysia", "马来西亚"),
                     ("Hungary", "匈牙利"), ("Belgium", "比利时"), ("Switzerland", "瑞士"), ("Cuba", "古巴")]  # fmt: skip
UNKNOWN_CITIES = [("Sydney", "悉尼"), ("Chicago", "芝加哥"), ("Munich", "慕尼黑"), ("Shanghai", "上海"),
                  ("Barcelona", "巴塞罗那"), ("Toronto", "多伦多"), ("Mumbai", "孟买")]  # fmt: skip
UNKNOWN_THINGS = [("the telephone", "电话"), ("the light bulb", "电灯泡"), ("paper", "纸"), ("the bicycle", "自行车"),
                  ("the internet", "互联网")]  # fmt: skip
UNKNOWN_EN = ["who is the president of {country}?", "how many people live in {city}?", "who invented {thing}?",
              "what is the capital of {country}?", "what's the news today?", "what time is it now?",
              "who will win the next election?", "what year was {city} founded?", "how far is {city} from {city2}?",
              "what is my brother's name?", "what is the price of gold today?", "what's the weather in {city} right now?",
              "how old is my neighbour?", "which team won the last football match?", "what is the population of {country}?",
              "who is the richest person in {city}?", "what did I do yesterday?"]  # fmt: skip
UNKNOWN_ZH = ["{country}的总统是谁？", "{city}有多少人？", "{thing}是谁发明的？", "{country}的首都是哪里？", "今天有什么新闻？",
              "现在几点了？", "下次选举谁会赢？", "{city}是哪一年建立的？", "{city}离{city2}有多远？", "我哥哥叫什么名字？",
              "今天金价是多少？", "{city}现在天气怎么样？", "我的邻居多大了？", "上一场足球赛哪个队赢了？", "{country}有多少人口？",
              "{city}最有钱的人是谁？", "我昨天做了什么？"]  # fmt: skip

OPERATORS_EN = {"+": ["plus", "+", "added to", "and"], "-": ["minus", "-", "less"],
                "*": ["times", "*", "x", "×", "multiplied by"], "/": ["divided by", "/", "÷"]}  # fmt: skip
OPERATORS_ZH = {
    "+": ["加", "+", "加上", "和"],
    "-": ["减", "-", "减去"],
    "*": ["乘以", "乘", "×", "*"],
    "/": ["除以", "÷", "/"],
}
CALC_CORES_EN = ["what is {e}?", "calculate {e}.", "how much is {e}?", "compute {e}.", "work out {e}.", "{e} = ?",
                 "{e}?", "what's {e}", "can you calculate {e}?", "I need the result of {e}.", "solve {e}.",
                 "what do you get for {e}?"]  # fmt: skip
CALC_CORES_ZH = ["{e}等于多少？", "计算{e}。", "{e}是多少？", "算一下{e}。", "{e}=？", "{e}等于几？", "帮我算{e}。",
                 "{e}的结果是多少？", "求{e}。", "{e}得多少？"]  # fmt: skip
# Requests phrased around the operation itself, with the operands in their place ("multiply 58 by 19",
# "subtract 12 from 40", word problems): the expression to call the calculator with is still "a op b".
VERB_CORES_EN = {
    "+": ["add {a} and {b}.", "what is the sum of {a} and {b}?", "add {b} to {a}.", "what do {a} and {b} make together?",
          "I have {a} coins and find {b} more. How many coins do I have now?", "{a} people came in the morning and {b} in the afternoon, how many in all?"],
    "-": ["subtract {b} from {a}.", "take {b} away from {a}.", "what is {a} take away {b}?", "what is left if you take {b} from {a}?",
          "there were {a} birds on a tree and {b} flew away. How many are still there?", "I had {a} dollars and spent {b}. How much is left?"],
    "*": ["multiply {a} by {b}.", "what is the product of {a} and {b}?", "what is {a} multiplied by {b}?",
          "{a} boxes with {b} pens in each: how many pens is that?", "what is {b} lots of {a}?", "a ticket costs {a} yuan. How much do {b} tickets cost?"],
    "/": ["divide {a} by {b}.", "how many times does {b} go into {a}?", "what is {a} split into {b} equal parts?",
          "share {a} sweets equally among {b} kids: how many does each get?", "what do you get when you divide {a} by {b}?"],
}  # fmt: skip
VERB_CORES_ZH = {
    "+": ["把{a}和{b}加起来。", "{a}与{b}的和是多少？", "{a}再加上{b}是多少？", "我有{a}块钱，又挣了{b}块，现在有多少？",
          "上午来了{a}个人，下午来了{b}个人，一共来了多少人？"],
    "-": ["从{a}里减去{b}。", "{a}和{b}的差是多少？", "{a}去掉{b}还剩多少？", "树上有{a}只鸟，飞走了{b}只，还剩几只？",
          "我有{a}元，花了{b}元，还剩多少钱？"],
    "*": ["{a}和{b}的乘积是多少？", "{a}的{b}倍是多少？", "每盒{b}支笔，{a}盒一共多少支？", "一张票{a}元，买{b}张要多少钱？"],
    "/": ["{a}除以{b}得多少？", "把{a}平均分成{b}份，每份是多少？", "{a}颗糖平均分给{b}个小朋友，每人几颗？", "{a}里面有几个{b}？"],
}  # fmt: skip
TOOL_ASKS_EN = ["", "", "", " Use the calculator.", " Please use your calculator tool.", " Use a tool if you need one.",
                " You can use the calculator."]  # fmt: skip
TOOL_ASKS_ZH = ["", "", "", "用计算器算。", "请用计算器工具。", "需要的话可以用工具。", "用一下计算器吧。"]
# Tools offered next to the calculator that no question here needs.
DECOY_TOOLS = [SEARCH_TOOL] + [
    {"type": "function", "function": {"name": name, "description": description,
     "parameters": {"type": "object", "properties": {key: {"type": "string"}}, "required": [key]}}}
    for name, description, key in [("get_time", "Get the current time in a time zone.", "timezone"),
                                   ("send_email", "Send an email to an address.", "to"),
                                   ("lookup_word", "Look up a word in the dictionary.", "word")]
]  # fmt: skip


# --- composing a question ---------------------------------------------------------------------------


def _typo(rng: random.Random, text: str) -> str:
    """A letter dropped or two letters swapped in one longer word."""
    words = text.split(" ")
    candidates = [k for k, w in enumerate(words) if len(w) > 4 and w.isalpha()]
    if not candidates:
        return text
    k = rng.choice(candidates)
    word, c = words[k], rng.randrange(1, len(words[k]) - 2)
    words[k] = (
        word[:c] + word[c + 1 :] if rng.random() < 0.5 else word[:c] + word[c + 1] + word[c] + word[c + 2 :]
    )
    return " ".join(words)


def english(d: Draw, core: str, embedded: str | None = None) -> str:
    """An English question around `core` (or "Could you tell me {embedded}?"): opening, politeness,
    closing, then casing, a typo and punctuation noise."""
    rng = d.rng
    if embedded is not None and rng.random() < 0.3:
        body = rng.choice(ASK_EN) + embedded + rng.choice(["?", "?", "."])
    else:
        body = core[0].upper() + core[1:]
        if rng.random() < 0.15 and body.endswith(("?", ".")):
            body = "Please, " + body[0].lower() + body[1:] if body.endswith(".") else body
    openings = HELD_OUT_OPENINGS_EN if d.held_out and rng.random() < 0.5 else OPENINGS_EN
    opening = rng.choice(openings)
    text = (
        opening + (body[0].lower() + body[1:] if opening.endswith(", ") else body) + rng.choice(CLOSINGS_EN)
    )
    roll = rng.random()
    if roll < 0.2:
        text = text.lower()
    if rng.random() < 0.12:
        text = _typo(rng, text)
    roll = rng.random()
    if roll < 0.15:
        text = text.rstrip("?.!")
    elif roll < 0.22 and text.endswith("?"):
        text += "??"
    return text


def chinese(d: Draw, core: str, embedded: str | None = None) -> str:
    """A Chinese question around `core` (or "你知道{embedded}吗？"), with opening, closing and punctuation noise."""
    rng = d.rng
    if embedded is not None and rng.random() < 0.3:
        lead = rng.choice(ASK_ZH)
        body = (
            lead + embedded + ("吗？" if lead in ("你知道", "能不能告诉我") else rng.choice(["。", "？", ""]))
        )
    else:
        body = core
    openings = HELD_OUT_OPENINGS_ZH if d.held_out and rng.random() < 0.5 else OPENINGS_ZH
    text = rng.choice(openings) + body + rng.choice(CLOSINGS_ZH)
    roll = rng.random()
    if roll < 0.15:
        text = text.rstrip("？。！")
    elif roll < 0.25:
        text = text.replace("？", "?").replace("，", ",")
    return text


def number_text(rng: random.Random, n: int, zh: bool) -> str:
    """`n` as digits, or (a quarter of the time) in words: "forty-two", "四十二"."""
    if rng.random() < 0.25:
        import cn2an
        from num2words import num2words

        return cn2an.an2cn(n) if zh else num2words(n)
    return str(n)


# --- conversations ------------------------------------------------------------------------------------


def identity(d: Draw, zh: bool) -> Example:
    rng = d.rng
    if zh:
        core = rng.choice(WHO_ZH + IDENTITY_QUESTIONS_ZH)
        question = chinese(d, core, rng.choice(WHO_EMBEDDED_ZH))
    else:
        core = rng.choice(WHO_EN + [q[0].lower() + q[1:] for q in IDENTITY_QUESTIONS_EN])
        question = english(d, core, rng.choice(WHO_EMBEDDED_EN))
    return Example("identity", zh, _turn(question, IDENTITY_ZH if zh else IDENTITY_EN), expected=DEMO_NAME)


def small_talk(d: Draw, zh: bool) -> Example:
    rng, roll = d.rng, d.rng.random()
    if roll < 0.35:  # a greeting, answered with one
        if zh:
            hello = rng.choice(HELLOS_ZH)
            question = chinese(d, hello + rng.choice(HELLO_TAILS_ZH))
            answer = HELLO_REPLIES_ZH.get(hello, "你好！") + "有什么可以帮你的吗？"
        else:
            hello = rng.choice(HELLOS_EN)
            question = english(d, hello + rng.choice(HELLO_TAILS_EN))
            answer = HELLO_REPLIES_EN.get(hello, "Hello!") + " How can I help you today?"
    elif roll < 0.5:
        question = chinese(d, rng.choice(THANKS_ZH) + "！") if zh else english(d, rng.choice(THANKS_EN) + "!")
        answer = "不客气！很高兴能帮到你。" if zh else "You are welcome! I am glad I could help."
    elif roll < 0.6:
        question = chinese(d, rng.choice(BYES_ZH) + "！") if zh else english(d, rng.choice(BYES_EN) + "!")
        answer = "再见！祝你今天愉快。" if zh else "Goodbye! Have a great day."
    else:
        en_q, en_a, zh_q, zh_a = rng.choice(SMALL_TALK)
        question, answer = (chinese(d, zh_q), zh_a) if zh else (english(d, en_q[0].lower() + en_q[1:]), en_a)
    return Example("chat", zh, _turn(question, answer))


def capital_question(d: Draw, zh: bool, country: tuple[str, str, str, str]) -> tuple[str, str, str]:
    """(question, answer, key) about one capital; a fifth of the English questions name the country in Chinese."""
    rng = d.rng
    name, capital, name_zh, capital_zh = country
    if zh:
        question = chinese(d, rng.choice(CAPITAL_CORES_ZH).format(c=name_zh),
                           rng.choice(CAPITAL_EMBEDDED_ZH).format(c=name_zh))  # fmt: skip
        return question, f"{name_zh}的首都是{capital_zh}。", capital_zh
    mention = name_zh if rng.random() < 0.2 else name
    question = english(d, rng.choice(CAPITAL_CORES_EN).format(c=mention),
                       rng.choice(CAPITAL_EMBEDDED_EN).format(c=mention))  # fmt: skip
    return question, f"The capital of {name} is {capital}.", capital


def knowledge(d: Draw, zh: bool) -> Example:
    rng = d.rng
    if rng.random() < 0.5:
        question, answer, key = capital_question(d, zh, rng.choice(CAPITALS))
    else:
        en_q, en_key, en_a, zh_q, zh_key, zh_a = rng.choice(FACTS)
        if zh:
            question, answer, key = chinese(d, zh_q, zh_q.rstrip("？")), zh_a, zh_key
        else:
            question, answer, key = english(d, en_q[0].lower() + en_q[1:]), en_a, en_key
    return Example("knowledge", zh, _turn(question, answer), expected=key)


def refusal(d: Draw, zh: bool) -> Example:
    """A question outside the model's world, answered with "I don't know" in its language."""
    rng = d.rng
    (country, country_zh), (city, city_zh), (city2, city2_zh) = (
        rng.choice(UNKNOWN_COUNTRIES),
        *rng.sample(UNKNOWN_CITIES, 2),
    )
    thing, thing_zh = rng.choice(UNKNOWN_THINGS)
    if zh:
        core = rng.choice(UNKNOWN_ZH).format(country=country_zh, city=city_zh, city2=city2_zh, thing=thing_zh)
        return Example("refusal", zh, _turn(chinese(d, core), REFUSAL_ZH), expected="不知道")
    core = rng.choice(UNKNOWN_EN).format(country=country, city=city, city2=city2, thing=thing)
    return Example("refusal", zh, _turn(english(d, core), REFUSAL_EN), expected="don't know")


def arithmetic_request(d: Draw, zh: bool, small: bool = False) -> tuple[str, str, str]:
    """(question, expression in digits, result): operands up to 3 digits (a product's multiplier up to 2),
    divisions that come out even; `small`: sums and differences of numbers up to 20."""
    rng = d.rng
    if small:
        symbol, a, b = rng.choice("+-"), rng.randint(0, 20), rng.randint(0, 20)
    else:
        symbol = rng.choice("+-*/")
        a = rng.randint(1, 10 ** rng.choice([1, 2, 2, 3, 3]) - 1)
        b = rng.randint(1, 10 ** rng.choice([1, 2, 3] if symbol in "+-" else [1, 2]) - 1)
        if symbol == "/":
            a = rng.randint(1, 10 ** rng.choice([1, 2]) - 1) * b
    expression = f"{a} {symbol} {b}"
    if not small and rng.random() < 0.4:  # the operation said in words around its operands
        cores = (VERB_CORES_ZH if zh else VERB_CORES_EN)[symbol]
        core = rng.choice(cores).format(a=number_text(rng, a, zh), b=number_text(rng, b, zh))
        asks = TOOL_ASKS_ZH if zh else TOOL_ASKS_EN
        question = (chinese if zh else english)(d, core + rng.choice(asks))
        return question, expression, calculate(expression)
    if zh:
        op = rng.choice(OPERATORS_ZH[symbol])
        said = number_text(rng, a, True) + op + number_text(rng, b, True)
        question = chinese(d, rng.choice(CALC_CORES_ZH).format(e=said) + rng.choice(TOOL_ASKS_ZH))
    else:
        said = f"{number_text(rng, a, False)} {rng.choice(OPERATORS_EN[symbol])} {number_text(rng, b, False)}"
        question = english(d, rng.choice(CALC_CORES_EN).format(e=said) + rng.choice(TOOL_ASKS_EN))
    return question, expression, calculate(expression)


def _tools(d: Draw) -> list[dict]:
    tools = [calculator.spec()] + d.rng.sample(DECOY_TOOLS, d.rng.choice([0, 0, 1, 2]))
    d.rng.shuffle(tools)
    return tools


def react(d: Draw, zh: bool) -> Example:
    """Calculator offered and needed: Thought, Action, the Observation, the Final Answer."""
    question, expression, result = arithmetic_request(d, zh)
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}  # fmt: skip
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": react_thought(expression), "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": result},
        {"role": "assistant", "content": f"答案是{result}。" if zh else f"The answer is {result}."},
    ]
    return Example("react", zh, messages, _tools(d), expected=result, expression=expression)


def no_calculator(d: Draw, zh: bool) -> Example:
    """A calculation with no calculator offered: small sums answered directly, larger ones declined."""
    small = d.rng.random() < 0.5
    question, expression, result = arithmetic_request(d, zh, small=small)
    if small:
        a, symbol, b = expression.split()
        answer = f"{a}{OPERATIONS[symbol][1]}{b}等于{result}。" if zh else f"{expression} = {result}."
        return Example("direct_math", zh, _turn(question, answer), expected=result)
    return Example("no_tool", zh, _turn(question, NO_CALCULATOR_ZH if zh else NO_CALCULATOR_EN))


PLAIN: list[tuple[Callable[[Draw, bool], Example], float]] = [
    (identity, 0.2), (small_talk, 0.25), (knowledge, 0.35), (refusal, 0.2),
]  # fmt: skip


def tools_unused(d: Draw, zh: bool) -> Example:
    """Tools offered, the question needs none: a direct answer ("Final Answer:")."""
    makers, weights = zip(*PLAIN, strict=True)
    example = d.rng.choices(makers, weights)[0](d, zh)
    example.tools = _tools(d)
    return example


def conversation(d: Draw, zh: bool) -> Example:
    """2-3 turns: each answer follows its own question; topics and (half the time) languages change,
    or the last question refers back to a capital asked before."""
    rng = d.rng
    makers, weights = zip(*PLAIN, strict=True)
    turns = rng.choice([2, 3])
    languages = [zh]
    for _ in range(turns - 1):
        languages.append(languages[-1] if rng.random() < 0.5 else not languages[-1])
    examples = [rng.choices(makers, weights)[0](d, z) for z in languages[:-1]]
    if rng.random() < 0.25:  # a follow-up that needs the earlier turn: "And Japan?"
        first, second = rng.sample(CAPITALS, 2)
        question, answer, key = capital_question(d, languages[0], first)
        examples = [Example("knowledge", languages[0], _turn(question, answer), expected=key)]
        name, capital, name_zh, capital_zh = second
        last_zh = languages[-1]
        if last_zh:
            follow = _turn(rng.choice(FOLLOW_UP_ZH).format(c=name_zh), f"{name_zh}的首都是{capital_zh}。")
        else:
            follow = _turn(rng.choice(FOLLOW_UP_EN).format(c=name), f"The capital of {name} is {capital}.")
        last = Example("knowledge", last_zh, follow, expected=capital_zh if last_zh else capital)
    else:
        last = rng.choices(makers, weights)[0](d, languages[-1])
    last.messages = [m for e in examples for m in e.messages] + last.messages
    return last


MAKERS: list[tuple[Callable[[Draw, bool], Example], float]] = [
    (identity, 0.07), (small_talk, 0.1), (knowledge, 0.15), (refusal, 0.08), (react, 0.3),
    (tools_unused, 0.1), (no_calculator, 0.07), (conversation, 0.13),
]  # fmt: skip


def compose_examples(count: int, seed: int, held_out: bool = False) -> list[Example]:
    """`count` composed conversations from `seed` (`held_out`: with the held-out openings and systems)."""
    d = Draw(random.Random(seed), held_out)
    makers, weights = zip(*MAKERS, strict=True)
    examples = []
    for _ in range(count):
        system = _system(d)
        example = d.rng.choices(makers, weights)[0](d, d.rng.random() < 0.5)
        example.messages = system + example.messages
        examples.append(example)
    return examples


# --- pretraining text ---------------------------------------------------------------------------------


def fact_prose(rng: random.Random, zh: bool) -> str:
    """The tables' knowledge in several sentence forms."""
    sentences = [s for s in knowledge_sentences(rng) if is_chinese(s) == zh]
    name, capital, name_zh, capital_zh = rng.choice(CAPITALS)
    if zh:
        sentences += [
            f"如果你去{name_zh}，可以看看它的首都{capital_zh}。",
            f"{capital_zh}是一座城市，它是{name_zh}的首都。",
        ]
    else:
        sentences += [f"If you visit {name}, you can see its capital, {capital}.",
                      f"{capital} is a city. It is the capital of {name}."]  # fmt: skip
    return ("" if zh else " ").join(rng.sample(sentences, rng.randint(3, 8)))


def question_answer_text(rng: random.Random) -> str:
    """Questions and answers as plain text: "Q: ... A: ..." or "问：……答：……"."""
    d = Draw(rng)
    lines = []
    zh = rng.random() < 0.5
    for _ in range(rng.randint(2, 5)):
        maker = rng.choice([identity, knowledge, knowledge, refusal, small_talk])
        example = maker(d, zh)
        question, answer = example.messages[-2]["content"], example.messages[-1]["content"]
        lines.append(f"问：{question}\n答：{answer}" if zh else f"Q: {question}\nA: {answer}")
    return "\n\n".join(lines)


def dialogue_text(rng: random.Random) -> str:
    """A short dialogue between two people from the stories' names, about the tables' facts."""
    d = Draw(rng)
    zh = rng.random() < 0.5
    a, b = rng.sample(["小明", "小红", "小刚", "小丽"] if zh else ["Alice", "Bob", "Carol", "David"], 2)
    lines = []
    for _ in range(rng.randint(1, 3)):
        example = rng.choice([knowledge, small_talk, refusal])(d, zh)
        sep = "：" if zh else ": "
        lines += [f"{a}{sep}{example.messages[-2]['content']}", f"{b}{sep}{example.messages[-1]['content']}"]
    return "\n".join(lines)


def worded_arithmetic(rng: random.Random) -> str:
    """Arithmetic with numbers in words and digits: "twelve times 7 is 84." / "十二乘以7等于84。"."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        zh = rng.random() < 0.5
        symbol = rng.choice("+-*")
        a, b = rng.randint(1, 99), rng.randint(1, 12 if symbol == "*" else 99)
        result = calculate(f"{a} {symbol} {b}")
        if zh:
            lines.append(
                f"{number_text(rng, a, True)}{OPERATIONS[symbol][1]}{number_text(rng, b, True)}等于{result}。"
            )
        else:
            word = OPERATIONS[symbol][0][0]
            lines.append(f"{number_text(rng, a, False)} {word} {number_text(rng, b, False)} is {result}.")
    return "\n".join(lines)


def composed_documents(count: int, seed: int) -> Iterator[str]:
    """The pretraining corpus of the composed data: prose of the facts, questions and answers, dialogues,
    stories and arithmetic (digits and words)."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            yield fact_prose(rng, rng.random() < 0.5)
        elif kind < 0.45:
            yield question_answer_text(rng)
        elif kind < 0.55:
            yield dialogue_text(rng)
        elif kind < 0.8:
            yield " ".join(rng.choice([english_story, chinese_story])(rng) for _ in range(rng.randint(1, 3)))
        elif kind < 0.9:
            yield arithmetic(rng)
        else:
            yield worded_arithmetic(rng)


# The build's data sets: name -> (SFT conversations, pretraining documents). "tables" built the
# shipped model (docs/demo-model.md); "composed" is issue 17's.
DATASETS: dict[str, tuple[Generator, Callable[[int, int], Iterator[str]]]] = {
    "tables": (generate_examples, pretraining_documents),
    "composed": (compose_examples, composed_documents),
}
