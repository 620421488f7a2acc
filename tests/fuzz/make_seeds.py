#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (tests/fuzz/corpus/<target>/): small
valid inputs of every kind each parser accepts, so the fuzzer starts past the
magic, the checksum and the header checks. Run from anywhere; deterministic."""
import os
import struct
import zlib

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    os.makedirs(os.path.join(here, target), exist_ok=True)
    with open(os.path.join(here, target, name), "wb") as f:
        f.write(data)


def artifact(kind, tensors):
    """calibration/artifact.hpp's format: magic, version, kind, tensors, CRC-32."""
    def string(s):
        b = s.encode()
        return struct.pack("<I", len(b)) + b
    out = b"KVCCALIB" + struct.pack("<I", 1) + string(kind) + struct.pack("<I", len(tensors))
    for name, shape, values in tensors:
        count = 1
        for e in shape:
            count *= e
        assert len(values) == count, name
        out += string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", e) for e in shape)
        out += b"".join(struct.pack("<f", v) for v in values)
    return out + struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)


# All for the fuzz target's cache shape: 1 layer, 1 KV head, head_dim 8.
L, H, D = 1, 1, 8
write("artifact", "qfilter.bin", artifact("qfilter", [("filters", [L, H, D], [0.1 * i for i in range(D)])]))
write("artifact", "head_roles.bin", artifact("head_roles", [("retrieval", [L, H], [1.0])]))
c, b = 2, 2  # channels per group, bits
book = [0.25 * i - 0.5 for i in range(L * H * (D // c) * (1 << b) * c)]
write("artifact", "cq.bin", artifact("cq", [
    ("channels_per_group", [1], [float(c)]), ("bits", [1], [float(b)]),
    ("key_codebooks", [L, H, D // c, 1 << b, c], book), ("value_codebooks", [L, H, D // c, 1 << b, c], book)]))
bits = 2
write("artifact", "kvquant.bin", artifact("kvquant", [
    ("bits", [1], [float(bits)]), ("outlier_fraction", [1], [0.01]),
    ("key_lower", [L, H, D], [-1.0] * D), ("key_upper", [L, H, D], [1.0] * D),
    ("key_codebook", [L, 1 << bits], [-1.0, -0.3, 0.3, 1.0]),
    ("value_codebook", [L, 1 << bits], [-1.0, -0.3, 0.3, 1.0])]))
write("artifact", "empty.bin", artifact("", []))


def tokenizer(pieces, max_length):
    out = struct.pack("<i", max_length)
    for i, p in enumerate(pieces):
        b = p.encode()
        out += struct.pack("<f", -float(i)) + struct.pack("<i", len(b)) + b
    return out


# Input = 2 bytes choosing the vocabulary (259 + value % 1024), then the file.
special = ["<unk>", "<s>", "</s>"]
byte_pieces = ["<0x%02X>" % i for i in range(256)]
write("tokenizer", "bytes_only.bin", struct.pack(">H", 0) + tokenizer(special + byte_pieces, 8))
words = [" a", " t", "he", " the", " on", "ce", " once", "\u00e9"]
write("tokenizer", "merges.bin", struct.pack(">H", len(words)) + tokenizer(special + byte_pieces + words, 8))


def checkpoint(dim, hidden, layers, heads, kv_heads, vocab, context, shared=True):
    """llama2.c version 0: 7 int32 header, then fp32 weights (model.hpp's weight_floats)."""
    head_dim = dim // heads
    kv = kv_heads * head_dim
    n = vocab * dim + layers * (dim + 2 * dim * dim + 2 * kv * dim) + layers * (dim + 3 * hidden * dim)
    n += dim + 2 * context * (head_dim // 2)
    if not shared:
        n += vocab * dim
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, context)
    return header + b"".join(struct.pack("<f", ((i * 37) % 17 - 8) / 16.0) for i in range(n))


write("model", "tiny_shared.bin", checkpoint(8, 8, 1, 2, 1, 4, 4))
write("model", "tiny_separate.bin", checkpoint(4, 4, 1, 1, 1, 3, 2, shared=False))


# cache_api: byte 0 picks the cache (even: full_cache, odd: H2O compressed_cache
# + a budget byte), then calls: op, layer, arguments (cache_api_fuzz.cpp).
def append(layer, count, where=0, fill=7):
    return bytes([0, layer, count, 1]) + bytes([(fill * (i + 1)) % 256 for i in range(2 * count * 2 * 8)]) + bytes([where])


def attend(layer, mass=1):
    return bytes([2, layer]) + bytes([(13 * i) % 256 for i in range(4 * 8)]) + bytes([mass])


prefill = append(0, 5) + append(1, 5) + append(0, 5, fill=11) + append(1, 5, fill=3)
decode = b"".join(append(l, 1, fill=5 + i) + attend(l) for i in range(4) for l in (0, 1))
write("cache_api", "full.bin", bytes([0]) + prefill + decode + bytes([3, 0, 2]) + bytes([7, 0]))
write("cache_api", "h2o.bin", bytes([1, 8 * 1 + 2]) + prefill + decode + bytes([4, 0, 4, 1, 5, 0, 20, 6, 0, 1]))
write("cache_api", "h2o_clear.bin", bytes([1, 0]) + prefill + bytes([6, 0, 0]) + prefill + bytes([4, 2]))


# parse_spec: spec text (kvc/registry.hpp). Every method alone, as written
# with and without its value, the combinations the docs use, and malformed
# specs the parser must refuse (a near name, an empty term, two codecs, a
# value out of range or where none is taken).
specs = {
    # quantization
    "none_f32": "none:f32", "none_f16": "none:f16", "none_bf16": "none:bf16", "q8_0": "q8_0", "q4_0": "q4_0",
    "q4_1": "q4_1", "int8": "int8:g64", "int4": "int4:g64", "int2": "int2:g32", "e4m3": "fp8:e4m3",
    "e5m2": "fp8:e5m2", "k8v4": "k8v4", "k4v2": "k4v2", "sinks": "q4_0+sinks", "kivi": "kivi", "kivi4": "kivi:4",
    "gear": "gear", "hadamard": "hadamard:q4_0", "hadamard_kv": "hadamard:k4v2", "sparse": "sparse:0.7",
    "cq": "cq:c4b8", "cq8": "cq:c8b8", "kvquant": "kvquant", "mixed": "mixed:int8/int2:0.3",
    "mixed4": "mixed:int4/int2",
    # eviction
    "streaming": "streaming:0.5", "h2o": "h2o:0.3", "a2sf": "a2sf", "scissorhands": "scissorhands:0.5",
    "tova": "tova:0.4", "knorm": "knorm", "keydiff": "keydiff:0.6", "expected": "expected_attention:0.5",
    "qfilter": "qfilter:0.25", "lagkv": "lagkv", "lagkv16": "lagkv16:0.5", "leverage": "leverage:0.5",
    "cur": "cur", "value_weighted": "value_weighted:0.5", "hash": "hash_evict:0.5", "global_local": "global_local",
    "random": "random:0.5", "external": "external:0.5", "adakv": "adakv:0.3", "pyramidkv": "pyramidkv",
    "chunkkv": "chunkkv:0.5", "head_roles": "head_roles:0.5",
    # merging and projection
    "cam": "h2o:0.5 + cam", "similarity": "snapkv + similarity", "zero_merge": "tova:0.5 + zero_merge",
    "merge_none": "snapkv:0.5 + merge:none", "think": "think:0.5", "pca": "none:f16 + pca:16",
    "loki": "loki:16:0.25",
    # the docs' combinations
    "readme": "kivi:2 + snapkv:0.25", "rows_snapkv": "none:f16 + snapkv:0.25", "q4_snapkv": "q4_0 + snapkv:0.25",
    "three": "q4_0 + h2o:0.5 + compensation", "spaced": " compensation+ h2o:0.5 + q4_0+sinks ",
    "think_rows": "none:f32 + think:0.4", "empty": "",
    # malformed
    "near": "snapvk:0.25", "empty_term": "kivi:2 ++ snapkv", "two_codecs": "q4_0 + kivi:2",
    "out_of_range": "snapkv:1.5", "not_a_number": "h2o:abc", "value_not_taken": "q4_0:3", "kivi3": "kivi:3",
    "loki_no_ratio": "loki:16", "pca_fraction": "pca:2.5", "trailing_plus": "tova:0.5 +", "colon": "snapkv:",
}
for name, spec in specs.items():
    write("parse_spec", name + ".txt", spec.encode())
