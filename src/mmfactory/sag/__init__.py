"""SAG: style-aligned article generation by a frozen LLM and a small stylist LM (arXiv 2410.03137).

The frozen LLM follows the instruction and writes a neutral, factual draft from the source facts; the
stylist rewrites the draft in the target style. The stylist is trained by S-SFT (draft -> styled
article), C-DPO (faithful vs hallucinated article, against the S-SFT stylist) and self-improvement
rounds (its own samples that pass a style scorer and a fact check join the S-SFT data). NoteBench scores
ROUGE-L, BLEU-4, contradicted and unsupported claims, fact recall and style.

    config        a SAG stage's settings: drafter, articles, NoteBench systems, self-improvement
    stage         what every SAG stage shares: articles, prepared drafts, style scorer, NoteBench
    data          articles (world or JSONL), prompt templates, C-DPO negatives
    pipeline      the collaboration: batched drafting and restyling
    style         the style scorer (logistic regression on character n-grams)
    self_improve  the self-improvement filter (style + facts) and a round's prepared samples
    notebench     NoteBench scores and the comparison table

The stages (tasks ``sag_stylist_sft``, ``sag_cdpo``, ``sag_self_improve``) live in
:mod:`mmfactory.tasks.sag`; the recipes are ``sag/tiny`` and ``sag/smollm2``.
"""
