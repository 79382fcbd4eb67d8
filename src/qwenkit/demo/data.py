"""The demo model's data: the tables it learns from and the generators of its conversations and corpus.

All text is generated here from the small tables below (written for this project), so the model has
no outside data and no license beyond the project's own. It learns: who it is, chatting in the
language of the question (English or Chinese), simple facts from the tables, and the official ReAct
format (QWEN_REFERENCE "Tools and agents") with a calculator for arithmetic. Held-out prompts come
from a different seed, and any prompt that also occurs in the training set is dropped.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qwenkit.agent.react import calculate, calculator
from qwenkit.chatml import DEFAULT_SYSTEM
from qwenkit.data.synthetic import arithmetic, chinese_story, english_story

SFT_EXAMPLES = 60_000  # conversations a default build trains on (held-out measurement excludes their prompts)
DEMO_NAME = "Qwen Demo"

IDENTITY_EN = (
    f"I am {DEMO_NAME}, a small chat model trained from scratch with qwenkit. I can chat in English "
    "and Chinese, answer simple questions and use a calculator tool."
)
IDENTITY_ZH = f"我是{DEMO_NAME}，一个用 qwenkit 从零训练的小型聊天模型。我会用中文和英文聊天，回答简单的问题，还会使用计算器工具。"
IDENTITY_QUESTIONS_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
                         "What are you?", "Who made you?", "Hi! Who am I talking to?", "What can you do?",
                         "What should I call you?", "Are you a robot?", "Tell me your name.", "Who built you?",
                         "What kind of model are you?", "Please introduce yourself."]  # fmt: skip
IDENTITY_QUESTIONS_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "请做个自我介绍。", "你是什么？",
                         "谁训练了你？", "你好，我在和谁说话？", "你能做什么？", "我该怎么称呼你？", "你是机器人吗？",
                         "告诉我你的名字。", "你是谁做的？", "你是什么模型？", "请介绍一下你自己。"]  # fmt: skip

# Phrasings and system prompts only the held-out prompts use: measured abilities are on words the
# model never saw in these places.
HELD_OUT_IDENTITY_EN = ["Could you tell me who you are?", "May I ask your name?"]
HELD_OUT_IDENTITY_ZH = ["请问你是谁？", "能告诉我你的名字吗？"]
HELD_OUT_CAPITAL_EN = ["Name the capital of {c}.", "Which city is {c}'s capital?"]
HELD_OUT_CAPITAL_ZH = ["{c}的首都叫什么？", "说说{c}的首都是哪座城市。"]
FACT_WRAPPERS_EN, FACT_WRAPPERS_ZH = (
    ["{q}", "{q}", "Question: {q}", "I want to know: {q}"],
    ["{q}", "{q}", "问一下：{q}", "我想知道：{q}"],
)
HELD_OUT_FACT_WRAPPERS_EN, HELD_OUT_FACT_WRAPPERS_ZH = ["Quick question: {q}"], ["请回答：{q}"]
SYSTEMS = ["You are a friendly assistant.", "你是一个乐于助人的助手。"]
HELD_OUT_SYSTEMS = ["You are a concise assistant.", "你是一个友好的聊天机器人。"]

# (English question, English answer, Chinese question, Chinese answer)
SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?", "你好！", "你好！有什么可以帮你的吗？"),
    ("Hi there.", "Hi! What would you like to talk about?", "嗨。", "嗨！你想聊点什么？"),
    ("Good morning!", "Good morning! I hope you have a nice day.", "早上好！", "早上好！祝你有美好的一天。"),
    ("How are you?", "I am doing well, thank you. How about you?", "你好吗？", "我很好，谢谢。你呢？"),
    ("Thank you!", "You are welcome!", "谢谢你！", "不客气！"),
    ("Thanks for your help.", "I am glad I could help.", "谢谢你的帮助。", "很高兴能帮到你。"),
    ("Goodbye!", "Goodbye! Have a great day.", "再见！", "再见！祝你今天愉快。"),
    ("See you later.", "See you later!", "回头见。", "回头见！"),
    ("I am happy today.", "That is great to hear!", "我今天很开心。", "听到这个真好！"),
    ("I am tired.", "You should take a rest.", "我累了。", "你应该休息一下。"),
    ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse!",
     "讲个笑话吧。", "为什么猫喜欢坐在电脑上？因为它想看住鼠标！"),
    ("Can you help me?", "Of course. What do you need?", "你能帮我吗？", "当然可以。你需要什么？"),
    ("Do you speak Chinese?", "Yes, I can chat in Chinese and English.", "你会说英文吗？", "会的，我可以用中文和英文聊天。"),
    ("What should I eat for lunch?", "How about some noodles and vegetables?", "午饭吃什么好？", "吃点面条和蔬菜怎么样？"),
    ("I like reading books.", "Reading is a wonderful hobby.", "我喜欢看书。", "看书是很好的爱好。"),
    ("It is raining today.", "Remember to take an umbrella.", "今天下雨了。", "记得带伞。"),
]  # fmt: skip

# (country, capital) in English and Chinese
CAPITALS = [
    ("China", "Beijing", "中国", "北京"), ("Japan", "Tokyo", "日本", "东京"), ("France", "Paris", "法国", "巴黎"),
    ("Germany", "Berlin", "德国", "柏林"), ("Italy", "Rome", "意大利", "罗马"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Egypt", "Cairo", "埃及", "开罗"), ("India", "New Delhi", "印度", "新德里"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚"), ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("the United Kingdom", "London", "英国", "伦敦"), ("the United States", "Washington", "美国", "华盛顿"),
    ("South Korea", "Seoul", "韩国", "首尔"), ("Thailand", "Bangkok", "泰国", "曼谷"), ("Greece", "Athens", "希腊", "雅典"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"), ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Norway", "Oslo", "挪威", "奥斯陆"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Peru", "Lima", "秘鲁", "利马"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"), ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Vietnam", "Hanoi", "越南", "河内"), ("Poland", "Warsaw", "波兰", "华沙"), ("Austria", "Vienna", "奥地利", "维也纳"),
]  # fmt: skip
CAPITAL_QUESTIONS_EN = ["What is the capital of {c}?", "Which city is the capital of {c}?",
                        "Tell me the capital of {c}.", "Do you know the capital of {c}?", "What's the capital city of {c}?"]  # fmt: skip
CAPITAL_QUESTIONS_ZH = ["{c}的首都是哪里？", "{c}的首都是什么？", "请问{c}的首都是哪个城市？", "你知道{c}的首都吗？",
                        "告诉我{c}的首都。"]  # fmt: skip

# (English question, key fact, English answer, Chinese question, key fact, Chinese answer)
FACTS = [
    ("How many days are in a week?", "seven", "There are seven days in a week.", "一周有几天？", "七", "一周有七天。"),
    ("How many months are in a year?", "twelve", "There are twelve months in a year.", "一年有几个月？", "十二", "一年有十二个月。"),
    ("How many legs does a spider have?", "eight", "A spider has eight legs.", "蜘蛛有几条腿？", "八", "蜘蛛有八条腿。"),
    ("How many legs does a dog have?", "four", "A dog has four legs.", "狗有几条腿？", "四", "狗有四条腿。"),
    ("What color is the sky on a clear day?", "blue", "The sky is blue on a clear day.", "晴天的天空是什么颜色？", "蓝", "晴天的天空是蓝色的。"),
    ("What color is grass?", "green", "Grass is green.", "草是什么颜色的？", "绿", "草是绿色的。"),
    ("What is the largest planet in the solar system?", "Jupiter", "Jupiter is the largest planet in the solar system.",
     "太阳系最大的行星是哪个？", "木星", "太阳系最大的行星是木星。"),
    ("Which planet is closest to the sun?", "Mercury", "Mercury is the planet closest to the sun.",
     "离太阳最近的行星是哪个？", "水星", "离太阳最近的行星是水星。"),
    ("What is the largest ocean?", "Pacific", "The Pacific Ocean is the largest ocean.", "最大的海洋是哪个？", "太平洋", "最大的海洋是太平洋。"),
    ("What is the highest mountain in the world?", "Everest", "Mount Everest is the highest mountain in the world.",
     "世界上最高的山是哪座？", "珠穆朗玛峰", "世界上最高的山是珠穆朗玛峰。"),
    ("What is the longest river in China?", "Yangtze", "The Yangtze is the longest river in China.",
     "中国最长的河流是哪条？", "长江", "中国最长的河流是长江。"),
    ("At what temperature does water boil?", "100", "Water boils at 100 degrees Celsius at sea level.",
     "水在多少度沸腾？", "100", "在海平面上，水在100摄氏度沸腾。"),
    ("At what temperature does water freeze?", "0", "Water freezes at 0 degrees Celsius.", "水在多少度结冰？", "0", "水在0摄氏度结冰。"),
    ("What do bees make?", "honey", "Bees make honey.", "蜜蜂会酿造什么？", "蜂蜜", "蜜蜂会酿造蜂蜜。"),
    ("What animal is known as the king of the jungle?", "lion", "The lion is known as the king of the jungle.",
     "哪种动物被称为百兽之王？", "狮子", "狮子被称为百兽之王。"),
    ("What gas do plants take in from the air?", "carbon dioxide", "Plants take in carbon dioxide from the air.",
     "植物从空气中吸收什么气体？", "二氧化碳", "植物从空气中吸收二氧化碳。"),
    ("What gas do people need to breathe?", "oxygen", "People need oxygen to breathe.", "人呼吸需要什么气体？", "氧气", "人呼吸需要氧气。"),
    ("How many hours are in a day?", "24", "There are 24 hours in a day.", "一天有多少个小时？", "24", "一天有24个小时。"),
    ("How many minutes are in an hour?", "60", "There are 60 minutes in an hour.", "一小时有多少分钟？", "60", "一小时有60分钟。"),
    ("What is the opposite of hot?", "cold", "The opposite of hot is cold.", "热的反义词是什么？", "冷", "热的反义词是冷。"),
    ("What is the opposite of big?", "small", "The opposite of big is small.", "大的反义词是什么？", "小", "大的反义词是小。"),
    ("Where does the sun rise?", "east", "The sun rises in the east.", "太阳从哪边升起？", "东", "太阳从东边升起。"),
    ("What is the fastest land animal?", "cheetah", "The cheetah is the fastest land animal.", "跑得最快的陆地动物是什么？", "猎豹", "跑得最快的陆地动物是猎豹。"),
    ("What is the largest animal?", "blue whale", "The blue whale is the largest animal.", "最大的动物是什么？", "蓝鲸", "最大的动物是蓝鲸。"),
    ("What do pandas eat?", "bamboo", "Pandas mostly eat bamboo.", "熊猫吃什么？", "竹子", "熊猫主要吃竹子。"),
    ("How many continents are there?", "seven", "There are seven continents.", "世界上有几个大洲？", "七", "世界上有七个大洲。"),
    ("What is the color of snow?", "white", "Snow is white.", "雪是什么颜色的？", "白", "雪是白色的。"),
    ("How many sides does a triangle have?", "three", "A triangle has three sides.", "三角形有几条边？", "三", "三角形有三条边。"),
    ("How many sides does a square have?", "four", "A square has four sides.", "正方形有几条边？", "四", "正方形有四条边。"),
    ("What is frozen water called?", "ice", "Frozen water is called ice.", "结冰的水叫什么？", "冰", "结冰的水叫做冰。"),
    ("Who wrote the Tao Te Ching?", "Laozi", "The Tao Te Ching was written by Laozi.", "《道德经》的作者是谁？", "老子", "《道德经》的作者是老子。"),
    ("What language is spoken in Brazil?", "Portuguese", "People in Brazil speak Portuguese.", "巴西人说什么语言？", "葡萄牙语", "巴西人说葡萄牙语。"),
]  # fmt: skip

OPERATIONS = {  # symbol: (English words, Chinese word)
    "+": (["plus", "added to"], "加"),
    "-": (["minus"], "减"),
    "*": (["times", "multiplied by"], "乘以"),
    "/": (["divided by"], "除以"),
}
ARITHMETIC_QUESTIONS_EN = ["What is {a} {w} {b}?", "Calculate {a} {s} {b}.", "How much is {a} {s} {b}?",
                           "Please compute {a} {w} {b}.", "What is {a} {s} {b}?", "Can you work out {a} {w} {b}?"]  # fmt: skip
ARITHMETIC_QUESTIONS_ZH = ["{a}{z}{b}等于多少？", "计算{a}{s}{b}。", "请帮我算一下{a}{z}{b}。", "{a}{s}{b}是多少？",
                           "{a}{z}{b}的结果是多少？"]  # fmt: skip

# A second tool the model sees offered next to the calculator and learns to leave alone for arithmetic.
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the web for recent news and information.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}  # fmt: skip


def is_chinese(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


# ---------------------------------------------------------------------------------------------------
# generated conversations: each maker returns (kind, chinese, messages, tools, expected)


@dataclass
class Example:
    kind: str  # identity | chat | knowledge | react | direct_math (+ composed data: refusal | no_tool)
    chinese: bool
    messages: list[dict]  # ends with the assistant reply to learn (or to predict)
    tools: list[dict] | None = None
    expected: str = ""  # what the answer must contain (knowledge), or the arithmetic result (react)
    expression: str = ""  # react: the expression the question asks for

    @property
    def question(self) -> str:
        return self.messages[-2]["content"] if self.kind != "react" else self.messages[-4]["content"]


@dataclass
class Draw:
    """A random source plus which phrasings to use: training ones, or the held-out ones."""

    rng: random.Random
    held_out: bool = False


def _system(d: Draw) -> list[dict]:
    choice = d.rng.random()
    if choice < 0.6:
        return []
    if choice < 0.8:
        return [{"role": "system", "content": DEFAULT_SYSTEM}]
    return [{"role": "system", "content": d.rng.choice(HELD_OUT_SYSTEMS if d.held_out else SYSTEMS)}]


def _turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def identity_example(d: Draw) -> Example:
    chinese = d.rng.random() < 0.5
    if d.held_out:
        question = d.rng.choice(HELD_OUT_IDENTITY_ZH if chinese else HELD_OUT_IDENTITY_EN)
    else:
        question = d.rng.choice(IDENTITY_QUESTIONS_ZH if chinese else IDENTITY_QUESTIONS_EN)
    answer = IDENTITY_ZH if chinese else IDENTITY_EN
    return Example("identity", chinese, _system(d) + _turn(question, answer), expected=DEMO_NAME)


def small_talk_example(d: Draw) -> Example:
    chinese = d.rng.random() < 0.5
    en_q, en_a, zh_q, zh_a = d.rng.choice(SMALL_TALK)
    question, answer = (zh_q, zh_a) if chinese else (en_q, en_a)
    return Example("chat", chinese, _system(d) + _turn(question, answer))


def knowledge_example(d: Draw) -> Example:
    rng, chinese = d.rng, d.rng.random() < 0.5
    if rng.random() < 0.5:
        country, capital, country_zh, capital_zh = rng.choice(CAPITALS)
        if chinese:
            templates = HELD_OUT_CAPITAL_ZH if d.held_out else CAPITAL_QUESTIONS_ZH
            question = rng.choice(templates).format(c=country_zh)
            answer, key = f"{country_zh}的首都是{capital_zh}。", capital_zh
        else:
            templates = HELD_OUT_CAPITAL_EN if d.held_out else CAPITAL_QUESTIONS_EN
            question = rng.choice(templates).format(c=country)
            answer, key = f"The capital of {country} is {capital}.", capital
    else:
        en_q, en_key, en_a, zh_q, zh_key, zh_a = rng.choice(FACTS)
        if chinese:
            wrapper = rng.choice(HELD_OUT_FACT_WRAPPERS_ZH if d.held_out else FACT_WRAPPERS_ZH)
            question, key, answer = wrapper.format(q=zh_q), zh_key, zh_a
        else:
            wrapper = rng.choice(HELD_OUT_FACT_WRAPPERS_EN if d.held_out else FACT_WRAPPERS_EN)
            question, key, answer = wrapper.format(q=en_q), en_key, en_a
    return Example("knowledge", chinese, _system(d) + _turn(question, answer), expected=key)


def arithmetic_question(rng: random.Random, chinese: bool) -> tuple[str, str, str]:
    """(question, expression, result): two operands of up to 3 digits (a product's multiplier up to 2),
    divisions that come out even."""
    symbol = rng.choice("+-*/")
    a = rng.randint(1, 10 ** rng.choice([1, 2, 2, 3, 3]) - 1)
    b = rng.randint(1, 10 ** rng.choice([1, 2, 3] if symbol in "+-" else [1, 2]) - 1)
    if symbol == "/":
        a = rng.randint(1, 10 ** rng.choice([1, 2]) - 1) * b
    expression = f"{a} {symbol} {b}"
    words, zh = OPERATIONS[symbol]
    if chinese:
        question = rng.choice(ARITHMETIC_QUESTIONS_ZH).format(a=a, b=b, s=f" {symbol} ", z=zh)
    else:
        question = rng.choice(ARITHMETIC_QUESTIONS_EN).format(a=a, b=b, s=symbol, w=rng.choice(words))
    return question, expression, calculate(expression)


def react_thought(expression: str) -> str:
    return f"I need to calculate {expression}."  # restating it first makes the copy reliable


def react_example(d: Draw) -> Example:
    """An arithmetic question with the calculator offered: one Action, the Observation, the Final Answer."""
    rng, chinese = d.rng, d.rng.random() < 0.5
    question, expression, result = arithmetic_question(rng, chinese)
    tools = [calculator.spec()] + ([SEARCH_TOOL] if rng.random() < 0.3 else [])
    rng.shuffle(tools)
    final = f"答案是{result}。" if chinese else f"The answer is {result}."
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}  # fmt: skip
    messages = _system(d) + [
        {"role": "user", "content": question},
        {"role": "assistant", "content": react_thought(expression), "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": result},
        {"role": "assistant", "content": final},
    ]
    return Example("react", chinese, messages, tools, expected=result, expression=expression)


def tools_unused_example(d: Draw) -> Example:
    """Tools offered, but the question needs none: a direct "Final Answer:"."""
    example = d.rng.choice([knowledge_example, small_talk_example, identity_example])(d)
    example.tools = [calculator.spec()] + ([SEARCH_TOOL] if d.rng.random() < 0.3 else [])
    return example


def direct_math_example(d: Draw) -> Example:
    """Small arithmetic without tools: answered directly (and right, for these small numbers)."""
    rng, chinese = d.rng, d.rng.random() < 0.5
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    symbol = rng.choice("+-")
    result = a + b if symbol == "+" else a - b
    if chinese:
        question = f"{a}{OPERATIONS[symbol][1]}{b}等于多少？"
        answer = f"{a}{OPERATIONS[symbol][1]}{b}等于{result}。"
    else:
        question, answer = f"What is {a} {symbol} {b}?", f"{a} {symbol} {b} = {result}."
    return Example("direct_math", chinese, _system(d) + _turn(question, answer), expected=str(result))


Generator = Callable[[int, int, bool], list[Example]]  # (count, seed, held_out) -> conversations

MAKERS: list[tuple[Callable[[Draw], Example], float]] = [
    (identity_example, 0.08), (small_talk_example, 0.12), (knowledge_example, 0.25), (react_example, 0.35),
    (tools_unused_example, 0.1), (direct_math_example, 0.1),
]  # fmt: skip


def generate_examples(count: int, seed: int, held_out: bool = False) -> list[Example]:
    """`count` conversations from `seed`, with the training phrasings or (`held_out`) the held-out ones."""
    d = Draw(random.Random(seed), held_out)
    makers, weights = zip(*MAKERS, strict=True)
    examples = []
    for _ in range(count):
        example = d.rng.choices(makers, weights)[0](d)
        if example.kind in ("chat", "knowledge") and not example.tools and d.rng.random() < 0.25:
            first = d.rng.choices(makers[:3], weights[:3])[0](d)  # a second turn after an earlier exchange
            example.messages = (
                [m for m in example.messages if m["role"] == "system"]
                + [m for m in first.messages if m["role"] != "system"]
                + [m for m in example.messages if m["role"] != "system"]
            )
        examples.append(example)
    return examples


def sft_record(example: Example) -> dict:
    record = {"messages": example.messages}
    if example.tools:
        record["tools"] = example.tools
    return record


# ---------------------------------------------------------------------------------------------------
# the pretraining corpus: the same knowledge as prose, plus stories and arithmetic


def knowledge_sentences(rng: random.Random) -> Iterator[str]:
    for country, capital, country_zh, capital_zh in CAPITALS:
        yield rng.choice(
            [f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}."]
        )
        yield rng.choice([f"{country_zh}的首都是{capital_zh}。", f"{capital_zh}是{country_zh}的首都。"])
    for _, _, en_answer, _, _, zh_answer in FACTS:
        yield en_answer
        yield zh_answer
    yield IDENTITY_EN.replace("I am", f"{DEMO_NAME} is").replace("I can", "It can")
    yield IDENTITY_ZH.replace("我是", f"{DEMO_NAME}是").replace("我会", "它会")


def calculation_lines(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        _, expression, result = arithmetic_question(rng, False)
        lines.append(f"{expression} = {result}")
    return "\n".join(lines)


def pretraining_documents(count: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.45:
            sentences = list(knowledge_sentences(rng))
            chinese = rng.random() < 0.5
            chosen = [s for s in sentences if is_chinese(s) == chinese]
            yield ("" if chinese else " ").join(rng.sample(chosen, rng.randint(4, 12)))
        elif kind < 0.75:
            yield " ".join(rng.choice([english_story, chinese_story])(rng) for _ in range(rng.randint(1, 3)))
        else:
            yield rng.choice([arithmetic, calculation_lines])(rng)


# ---------------------------------------------------------------------------------------------------
# held-out prompts: the conversation before the reply to predict, never one training saw


def prompt_messages(example: Example) -> list[dict]:
    """The conversation up to the reply the model must write."""
    return example.messages[:-3] if example.kind == "react" else example.messages[:-1]


def prompt_key(example: Example) -> str:
    return json.dumps([prompt_messages(example), example.tools], ensure_ascii=False)


def held_out_examples(
    count: int, seed: int, train_prompts: set[str] | frozenset[str], generate: Generator | None = None
) -> list[Example]:
    """`count` examples from `seed` whose prompt (conversation and tools) never occurs in training, drawn
    by `generate` (default: generate_examples)."""
    drawn = (generate or generate_examples)(count * 2, seed, True)
    return [e for e in drawn if prompt_key(e) not in train_prompts][:count]
