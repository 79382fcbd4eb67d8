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
          "what do you do?", "are you a person or a program?", "what AI is this?", "am I talking to a machine?",
          "what are you called?", "what's your name, assistant?", "tell me who you are in one line.",
          "what can you help me with?", "are you ChatGPT?", "which assistant am I using?"]  # fmt: skip
WHO_ZH = ["你是谁？", "你叫什么？", "你是什么？", "你能干什么？", "介绍一下自己。", "说说你自己。", "怎么称呼你？",
          "你是机器人吗？", "谁创造了你？", "你是什么助手？", "描述一下你自己。", "我在和什么模型说话？", "你有什么本事？",
          "你的名字？", "这是谁？", "讲讲你是什么。", "你是做什么的？", "你是人还是程序？", "你是哪家的模型？", "你是AI助手吗？",
          "你的名字是什么？", "用一句话介绍你自己。", "你能帮我做什么？", "你是ChatGPT吗？", "怎么叫你比较好？", "你有名字吗？"]  # fmt: skip
WHO_EMBEDDED_EN = ["who you are", "what your name is", "what you can do", "a little about yourself"]
WHO_EMBEDDED_ZH = ["你是谁", "你叫什么名字", "你会做什么", "你是什么模型"]

HELLOS_EN = ["hello", "hi", "hey", "good morning", "good afternoon", "good evening", "hi there", "hello there",
             "hey hey", "greetings", "yo", "hey there", "morning", "good day", "heya"]  # fmt: skip
HELLO_TAILS_EN = [
    "",
    "!",
    ". How are you?",
    "! How are you doing?",
    ", nice to meet you!",
    "! How's everything?",
    ". What's up?",
    "! How have you been?",
    ", how's it going?",
    "! Having a good day?",
    "! Hope you're well.",
]
# Small talk beyond the tables' SMALL_TALK: (English, answer, Chinese, answer).
MORE_SMALL_TALK = [
    ("Lovely weather today.", "It really is! I hope you can enjoy it.", "今天天气真好。", "是啊！希望你能好好享受。"),
    ("Let's chat.", "Sure! Ask me about a country's capital, a simple fact, or give me a sum to work out.",
     "我们聊聊天吧。", "好呀！你可以问我国家的首都、简单的常识，或者让我算一道题。"),
    ("I'm bored.", "Let's talk then! Ask me about a country's capital or give me a sum to work out.",
     "好无聊啊。", "那我们聊聊吧！你可以问我一个国家的首都，或者让我算一道题。"),
    ("I had a long day.", "That sounds tiring. I hope you can rest a bit now.", "今天好累啊。", "辛苦了，希望你能好好休息一下。"),
    ("You are very helpful.", "Thank you! I am glad to help.", "你真棒。", "谢谢夸奖！很高兴能帮上忙。"),
    ("I have a question.", "Sure, go ahead and ask.", "我有个问题。", "好的，请问吧。"),
    ("Are you there?", "Yes, I am here. How can I help you?", "你还在吗？", "我在呢，有什么可以帮你的吗？"),
]  # fmt: skip
HELLO_REPLIES_EN = {
    "good morning": "Good morning!",
    "good afternoon": "Good afternoon!",
    "good evening": "Good evening!",
}
HELLOS_ZH = [
    "你好",
    "您好",
    "嗨",
    "早上好",
    "下午好",
    "晚上好",
    "哈喽",
    "早啊",
    "大家好",
    "嘿",
    "你好呀",
    "在吗",
    "早安",
]
HELLO_TAILS_ZH = ["", "！", "，最近好吗？", "，很高兴认识你！", "，你今天怎么样？", "~", "，忙吗？", "，最近过得如何？", "！好久不见。",
                  "，今天心情怎么样？"]  # fmt: skip
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

# Other ways to ask each fact of qwenkit.demo.data.FACTS (by its English question): (English, Chinese).
FACT_PARAPHRASES = {
    "How many days are in a week?": (["how many days does a week have?", "a week has how many days?"], ["一个星期有多少天？", "一周是几天？"]),
    "How many months are in a year?": (["how many months does a year have?", "a year has how many months?"], ["一年是几个月？", "一年里有多少个月？"]),
    "How many legs does a spider have?": (["how many legs do spiders have?", "a spider has how many legs?"], ["蜘蛛长了几条腿？", "一只蜘蛛有多少条腿？"]),
    "How many legs does a dog have?": (["how many legs do dogs have?", "a dog has how many legs?"], ["小狗有几条腿？", "一只狗有多少条腿？"]),
    "What color is the sky on a clear day?": (["what colour is the sky when it is sunny?", "on a clear day, what color is the sky?"], ["天晴的时候天空是什么颜色？", "晴朗的天空是什么颜色？"]),
    "What color is grass?": (["what colour is grass?", "grass is which color?"], ["青草是什么颜色？", "草地是什么颜色的？"]),
    "What is the largest planet in the solar system?": (["which planet is the biggest in the solar system?", "what's the biggest planet?"], ["太阳系里最大的行星是什么？", "哪颗行星最大？"]),
    "Which planet is closest to the sun?": (["what planet is nearest to the sun?", "which planet orbits closest to the sun?"], ["哪颗行星离太阳最近？", "最靠近太阳的行星是什么？"]),
    "What is the largest ocean?": (["which ocean is the biggest?", "what's the biggest ocean on earth?"], ["哪个大洋最大？", "地球上最大的海洋是什么？"]),
    "What is the highest mountain in the world?": (["which mountain is the tallest in the world?", "what's the world's highest mountain?"], ["世界最高峰是哪座山？", "哪座山是世界上最高的？"]),
    "What is the longest river in China?": (["which river in China is the longest?", "what's China's longest river?"], ["中国哪条河最长？", "中国第一长河是哪条？"]),
    "At what temperature does water boil?": (["what is the boiling point of water?", "when does water boil, at what temperature?"], ["水的沸点是多少度？", "水烧到多少度会开？"]),
    "At what temperature does water freeze?": (["what is the freezing point of water?", "how cold must water be to freeze?"], ["水的冰点是多少度？", "水到多少度会结冰？"]),
    "What do bees make?": (["what do bees produce?", "bees make what?"], ["蜜蜂能产出什么？", "蜜蜂会做什么东西？"]),
    "What animal is known as the king of the jungle?": (["which animal is called the king of the jungle?", "who is the king of the animals?"], ["百兽之王是什么动物？", "被叫做百兽之王的是哪种动物？"]),
    "What gas do plants take in from the air?": (["which gas do plants absorb from the air?", "what do plants breathe in from the air?"], ["植物从空气里吸进什么气体？", "植物吸收哪种气体？"]),
    "What gas do people need to breathe?": (["which gas do we need to breathe?", "what do humans breathe in to live?"], ["人需要呼吸哪种气体？", "我们呼吸靠什么气体？"]),
    "How many hours are in a day?": (["how many hours does a day have?", "a day has how many hours?"], ["一天是多少小时？", "一天有几个钟头？"]),
    "How many minutes are in an hour?": (["how many minutes does an hour have?", "an hour is how many minutes?"], ["一个小时是多少分钟？", "一小时有几分钟？"]),
    "What is the opposite of hot?": (["what's the opposite of hot?", "hot is the opposite of what?"], ["热的反面是什么？", "和热相反的词是什么？"]),
    "What is the opposite of big?": (["what's the opposite of big?", "big is the opposite of what?"], ["大的反面是什么？", "和大相反的词是什么？"]),
    "Where does the sun rise?": (["in which direction does the sun rise?", "the sun comes up where?"], ["太阳从哪个方向升起？", "太阳是从哪边出来的？"]),
    "What is the fastest land animal?": (["which animal runs fastest on land?", "what's the quickest animal on land?"], ["陆地上跑得最快的是什么动物？", "哪种陆地动物速度最快？"]),
    "What is the largest animal?": (["which animal is the biggest?", "what's the biggest animal in the world?"], ["世界上最大的动物是什么？", "哪种动物个子最大？"]),
    "What do pandas eat?": (["what food do pandas eat?", "what does a panda like to eat?"], ["熊猫喜欢吃什么？", "大熊猫吃什么东西？"]),
    "How many continents are there?": (["how many continents does the earth have?", "what is the number of continents?"], ["地球上有几个大洲？", "一共有多少个大洲？"]),
    "What is the color of snow?": (["what colour is snow?", "snow is what color?"], ["雪是什么颜色？", "下的雪是什么颜色的？"]),
    "How many sides does a triangle have?": (["a triangle has how many sides?", "how many edges does a triangle have?"], ["三角形有几个边？", "一个三角形有多少条边？"]),
    "How many sides does a square have?": (["a square has how many sides?", "how many edges does a square have?"], ["正方形有几个边？", "一个正方形有多少条边？"]),
    "What is frozen water called?": (["what do we call water that is frozen?", "frozen water is called what?"], ["水结冰以后叫什么？", "冻住的水叫什么？"]),
    "Who wrote the Tao Te Ching?": (["who is the author of the Tao Te Ching?", "the Tao Te Ching was written by whom?"], ["谁写了《道德经》？", "《道德经》是谁写的？"]),
    "What language is spoken in Brazil?": (["what language do people in Brazil speak?", "which language do Brazilians speak?"], ["巴西说哪种语言？", "巴西的语言是什么？"]),
}  # fmt: skip

# Things outside the model's world: it must say it does not know them.
UNKNOWN_COUNTRIES = [("Finland", "芬兰"), ("Denmark", "丹麦"), ("Ireland", "爱尔兰"), ("Morocco", "摩洛哥"),
                     ("Colombia", "哥伦比亚"), ("Pakistan", "巴基斯坦"), ("Nigeria", "尼日利亚"), ("Malaysia", "马来西亚"),
                     ("Hungary", "匈牙利"), ("Belgium", "比利时"), ("Switzerland", "瑞士"), ("Cuba", "古巴"),
                     ("Latvia", "拉脱维亚"), ("Bolivia", "玻利维亚"), ("New Zealand", "新西兰"), ("the Netherlands", "荷兰"),
                     ("Ukraine", "乌克兰"), ("Indonesia", "印度尼西亚"), ("the Philippines", "菲律宾"), ("Ethiopia", "埃塞俄比亚"),
                     ("Venezuela", "委内瑞拉"), ("Romania", "罗马尼亚"), ("Nepal", "尼泊尔"), ("Ghana", "加纳")]  # fmt: skip
UNKNOWN_CITIES = [("Sydney", "悉尼"), ("Chicago", "芝加哥"), ("Munich", "慕尼黑"), ("Shanghai", "上海"),
                  ("Barcelona", "巴塞罗那"), ("Toronto", "多伦多"), ("Mumbai", "孟买"), ("Lagos", "拉各斯"),
                  ("Nagoya", "名古屋"), ("Milan", "米兰"), ("Chengdu", "成都"), ("Seattle", "西雅图"), ("Hamburg", "汉堡"),
                  ("Marseille", "马赛"), ("Busan", "釜山"), ("Manchester", "曼彻斯特"), ("Hangzhou", "杭州")]  # fmt: skip
UNKNOWN_THINGS = [("the telephone", "电话"), ("the light bulb", "电灯泡"), ("paper", "纸"), ("the bicycle", "自行车"),
                  ("the internet", "互联网"), ("the television", "电视"), ("the airplane", "飞机"), ("the piano", "钢琴"),
                  ("the camera", "照相机"), ("the radio", "收音机")]  # fmt: skip
UNKNOWN_LANDMARKS = [("the Sagrada Familia", "圣家堂"), ("the Great Wall", "长城"), ("the Statue of Liberty", "自由女神像"),
                     ("the Golden Gate Bridge", "金门大桥"), ("Big Ben", "大本钟"), ("Mount Fuji", "富士山"),
                     ("the Taj Mahal", "泰姬陵"), ("the Leaning Tower of Pisa", "比萨斜塔"), ("the Forbidden City", "故宫"),
                     ("the Colosseum", "罗马斗兽场")]  # fmt: skip
UNKNOWN_BOOKS = [("War and Peace", "《战争与和平》"), ("Hamlet", "《哈姆雷特》"), ("Don Quixote", "《堂吉诃德》"),
                 ("Dream of the Red Chamber", "《红楼梦》"), ("Journey to the West", "《西游记》"), ("The Little Prince", "《小王子》"),
                 ("Pride and Prejudice", "《傲慢与偏见》"), ("The Old Man and the Sea", "《老人与海》")]  # fmt: skip
UNKNOWN_EVENTS = [("the football World Cup", "足球世界杯"), ("the Olympic 100 metres", "奥运会百米赛跑"),
                  ("the Tour de France", "环法自行车赛"), ("the NBA finals", "NBA总决赛"), ("Wimbledon", "温网"),
                  ("the Boston Marathon", "波士顿马拉松"), ("the Monaco Grand Prix", "摩纳哥大奖赛")]  # fmt: skip
UNKNOWN_PEOPLE = [("my teacher", "我的老师"), ("my best friend", "我最好的朋友"), ("Zhang Wei", "张伟"), ("Maria Lopez", "玛丽亚"),
                  ("my landlord", "我的房东"), ("the new manager", "新来的经理"), ("my grandmother", "我奶奶")]  # fmt: skip
UNKNOWN_ITEMS = [("a cup of coffee", "一杯咖啡"), ("a new phone", "一部新手机"), ("gold", "黄金"), ("one bitcoin", "一个比特币"),
                 ("a train ticket to {city}", "去{city}的火车票"), ("a kilo of rice", "一公斤大米")]  # fmt: skip
# (English, Chinese) questions outside the model's world; {country} may also be one whose capital it knows.
UNKNOWN = [
    ("who is the president of {country}?", "{country}的总统是谁？"), ("how many people live in {city}?", "{city}有多少人？"),
    ("who invented {thing}?", "{thing}是谁发明的？"), ("what is the capital of {unknown_country}?", "{unknown_country}的首都是哪里？"),
    ("what's the news today?", "今天有什么新闻？"), ("what time is it now?", "现在几点了？"),
    ("who will win the next election?", "下次选举谁会赢？"), ("what year was {city} founded?", "{city}是哪一年建立的？"),
    ("how far is {city} from {city2}?", "{city}离{city2}有多远？"), ("what is my brother's name?", "我哥哥叫什么名字？"),
    ("what's the weather in {city} right now?", "{city}现在天气怎么样？"), ("will it rain in {city} tomorrow?", "{city}明天下不下雨？"),
    ("how hot will it be in {city} next week?", "{city}下周有多热？"), ("how old is {person}?", "{person}多大了？"),
    ("which team won the last football match?", "上一场足球赛哪个队赢了？"), ("what is the population of {country}?", "{country}有多少人口？"),
    ("who is the richest person in {city}?", "{city}最有钱的人是谁？"), ("what did I do yesterday?", "我昨天做了什么？"),
    ("how tall is {landmark}?", "{landmark}有多高？"), ("when was {landmark} built?", "{landmark}是哪一年建成的？"),
    ("who designed {landmark}?", "{landmark}是谁设计的？"), ("who wrote {book}?", "{book}是谁写的？"),
    ("what is {book} about?", "{book}讲的是什么？"), ("who won {event} in {year}?", "{year}年的{event}谁赢了？"),
    ("who is the champion of {event} this year?", "今年{event}的冠军是谁？"), ("what is {person}'s phone number?", "{person}的电话号码是多少？"),
    ("where does {person} live?", "{person}住在哪里？"), ("how much does {item} cost today?", "{item}今天多少钱？"),
    ("what currency does {country} use?", "{country}用什么货币？"), ("how big is {country}?", "{country}有多大？"),
    ("what is the national animal of {country}?", "{country}的国宝是什么动物？"), ("who is the mayor of {city}?", "{city}的市长是谁？"),
    ("what is the best restaurant in {city}?", "{city}最好的餐厅是哪家？"), ("what is {person}'s favourite food?", "{person}最喜欢吃什么？"),
    ("what will happen tomorrow?", "明天会发生什么？"), ("what is the date today?", "今天几号？"),
]  # fmt: skip

OPERATORS_EN = {"+": ["plus", "+", "added to", "and", "+"], "-": ["minus", "-", "less", "take away", "-"],
                "*": ["times", "*", "x", "×", "multiplied by", "*"], "/": ["divided by", "/", "÷", "over", "/"]}  # fmt: skip
OPERATORS_ZH = {
    "+": ["加", "+", "加上", "和", "+"],
    "-": ["减", "-", "减去", "减掉", "-"],
    "*": ["乘以", "乘", "×", "*", "乘上"],
    "/": ["除以", "÷", "/", "/"],
}
CALC_CORES_EN = ["what is {e}?", "calculate {e}.", "how much is {e}?", "compute {e}.", "work out {e}.", "{e} = ?",
                 "{e}?", "what's {e}", "can you calculate {e}?", "I need the result of {e}.", "solve {e}.",
                 "what do you get for {e}?", "what does {e} come to?", "{e} equals what?", "figure out {e}.",
                 "quick math: {e}", "I need {e} worked out.", "tell me {e}.", "and {e}?"]  # fmt: skip
CALC_CORES_ZH = ["{e}等于多少？", "计算{e}。", "{e}是多少？", "算一下{e}。", "{e}=？", "{e}等于几？", "帮我算{e}。",
                 "{e}的结果是多少？", "求{e}。", "{e}得多少？", "{e}得几？", "算算{e}", "{e}是几？", "帮我计算一下{e}。",
                 "{e}等于？", "{e}结果是？", "那{e}呢？"]  # fmt: skip
# Requests phrased around the operation itself, with the operands in their place ("multiply 58 by 19",
# "subtract 12 from 40", word problems): the expression to call the calculator with is still "a op b".
VERB_CORES_EN = {
    "+": ["add {a} and {b}.", "what is the sum of {a} and {b}?", "{a} and {b} together make how many?",
          "I bought {a} apples and then {b} more, how many do I have?", "add {b} to {a}.", "what do {a} and {b} make together?",
          "I have {a} coins and find {b} more. How many coins do I have now?", "{a} people came in the morning and {b} in the afternoon, how many in all?"],
    "-": ["subtract {b} from {a}.", "take {b} away from {a}.", "what is {a} take away {b}?", "what is left if you take {b} from {a}?",
          "there were {a} birds on a tree and {b} flew away. How many are still there?", "how much is {a} minus {b}?",
          "I have {a} stamps and give away {b}. How many do I keep?", "what's the difference between {a} and {b}?", "I had {a} dollars and spent {b}. How much is left?"],
    "*": ["multiply {a} by {b}.", "what is the product of {a} and {b}?", "what is {a} times {b}?",
          "{a} rows of {b} chairs: how many chairs?", "what is {a} multiplied by {b}?",
          "{a} boxes with {b} pens in each: how many pens is that?", "what is {b} lots of {a}?", "a ticket costs {a} yuan. How much do {b} tickets cost?"],
    "/": ["divide {a} by {b}.", "what is {a} over {b}?", "{a} shared by {b} people is how much each?", "how many times does {b} go into {a}?", "what is {a} split into {b} equal parts?",
          "share {a} sweets equally among {b} kids: how many does each get?", "what do you get when you divide {a} by {b}?"],
}  # fmt: skip
VERB_CORES_ZH = {
    "+": ["把{a}和{b}加起来。", "{a}加{b}一共是多少？", "买了{a}个苹果，又买了{b}个，一共几个？", "{a}与{b}的和是多少？", "{a}再加上{b}是多少？", "我有{a}块钱，又挣了{b}块，现在有多少？",
          "上午来了{a}个人，下午来了{b}个人，一共来了多少人？"],
    "-": ["从{a}里减去{b}。", "{a}减掉{b}剩多少？", "{a}比{b}多多少？", "有{a}本书，借出去{b}本，还有几本？", "{a}和{b}的差是多少？", "{a}去掉{b}还剩多少？", "树上有{a}只鸟，飞走了{b}只，还剩几只？",
          "我有{a}元，花了{b}元，还剩多少钱？"],
    "*": ["{a}和{b}的乘积是多少？", "{a}乘{b}得多少？", "{a}排椅子，每排{b}把，一共多少把？", "{a}个{b}是多少？", "{a}的{b}倍是多少？", "每盒{b}支笔，{a}盒一共多少支？", "一张票{a}元，买{b}张要多少钱？"],
    "/": ["{a}除以{b}得多少？", "{a}被{b}除等于几？", "{a}元钱{b}个人平分，每人多少？", "把{a}平均分成{b}份，每份是多少？", "{a}颗糖平均分给{b}个小朋友，每人几颗？", "{a}里面有几个{b}？"],
}  # fmt: skip
TOOL_ASKS_EN = ["", "", "", " Use the calculator.", " Please use your calculator tool.", " Use a tool if you need one.",
                " You can use the calculator.", " Use the tool.", " Check it with the calculator."]  # fmt: skip
TOOL_ASKS_ZH = ["", "", "", "用计算器算。", "请用计算器工具。", "需要的话可以用工具。", "用一下计算器吧。", "用工具算一下。",
                "拿计算器算算。"]  # fmt: skip
# The same asks put first: "Use the calculator: 37 * 12", "用计算器帮我算37乘12".
TOOL_LEADS_EN = ["Use the calculator: ", "With the calculator, ", "Using your calculator tool, ", "Calculator please: ",
                 "Use your tool for this: ", "With a tool: "]  # fmt: skip
TOOL_LEADS_ZH = [
    "用计算器算一下：",
    "请用计算器：",
    "用计算器工具算：",
    "拿计算器算算，",
    "用工具帮我算：",
    "麻烦用计算器算一下，",
]
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
    """`n` as digits ("1234", or "1,234" with a thousands separator), or in words (a fifth of the numbers
    below 1000, fewer of the longer ones): "one thousand, two hundred and thirty-four", "一千二百三十四" / "两千"."""
    if rng.random() < (0.2 if n < 1000 else 0.08):
        import cn2an
        from num2words import num2words

        if not zh:
            return num2words(n)
        words = cn2an.an2cn(n)
        return "两" + words[1:] if words.startswith(("二千", "二百")) and rng.random() < 0.5 else words
    if n >= 1000 and rng.random() < (0.1 if zh else 0.25):
        return f"{n:,}"
    return str(n)


def operand(rng: random.Random, digits: int) -> int:
    """A number of up to `digits` digits; a fifth of them round ("3000", "720"), whose zeros must be copied too."""
    n = rng.randint(1, 10**digits - 1)
    if n >= 10 and rng.random() < 0.2:
        n -= n % 10 ** rng.randint(1, len(str(n)) - 1)
    return n


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
        en_q, en_a, zh_q, zh_a = rng.choice(SMALL_TALK + MORE_SMALL_TALK)
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
        more_en, more_zh = FACT_PARAPHRASES[en_q]
        if zh:
            core = rng.choice([zh_q, zh_q, *more_zh])
            question, answer, key = chinese(d, core, core.rstrip("？")), zh_a, zh_key
        else:
            core = rng.choice([en_q[0].lower() + en_q[1:]] * 2 + more_en)
            question, answer, key = english(d, core), en_a, en_key
    return Example("knowledge", zh, _turn(question, answer), expected=key)


def refusal(d: Draw, zh: bool) -> Example:
    """A question outside the model's world, answered with "I don't know" in its language."""
    rng = d.rng
    known = [(c[0], c[2]) for c in CAPITALS]
    (city, city_zh), (city2, city2_zh) = rng.sample(UNKNOWN_CITIES, 2)
    fills = {"country": rng.choice(UNKNOWN_COUNTRIES + known), "unknown_country": rng.choice(UNKNOWN_COUNTRIES),
             "city": (city, city_zh), "city2": (city2, city2_zh), "thing": rng.choice(UNKNOWN_THINGS),
             "landmark": rng.choice(UNKNOWN_LANDMARKS), "book": rng.choice(UNKNOWN_BOOKS), "event": rng.choice(UNKNOWN_EVENTS),
             "person": rng.choice(UNKNOWN_PEOPLE), "year": (str(rng.randint(1950, 2030)),) * 2}  # fmt: skip
    item = rng.choice(UNKNOWN_ITEMS)
    fills["item"] = (item[0].format(city=city), item[1].format(city=city_zh))
    en, zh_core = rng.choice(UNKNOWN)
    if zh:
        core = zh_core.format(**{k: v[1] for k, v in fills.items()})
        return Example("refusal", zh, _turn(chinese(d, core), REFUSAL_ZH), expected="不知道")
    core = en.format(**{k: v[0] for k, v in fills.items()})
    return Example("refusal", zh, _turn(english(d, core), REFUSAL_EN), expected="don't know")


def arithmetic_request(d: Draw, zh: bool, small: bool = False) -> tuple[str, str, str]:
    """(question, expression in digits, result): operands mostly up to 3 digits, some 4 (a product's multiplier
    up to 3),
    divisions that come out even (dividends up to 4 digits); `small`: sums and differences of numbers up to 20."""
    rng = d.rng
    if small:
        symbol, a, b = rng.choice("+-"), rng.randint(0, 20), rng.randint(0, 20)
    else:
        symbol = rng.choice("+-*/")
        a = operand(rng, rng.choice([1, 2, 2, 3, 3, 3, 4]))
        b = operand(rng, rng.choice([1, 2, 3, 3, 4] if symbol in "+-" else [1, 2, 2, 2, 3]))
        if symbol == "/":
            b = operand(rng, rng.choice([1, 2, 2]))
            a = b * rng.randint(1, min(10 ** rng.choice([1, 2, 2, 3]) - 1, max(1, 9999 // b)))
    expression = f"{a} {symbol} {b}"
    if not small and rng.random() < 0.4:  # the operation said in words around its operands
        core = rng.choice((VERB_CORES_ZH if zh else VERB_CORES_EN)[symbol])
        core = core.format(a=number_text(rng, a, zh), b=number_text(rng, b, zh))
    elif zh:
        space = " " if rng.random() < 0.4 else ""
        said = (
            number_text(rng, a, True)
            + space
            + rng.choice(OPERATORS_ZH[symbol])
            + space
            + number_text(rng, b, True)
        )
        core = rng.choice(CALC_CORES_ZH).format(e=said)
    else:
        said = f"{number_text(rng, a, False)} {rng.choice(OPERATORS_EN[symbol])} {number_text(rng, b, False)}"
        core = rng.choice(CALC_CORES_EN).format(e=said)
    if not small and rng.random() < 0.2:  # the tool asked for first
        core = (
            rng.choice(TOOL_LEADS_ZH) + core if zh else rng.choice(TOOL_LEADS_EN) + core[0].lower() + core[1:]
        )
    else:
        core += rng.choice(TOOL_ASKS_ZH if zh else TOOL_ASKS_EN)
    return (chinese if zh else english)(d, core), expression, calculate(expression)


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
    turns = rng.choice([2, 3, 3])
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
    (identity, 0.06), (small_talk, 0.09), (knowledge, 0.12), (refusal, 0.11), (react, 0.3),
    (tools_unused, 0.08), (no_calculator, 0.06), (conversation, 0.18),
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


def number_names(rng: random.Random) -> str:
    """Numbers up to 9999 written both ways: "seven hundred and twenty is 720.", "两千零五就是2005。"."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        zh, n = rng.random() < 0.5, operand(rng, rng.choice([2, 3, 4]))
        words = number_text(random.Random(0), n, zh)  # seed 0: the first draw spells it out
        while words in (str(n), f"{n:,}"):
            words = number_text(rng, n, zh)
        lines.append(
            f"{words}就是{n}。" if zh else f"{words} is {n:,}." if rng.random() < 0.3 else f"{words} is {n}."
        )
    return "\n".join(lines)


def calculations(rng: random.Random, low: int, high: int) -> list[tuple[bool, str, str, str]]:
    """low to high (zh, question, expression, result) of arithmetic_request, each in a random language."""
    d = Draw(rng)
    out = []
    for _ in range(rng.randint(low, high)):
        zh = rng.random() < 0.5
        out.append((zh, *arithmetic_request(d, zh)))
    return out


def calculator_notes(rng: random.Random) -> str:
    """Requests for a calculation and the expression they ask for: "帮我算一下 56 乘以 78 -> 56 * 78 = 4368"."""
    return "\n\n".join(f"{question}\n{'算式' if zh else 'Expression'}: {expression} = {result}"
                       for zh, question, expression, result in calculations(rng, 2, 5))  # fmt: skip


def copy_drills(rng: random.Random) -> str:
    """Text that repeats what came before it, digit for digit: "Repeat: 40715 -> 40715", "37 * 4066 is 37 * 4066".
    Copying digits from a question into the calculator call is the hardest skill of the chat data; a
    corpus that asks for it everywhere teaches it before fine-tuning does."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        zh = rng.random() < 0.5
        if rng.random() < 0.5:
            item = str(operand(rng, rng.randint(1, 6)))
        else:
            item = f"{operand(rng, rng.randint(1, 4))} {rng.choice('+-*/')} {operand(rng, rng.randint(1, 3))}"
        form = rng.choice(["{x} -> {x}", "Repeat: {x}. {x}", "{x} again: {x}", "重复：{x}。{x}", "{x}，也就是{x}。",
                           "I need to calculate {x}. Calculate {x}.", "我要算{x}。算式：{x}"])  # fmt: skip
        if zh != ("{x}，" in form or "重复" in form or "我要" in form):
            form = rng.choice(["{x} -> {x}", "重复：{x}。{x}"] if zh else ["{x} -> {x}", "Repeat: {x}. {x}"])
        lines.append(form.format(x=item))
    return "\n".join(lines)


def react_text(rng: random.Random) -> str:
    """Calculator conversations as plain text: the question, then the ReAct steps that copy its expression."""
    parts = []
    for zh, question, expression, result in calculations(rng, 1, 3):
        final = f"答案是{result}。" if zh else f"The answer is {result}."
        parts.append(
            f"Question: {question}\nThought: {react_thought(expression)}\nAction: calculator\n"
            f"Action Input: {json.dumps({'expression': expression})}\nObservation: {result}\n"
            f"Thought: I now know the final answer\nFinal Answer: {final}"
        )
    return "\n\n".join(parts)


def composed_documents(count: int, seed: int) -> Iterator[str]:
    """The pretraining corpus of the composed data: prose of the facts, questions and answers, dialogues,
    stories and arithmetic (digits and words)."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.25:
            yield fact_prose(rng, rng.random() < 0.5)
        elif kind < 0.37:
            yield question_answer_text(rng)
        elif kind < 0.45:
            yield dialogue_text(rng)
        elif kind < 0.57:
            yield " ".join(rng.choice([english_story, chinese_story])(rng) for _ in range(rng.randint(1, 3)))
        elif kind < 0.62:
            yield arithmetic(rng)
        elif kind < 0.67:
            yield worded_arithmetic(rng)
        elif kind < 0.73:
            yield number_names(rng)
        elif kind < 0.82:
            yield calculator_notes(rng)
        elif kind < 0.91:
            yield copy_drills(rng)
        else:
            yield react_text(rng)


# The build's data sets: name -> (SFT conversations, pretraining documents). "tables" built the
# shipped model (docs/demo-model.md); "composed" is issue 17's.
DATASETS: dict[str, tuple[Generator, Callable[[int, int], Iterator[str]]]] = {
    "tables": (generate_examples, pretraining_documents),
    "composed": (compose_examples, composed_documents),
}
