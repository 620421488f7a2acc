"""Calibration: the artifacts kvc's calibrated methods are built from.

    filters = kvc.calibration.query_filters([queries_layer0, queries_layer1], kv_heads=2)
    cache = kvc.Cache("qfilter:0.25", 2, 2, 8, 64, artifacts={"qfilter": filters})

Each function takes one float32 array per layer ([tokens, heads, head_dim],
viewed in place) and returns a kvc.Artifact (artifact.save(path) writes it).
"""

from ._kvc import calibration as _compiled

cq = _compiled.cq
head_roles = _compiled.head_roles
kvquant = _compiled.kvquant
query_filters = _compiled.query_filters

__all__ = ["cq", "head_roles", "kvquant", "query_filters"]
