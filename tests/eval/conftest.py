"""Hand-written English and Chinese sentences and seeded perturbations of them, for metric parity tests."""

import random

import pytest

ENGLISH = [
    "A man in a red shirt is riding a bicycle down the street.",
    "Two dogs are playing with a frisbee in the park.",
    "The quick brown fox jumps over the lazy dog.",
    'She said, "I\'ll be there at 5 p.m." and left.',
    "It's a well-known fact that cats don't like water.",
    "The price rose from $3.50 to $4.25 in 2023, a 21% increase.",
    "Over 1,000 people attended the conference in São Paulo.",
    "Can you believe it?! We won 3-2 in the last minute!",
    "The state-of-the-art model achieves 92.5 BLEU on the test set.",
    "A woman wearing a hat holds an umbrella (it is raining).",
    "Children are building a sandcastle on the beach; the tide is coming in.",
    "He doesn't know whether the café opens at 8:30 or 9:00.",
    "The committee's decision -- unexpected by many -- was final.",
    "Naïve approaches often fail on edge cases, e.g. empty inputs.",
    "The red square is to the left of the blue circle.",
    "A green triangle moves slowly from the top to the bottom.",
    "There are three yellow stars and one purple hexagon.",
    "The video shows a ball bouncing twice before it stops.",
    "Our new headphones offer 30-hour battery life & fast charging.",
    "Visit https://example.com/docs for more info <or not>.",
    "I can't believe it's not butter!",
    "The temperature dropped to -5°C overnight.",
    "Mr. Smith met Dr. Jones at 10 a.m. on Jan. 3rd.",
    "They've been waiting for hours... still nothing.",
    "A plate of spaghetti with tomato sauce and basil leaves.",
    "The train from Zürich arrives at platform 7 at 14:05.",
    "An elderly couple walks hand-in-hand along the river.",
    "Is this the real life? Is this just fantasy?",
    "Up, up and away: the balloon drifts over the hills.",
    'The API returns a JSON object {"status": "ok"} on success.',
    "Prices are quoted in €, £ and ¥ depending on the region.",
    "Two-thirds of respondents (67.3%) preferred option B.",
    "A small boy kicks a soccer ball toward the goal.",
    "Snow covers the mountains, and the lake is frozen solid.",
    "The recipe calls for 2 cups of flour, 1/2 cup of sugar and 3 eggs.",
    "Wait -- did you say 'tomorrow' or 'the day after'?",
    "A cat sleeps on a windowsill in the afternoon sun.",
    "Researchers at MIT & Stanford released the dataset on 2024-05-01.",
    "The orange circle and the orange circle overlap completely.",
    "It rained; it poured; it stopped.",
    "Use the --verbose flag to print debug output [optional].",
    "“Smart quotes” and ‘single ones’ — plus an em dash — appear here.",
]

CHINESE = [
    "一只红色的猫坐在垫子上。",
    "两只狗在公园里玩飞盘。",
    "这款耳机的续航时间长达30小时，支持快速充电。",
    "他说：“我明天下午三点到。”",
    "红色方块在蓝色圆形的左边。",
    "一个绿色三角形从上往下慢慢移动。",
    "今天天气很好，我们去爬山吧！",
    "价格从3.5元涨到了4.25元，涨幅约21%。",
    "这是一款面向年轻人的iPhone 15手机壳。",
    "视频里有一个球弹了两次然后停下来。",
    "孩子们在海滩上堆沙堡，潮水正在上涨。",
    "会议于2024年5月1日在北京召开，超过1,000人参加。",
    "这家咖啡店早上八点半开门。",
    "我们的新产品采用环保材料，质量可靠、价格实惠。",
    "山上覆盖着白雪，湖面结了厚厚的冰。",
    "请在周五之前提交报告（附件不超过10MB）。",
    "三颗黄色的星星和一个紫色的六边形。",
    "她一边听音乐，一边写作业。",
    "这本书讲述了一个关于勇气与友谊的故事。",
    "你确定吗？我觉得不太对……",
    "小明和小红一起去图书馆借了三本书。",
    "这款面霜适合干性皮肤，质地轻薄不油腻。",
]

EXTRA_WORDS = ["the", "a", "very", "blue", "quickly", "not", "and", "3", "cat", "it's", "—"]
EXTRA_CHARS = list("的了是不一在有很大小红蓝猫狗，。")


def _perturb(tokens: list[str], extra: list[str], rng: random.Random) -> list[str]:
    """A few random word/char drops, swaps of neighbours, and insertions."""
    tokens = list(tokens)
    for _ in range(rng.randint(1, 3)):
        edit = rng.choice(("drop", "swap", "insert"))
        if edit == "drop" and len(tokens) > 1:
            del tokens[rng.randrange(len(tokens))]
        elif edit == "swap" and len(tokens) > 1:
            i = rng.randrange(len(tokens) - 1)
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        else:
            tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(extra))
    return tokens


def _pairs(sentences: list[str], split, join, extra: list[str], seed: int) -> list[tuple[str, list[str]]]:
    """(prediction, references) pairs: perturbed predictions against 1-3 references, plus unrelated
    sentences (little overlap), identical strings and empty strings."""
    rng = random.Random(seed)
    pairs = []
    for index, sentence in enumerate(sentences):
        for _ in range(5):
            prediction = join(_perturb(split(sentence), extra, rng))
            references = [sentence] + [
                join(_perturb(split(sentence), extra, rng)) for _ in range(rng.randint(0, 2))
            ]
            pairs.append((prediction, references))
        pairs.append((sentence, [sentence]))
        pairs.append((sentences[(index + 7) % len(sentences)], [sentence]))
    pairs += [("", [sentences[0]]), (sentences[1], [""]), ("", [""]), (sentences[2], ["", sentences[2]])]
    return pairs


@pytest.fixture(scope="session")
def english_pairs() -> list[tuple[str, list[str]]]:
    return _pairs(ENGLISH, str.split, " ".join, EXTRA_WORDS, seed=0)


@pytest.fixture(scope="session")
def chinese_pairs() -> list[tuple[str, list[str]]]:
    return _pairs(CHINESE, list, "".join, EXTRA_CHARS, seed=1)
