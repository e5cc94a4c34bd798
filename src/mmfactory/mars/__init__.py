"""MARS's glue: training sequences (:mod:`~mmfactory.mars.sequences`), sampling with classifier-free
guidance (:mod:`~mmfactory.mars.sampling`), the consistency judge (:mod:`~mmfactory.mars.judge`) and the
evaluation (:mod:`~mmfactory.mars.evaluate`). The model is :mod:`mmfactory.models.t2i`."""
