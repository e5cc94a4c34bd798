"""Text-only chat data built from world text, small and regular enough for a tiny LM to learn quickly."""

from mmfactory.world.articles import article
from mmfactory.world.captions import caption
from mmfactory.world.rng import check_split, item_rng
from mmfactory.world.scenes import sample_scene
from mmfactory.world.vqa import scene_question

CHAT_KINDS = ("scene_qa", "brief_caption", "facts_to_draft", "draft_to_note")
CHAT_WEIGHTS = (0.4, 0.15, 0.2, 0.25)
INSTRUCTIONS = {
    "en": {
        "brief_caption": "Summarize this scene in one short sentence:\n",
        "facts_to_draft": "Write a product description from these facts:\n",
        "draft_to_note": "Rewrite in note style:\n",
    },
    "zh": {
        "brief_caption": "用一句话简要概括这个场景：\n",
        "facts_to_draft": "根据以下信息写一段产品介绍：\n",
        "draft_to_note": "改写成笔记风格：\n",
    },
}


def _turns(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def chat_sample(seed: int, split: str, index: int) -> dict:
    """Chat ``index`` of ``split``: ``{"id", "kind", "messages": [user, assistant]}``, English or Chinese."""
    check_split(split)
    rng = item_rng(seed, "chat", split, index)
    kind = CHAT_KINDS[rng.choice(len(CHAT_KINDS), p=CHAT_WEIGHTS)]
    lang = ("en", "zh")[rng.integers(2)]
    if kind in ("scene_qa", "brief_caption"):
        scene = sample_scene(rng)
        if kind == "scene_qa":
            qa = scene_question(scene, rng, lang)
            messages = _turns(f"{caption(scene, lang)}\n{qa['question']}", qa["answer"])
        else:
            messages = _turns(INSTRUCTIONS[lang][kind] + caption(scene, lang), caption(scene, lang, "brief"))
    else:
        a = article(seed, split, int(rng.integers(2**31)), lang)
        if kind == "facts_to_draft":
            facts = "\n".join(f"{k}: {v}" for k, v in a["facts"].items())
            messages = _turns(INSTRUCTIONS[lang][kind] + facts, a["draft"])
        else:
            messages = _turns(INSTRUCTIONS[lang][kind] + a["draft"], a["reference"])
    return {"id": f"{split}-{index:06d}", "kind": kind, "messages": messages}


def chat_samples(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` chat samples ``{"id", "kind", "messages": [{"role", "content"}, ...]}`` of ``split``."""
    return [chat_sample(seed, split, i) for i in range(n)]
