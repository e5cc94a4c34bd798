"""``mmfactory report RUN_DIR``: one self-contained HTML file for a run folder or a ``reproduce`` folder.

Sections: the claims table (a ``reproduce`` folder's ``claims.json``), then per recipe run its loss and
metric curves (from each stage's ``metrics.jsonl``), its comparison table (the recipe's ``compare`` metrics,
or every stage's evaluation metrics), the examples its stages wrote (:mod:`mmfactory.examples`) and the
figures they saved, and last the environment the runs recorded. Images are embedded as base64 PNGs; the
page loads nothing from anywhere else.
"""

from mmfactory.report.page import write_report

__all__ = ["write_report"]
