"""LLaVA-MoD's own glue (arXiv 2408.15881), used by its tasks (:mod:`mmfactory.tasks.llava_mod`):

* :mod:`~mmfactory.llava_mod.teacher`: loading the frozen teacher, and the teacher signal of mimic
  distillation, chosen once per stage: the teacher online, or its top-K log-probs stored by the stage's
  prepare step;
* :mod:`~mmfactory.llava_mod.on_policy`: on-policy preference pairs sampled from the student and judged
  against the ground truth, stored by the stage's prepare step.
"""
