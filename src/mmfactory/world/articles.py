"""Product facts -> neutral draft and styled note (SAG / NoteBench), with hallucinated variants.

Facts are ``{attribute: value}`` with English attribute names and values in the article's language.
The styled note has a fixed, learnable style: an emoji title line with a hook, one emoji line per fact
in a fixed order, a closing line and hashtags. ``extract_claims`` reads the attribute claims back out of
any text written with the world's vocabulary.
"""

import re

import numpy as np

from mmfactory.world.captions import COLOR_ZH, capitalize
from mmfactory.world.rng import check_split, item_rng

PRODUCTS = ("Lumo", "Kiri", "Nova", "Pixo", "Tavi", "Orbi", "Zeno", "Mira", "Velo", "Quill")
VOCAB: dict[str, dict[str, str]] = {  # attribute -> English value -> Chinese value
    "category": {
        "backpack": "背包",
        "mug": "马克杯",
        "lamp": "台灯",
        "scarf": "围巾",
        "headphones": "耳机",
        "notebook": "笔记本",
        "water bottle": "水杯",
        "sneakers": "运动鞋",
        "umbrella": "雨伞",
        "jacket": "夹克",
    },
    "color": {
        c: COLOR_ZH[c]
        for c in ("red", "green", "blue", "yellow", "purple", "orange", "pink", "black", "white")
    },
    "material": {
        "cotton": "纯棉",
        "leather": "真皮",
        "stainless steel": "不锈钢",
        "bamboo": "竹木",
        "ceramic": "陶瓷",
        "wool": "羊毛",
        "canvas": "帆布",
        "plastic": "塑料",
    },
    "feature": {
        "waterproof": "防水",
        "lightweight": "轻便",
        "foldable": "可折叠",
        "rechargeable": "可充电",
        "noise-cancelling": "降噪",
        "washable": "可水洗",
        "insulated": "保温",
        "adjustable": "可调节",
    },
    "audience": {
        "students": "学生",
        "travelers": "旅行者",
        "office workers": "上班族",
        "kids": "小朋友",
        "runners": "跑步爱好者",
        "parents": "新手爸妈",
        "gamers": "游戏玩家",
        "campers": "露营爱好者",
    },
}
PRICES = tuple(range(9, 200, 10))
OPTIONAL = ("color", "material", "feature", "audience", "price")  # product and category are always given
ATTRIBUTES = ("product", "category", *OPTIONAL)

DRAFT = {
    "en": {
        "intro": "Now available: the {product} {category}.",
        "color": "It comes in {color}.",
        "material": "It is made of {material}.",
        "feature": "It is {feature}.",
        "audience": "It is designed for {audience}.",
        "price": "It costs ${price}.",
    },
    "zh": {
        "intro": "{product}{category}现已上市。",
        "color": "颜色为{color}。",
        "material": "采用{material}材质。",
        "feature": "具有{feature}的特点。",
        "audience": "适合{audience}使用。",
        "price": "售价{price}元。",
    },
}
# Styled-note lines: a few phrasings per slot keep the style learnable without being one fixed template.
NOTE = {
    "en": {
        "title": ("✨ {product} {category} | my new favorite ✨", "✨ {product} {category} | obsessed ✨"),
        "color": ("🎨 {Color} looks so good", "🎨 The {color} shade is gorgeous"),
        "material": ("🧵 {Material} feels amazing", "🧵 Made of {material}, so comfy"),
        "feature": ("🌟 {Feature} and super handy", "🌟 Super {feature}!"),
        "audience": ("🙋 Perfect for {audience}", "🙋 A must-have for {audience}"),
        "price": ("💰 Only ${price}!", "💰 Just ${price}, what a deal"),
        "closing": ("Highly recommend! 💯", "Go get one! 💯"),
        "tags": ("#{product} #{tag} #GoodFinds",),
    },
    "zh": {
        "title": ("✨{product}{category}｜真的爱了✨", "✨{product}{category}｜挖到宝了✨"),
        "color": ("🎨{color}颜值超高", "🎨{color}也太好看了吧"),
        "material": ("🧵{material}材质，手感绝了", "🧵用的是{material}，质感满分"),
        "feature": ("🌟{feature}，超级实用", "🌟主打{feature}，太方便了"),
        "audience": ("🙋{audience}闭眼冲", "🙋{audience}必备"),
        "price": ("💰只要{price}元！", "💰{price}元，性价比超高"),
        "closing": ("真心推荐💯", "冲就对了💯"),
        "tags": ("#{product} #{tag} #好物分享",),
    },
}
# A seller's free-form message carrying the same facts: other wording, shuffled order, small talk between.
REQUEST = {
    "en": {
        "intro": (
            "Hi! I'm selling my {product} {category}.",
            "Listing one {product} {category}, barely used.",
        ),
        "color": ("Colour-wise it's {color}.", "It's the {color} version."),
        "material": ("The body is all {material}.", "{Material} throughout."),
        "feature": ("Worth saying it's {feature}.", "Bonus: {feature}."),
        "audience": ("My friends who are {audience} love theirs.", "An ideal pick for {audience}."),
        "price": ("Asking ${price}.", "Let it go for ${price}."),
    },
    "zh": {
        "intro": ("你好！出一个{product}{category}。", "转让{product}{category}一个，几乎全新。"),
        "color": ("颜色是{color}的。", "这个是{color}款。"),
        "material": ("整体是{material}做的。", "{material}质地。"),
        "feature": ("值得一提：{feature}。", "额外优点：{feature}。"),
        "audience": ("身边的{audience}都很喜欢。", "很适合{audience}。"),
        "price": ("出价{price}元。", "{price}元就出。"),
    },
}
SMALL_TALK = {  # no vocabulary word and no price, so a message's claims are its facts
    "en": (
        "Ships within two days.",
        "Pickup works too.",
        "Message me with any questions!",
        "Still in the original box.",
        "Smoke-free home.",
    ),
    "zh": ("两天内发货。", "也可以自提。", "有问题随时私信！", "原盒还在。", "无烟家庭。"),
}
_EMOJI_OR_TAG = re.compile(r"#\S+|[\u2600-\u27bf\U0001f300-\U0001faff]\ufe0f?")


def _value(attribute: str, en_value: str, lang: str) -> str:
    if attribute in ("product", "price") or lang == "en":
        return en_value
    return VOCAB[attribute][en_value]


def _random_value(rng: np.random.Generator, attribute: str, exclude: str | None = None) -> str:
    """An English value for ``attribute``, different from ``exclude``."""
    options = {"product": PRODUCTS, "price": tuple(map(str, PRICES))}.get(attribute) or tuple(
        VOCAB[attribute]
    )
    options = tuple(v for v in options if v != exclude)
    return options[rng.integers(len(options))]


def sample_facts(rng: np.random.Generator) -> dict[str, str]:
    """English facts: product and category plus 3 or 4 of the optional attributes (so one is absent)."""
    chosen = sorted(rng.choice(len(OPTIONAL), size=int(rng.integers(3, 5)), replace=False))
    attributes = ("product", "category", *(OPTIONAL[i] for i in chosen))
    return {a: _random_value(rng, a) for a in attributes}


def translate_facts(facts: dict[str, str], lang: str) -> dict[str, str]:
    return {a: _value(a, v, lang) for a, v in facts.items()}


def draft(facts: dict[str, str], lang: str) -> str:
    """Neutral factual draft, one plain sentence per fact; ``facts`` in ``lang``."""
    t = DRAFT[lang]
    sentences = [t["intro"].format(**facts)] + [t[a].format(**facts) for a in OPTIONAL if a in facts]
    return " ".join(sentences) if lang == "en" else "".join(sentences)


def styled_note(facts: dict[str, str], lang: str, phrasing: dict[str, int]) -> str:
    """The note: title, one line per fact in OPTIONAL order, closing, hashtags; ``phrasing[slot]`` picks
    each line's wording among NOTE's."""
    t = NOTE[lang]
    fields = dict(facts, **{k.capitalize(): capitalize(v) for k, v in facts.items()})
    fields["tag"] = facts["category"].replace(" ", "")
    slots = ["title", *(a for a in OPTIONAL if a in facts), "closing", "tags"]
    return "\n".join(t[s][phrasing.get(s, 0) % len(t[s])].format(**fields) for s in slots)


def off_style(note: str, lang: str) -> str:
    """The note's content with its style broken: emoji and hashtags removed, lines run into one paragraph."""
    separator = ", " if lang == "en" else "，"
    lines = [
        _EMOJI_OR_TAG.sub("", line).replace(" | ", separator).replace("｜", separator)
        for line in note.split("\n")
    ]
    lines = [line.strip(" !！,，") for line in lines if line.strip()]
    return ". ".join(lines) + "." if lang == "en" else "，".join(lines) + "。"


def article(seed: int, split: str, index: int, lang: str = "en") -> dict:
    """Article ``index`` of ``split``. Same ``index`` in another language has the same facts.

    Returns ``{"id", "lang", "facts", "draft", "reference", "variants": {"off_style", "unsupported",
    "contradicted"}, "variant_attributes": {"unsupported": attr, "contradicted": attr}}``.
    """
    check_split(split)
    if lang not in DRAFT:
        raise ValueError(f"unknown language {lang!r}; expected 'en' or 'zh'")
    rng = item_rng(seed, "article", split, index)
    facts_en = sample_facts(rng)
    phrasing = {slot: int(rng.integers(2)) for slot in ("title", *OPTIONAL, "closing")}
    facts = translate_facts(facts_en, lang)
    reference = styled_note(facts, lang, phrasing)

    absent = [a for a in OPTIONAL if a not in facts_en]
    added = absent[rng.integers(len(absent))]
    present = [a for a in OPTIONAL if a in facts_en]
    changed = present[rng.integers(len(present))]
    with_added = dict(facts_en, **{added: _random_value(rng, added)})
    contradicted = dict(facts_en, **{changed: _random_value(rng, changed, exclude=facts_en[changed])})
    return {
        "id": f"{split}-{index:06d}-{lang}",
        "lang": lang,
        "facts": facts,
        "draft": draft(facts, lang),
        "reference": reference,
        "variants": {
            "off_style": off_style(reference, lang),
            "unsupported": styled_note(translate_facts(with_added, lang), lang, phrasing),
            "contradicted": styled_note(translate_facts(contradicted, lang), lang, phrasing),
        },
        "variant_attributes": {"unsupported": added, "contradicted": changed},
    }


def seller_request(facts: dict[str, str], lang: str, rng: np.random.Generator) -> str:
    """A seller's message stating ``facts`` (in ``lang``): the opener, then the other facts in a random
    order with two small-talk sentences among them, each fact in one of two wordings unlike the draft's."""
    t = REQUEST[lang]
    fields = dict(facts, **{k.capitalize(): capitalize(v) for k, v in facts.items()})
    sentences = [t[a][rng.integers(2)].format(**fields) for a in OPTIONAL if a in facts]
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    for line in rng.choice(len(SMALL_TALK[lang]), size=2, replace=False):
        sentences.insert(int(rng.integers(len(sentences) + 1)), SMALL_TALK[lang][line])
    opener = t["intro"][rng.integers(2)].format(**fields)
    return (" " if lang == "en" else "").join([opener, *sentences])


def request_article(seed: int, split: str, index: int, lang: str = "en") -> dict:
    """Article ``index`` of ``split`` (:func:`article`) with ``input``: its facts as a seller's message
    (:func:`seller_request`), the same message structure in every language."""
    a = article(seed, split, index, lang)
    return {**a, "input": seller_request(a["facts"], lang, item_rng(seed, "article-request", split, index))}


def _patterns(lang: str) -> dict[str, list[tuple[re.Pattern, str]]]:
    patterns: dict[str, list[tuple[re.Pattern, str]]] = {
        "product": [(re.compile(rf"\b{p}\b" if lang == "en" else re.escape(p)), p) for p in PRODUCTS]
    }
    for attribute, values in VOCAB.items():
        surface = values if lang == "zh" else {v: v for v in values}
        patterns[attribute] = [
            (re.compile(rf"\b{re.escape(s)}\b", re.I) if lang == "en" else re.compile(re.escape(s)), s)
            for s in (surface[v] for v in values)
        ]
    patterns["price"] = [(re.compile(r"\$(\d+)" if lang == "en" else r"(\d+)\s*元"), "")]
    return patterns


_PATTERNS = {lang: _patterns(lang) for lang in DRAFT}


def extract_claims(text: str, lang: str) -> dict[str, str]:
    """Attribute claims a world-style text makes, ``{attribute: value}`` in ``lang`` (values as in facts).

    For each attribute the earliest mention of any vocabulary value wins. Compare with the source facts:
    a claim whose attribute is in the facts with another value is a contradiction; a claim whose
    attribute is absent from the facts is unsupported.
    """
    claims: dict[str, str] = {}
    for attribute, patterns in _PATTERNS[lang].items():
        best: tuple[int, str] | None = None
        for pattern, value in patterns:
            match = pattern.search(text)
            if match and (best is None or match.start() < best[0]):
                best = (match.start(), match.group(1) if attribute == "price" else value)
        if best is not None:
            claims[attribute] = best[1]
    return {a: claims[a] for a in ATTRIBUTES if a in claims}


def article_preference(seed: int, split: str, index: int, lang: str = "en") -> dict:
    """C-DPO pair: prompt = the draft, chosen = the faithful note, rejected = a hallucinated note."""
    a = article(seed, split, index, lang)
    kind = ("unsupported", "contradicted")[item_rng(seed, "article-pref", split, index).integers(2)]
    instruction = "Rewrite in note style:\n" if lang == "en" else "改写成笔记风格：\n"
    return {
        "id": a["id"],
        "prompt": instruction + a["draft"],
        "chosen": a["reference"],
        "rejected": a["variants"][kind],
    }
