"""kvc: key/value cache compression for transformer inference (Python binding of the C++ library).

    import numpy as np
    import kvc

    cache = kvc.Cache("kivi:2 + snapkv:0.25", layers=1, kv_heads=2, query_heads=8, head_dim=64)
    keys = np.random.randn(512, 2, 64).astype(np.float32)     # [tokens, kv_heads, head_dim]
    cache.append(0, keys, keys, 0)                           # viewed in place, not copied
    out = cache.attend_chunk(0, np.random.randn(512, 8, 64).astype(np.float32))
    cache.compress()
    print(cache.tokens(0), cache.bytes)

kvc.methods() lists every method a spec may name; errors in arguments raise
kvc.error (a ValueError) with kvc's message. See README.md, "Python".
"""

from . import calibration
from ._kvc import Artifact, Cache, Method, error, load_artifact, methods, parse_spec

__all__ = ["Artifact", "Cache", "Method", "calibration", "error", "load_artifact", "methods", "parse_spec"]
