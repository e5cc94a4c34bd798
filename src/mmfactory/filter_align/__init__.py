"""Filter & Align's data-curation tools: score a pool of image-text pairs with a reward model
(:mod:`~mmfactory.filter_align.score`) and keep its top fraction (:mod:`~mmfactory.filter_align.select`)."""
