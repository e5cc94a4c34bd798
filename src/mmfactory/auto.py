"""``import mmfactory.auto`` registers every mmfactory model type with transformers' ``AutoConfig`` /
``AutoModel``, so any ``final/`` folder loads with ``AutoModel.from_pretrained(folder)``.

It is a module of its own, not ``import mmfactory``, so that the CLI starts without importing torch and
transformers (``mmfactory recipes`` in 0.2 s rather than seconds).
"""

import mmfactory.mars.judge  # noqa: F401  (each import registers its model types)
import mmfactory.models.av_llm  # noqa: F401
import mmfactory.models.components.vq  # noqa: F401
import mmfactory.models.dual_encoder  # noqa: F401
import mmfactory.models.mllm  # noqa: F401
import mmfactory.models.vision_mamba  # noqa: F401
