"""Every method's claim in miniature: the registry of claims and checks (:mod:`.claims`, ``claims.yaml``)
and ``mmfactory reproduce``, which runs the recipes per seed and writes the claims table (:mod:`.run`)."""
