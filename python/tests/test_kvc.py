"""kvc's Python package against its oracles.

Oracles:
- lossless configurations ("none:f32", no eviction): a float64 numpy attention
  (softmax(q k^T * scale) v, query head j reading KV head j // group);
- every other method: the same scenario run by kvc_python_oracle, a C++
  program calling kvc::make_cache without the binding (KVC_PYTHON_ORACLE, set
  by ctest). Equal bits there prove the binding hands kvc the same rows,
  positions and queries and returns what kvc computed; that each method
  computes what its paper says is the C++ tests' business (tests/cache, tests/policy).
"""

import copy
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kvc

LAYERS, KV_HEADS, QUERY_HEADS, HEAD_DIM = 2, 2, 4, 64  # GQA: group 2
# Long enough for every method to act: KIVI quantizes past its 128 + 32
# fp16 window, LagKV's chunks are 128, SnapKV's query window 64.
PROMPT, DECODE = 192, 6
SHAPE = dict(layers=LAYERS, kv_heads=KV_HEADS, query_heads=QUERY_HEADS, head_dim=HEAD_DIM)


def spec_of(method):
    """A spec running `method`, with what it needs beside it."""
    if method.family == "merging":
        return "snapkv:0.5 + " + method.name  # merging folds what eviction drops
    if method.family == "projection":
        return "none:f32 + " + method.name  # ThinK prunes rows stored as they are
    return method.name


UNCALIBRATED = [m for m in kvc.methods() if not m.calibrated]


def scenario(seed):
    """Per layer the prompt's (keys, values, queries); per step, per layer, one token's."""
    rng = np.random.default_rng(seed)

    def rows(tokens, heads):
        return rng.standard_normal((tokens, heads, HEAD_DIM)).astype(np.float32)

    # Queries scaled so that attention is peaked, not nearly uniform.
    prompt = [(rows(PROMPT, KV_HEADS), rows(PROMPT, KV_HEADS), 2 * rows(PROMPT, QUERY_HEADS)) for _ in range(LAYERS)]
    steps = [[(rows(1, KV_HEADS), rows(1, KV_HEADS), 2 * rows(1, QUERY_HEADS)[0]) for _ in range(LAYERS)]
             for _ in range(DECODE)]
    return prompt, steps


def prefill(cache, prompt):
    """Every layer's prompt appended at position 0 and attended as one chunk."""
    for layer, (keys, values, queries) in enumerate(prompt):
        cache.append(layer, keys, values, 0)
        cache.attend_chunk(layer, queries)


def run_python(cache, prompt, steps):
    """The oracle's scenario through the binding: outputs, tokens per (layer, head), bytes."""
    outputs = []
    for layer, (keys, values, queries) in enumerate(prompt):
        cache.append(layer, keys, values, 0)
        outputs.append(cache.attend_chunk(layer, queries).ravel())
    for step, per_layer in enumerate(steps):
        for layer, (key, value, query) in enumerate(per_layer):
            cache.append(layer, key, value, PROMPT + step)
            outputs.append(cache.attend(layer, query).ravel())
    tokens = [cache.tokens(l, h) for l in range(LAYERS) for h in range(KV_HEADS)]
    return np.concatenate(outputs), np.array(tokens, np.int64), cache.bytes


def run_cpp(spec, prompt, steps, tmp_path, evict_every=0):
    oracle = os.environ.get("KVC_PYTHON_ORACLE")
    if not oracle:
        pytest.skip("KVC_PYTHON_ORACLE (the C++ oracle, built with KVC_BUILD_TESTS) is not set; ctest sets it")
    source, result = tmp_path / "in.f32", tmp_path / "out.bin"
    with open(source, "wb") as f:
        for arrays in prompt:
            for a in arrays:
                f.write(a.tobytes())
        for per_layer in steps:
            for arrays in per_layer:
                for a in arrays:
                    f.write(a.tobytes())
    subprocess.run([oracle, spec, str(LAYERS), str(KV_HEADS), str(QUERY_HEADS), str(HEAD_DIM), str(PROMPT),
                    str(DECODE), str(evict_every), str(source), str(result)], check=True)
    data = result.read_bytes()
    floats = LAYERS * (PROMPT + DECODE) * QUERY_HEADS * HEAD_DIM
    outputs = np.frombuffer(data, np.float32, floats)
    ints = np.frombuffer(data, np.int64, offset=4 * floats)
    assert ints.size == LAYERS * KV_HEADS + 1
    return outputs, ints[:-1], int(ints[-1])


def kept_by(scores, keep, sinks=4, window=16):
    """The positions eviction keeps (evict::budget's defaults): the sinks, the
    newest `window`, and the best-scored of the rest up to `keep`; ascending."""
    middle = np.arange(sinks, len(scores) - window)
    best = middle[np.argsort(-np.asarray(scores, np.float64)[middle], kind="stable")[: keep - sinks - window]]
    return np.sort(np.concatenate([np.arange(sinks), best, np.arange(len(scores) - window, len(scores))]))


def reference(keys, values, queries, positions, scale):
    """float64 causal GQA attention: query i at positions[i] sees tokens 0..positions[i]."""
    k, v, q = (a.astype(np.float64) for a in (keys, values, queries))
    group = QUERY_HEADS // KV_HEADS
    out = np.zeros(q.shape)
    mass = np.zeros((KV_HEADS, k.shape[0]))
    for i, position in enumerate(positions):
        for j in range(QUERY_HEADS):
            h = j // group
            logits = k[: position + 1, h] @ q[i, j] * scale
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[i, j] = p @ v[: position + 1, h]
            mass[h, : position + 1] += p
    return out, mass


# --- the registry -------------------------------------------------------------


def test_methods_list_every_family_with_their_parameters():
    methods = kvc.methods()
    families = {m.family for m in methods}
    assert families == {"quantization", "eviction", "merging", "projection"}
    names = [m.name for m in methods]
    assert len(names) == len(set(names))
    for m in methods:
        assert m.summary and isinstance(m.calibrated, bool)
        # Every method's name is a spec, its default filled in.
        [(parsed, value)] = kvc.parse_spec(m.name)
        assert parsed.name == m.name and value == m.default
    calibrated = {m.name for m in methods if m.calibrated}
    assert {"kvquant", "qfilter", "head_roles"} <= calibrated
    snapkv = next(m for m in methods if m.name == "snapkv")
    assert (snapkv.id, snapkv.parameter, snapkv.default) == ("E5", "keep_ratio", "0.25")
    assert "snapkv" in repr(snapkv)


def test_parse_spec_reads_values_and_joined_names():
    terms = kvc.parse_spec(" kivi:4 + snapkv:0.5 ")
    assert [(m.name, v) for m, v in terms] == [("kivi", "4"), ("snapkv", "0.5")]
    # "q4_0+sinks" is one codec, not q4_0 and a method "sinks".
    assert [m.name for m, _ in kvc.parse_spec("q4_0+sinks + h2o")] == ["q4_0+sinks", "h2o"]


# --- every method, against C++ ------------------------------------------------


@pytest.mark.parametrize("method", UNCALIBRATED, ids=[m.name for m in UNCALIBRATED])
def test_every_method_matches_cpp_bit_for_bit(method, tmp_path):
    spec = spec_of(method)
    prompt, steps = scenario(seed=7)
    cache = kvc.Cache(spec, **SHAPE)
    outputs, tokens, size = run_python(cache, prompt, steps)
    cpp_outputs, cpp_tokens, cpp_size = run_cpp(spec, prompt, steps, tmp_path)
    assert outputs.dtype == np.float32 and np.all(np.isfinite(outputs))
    np.testing.assert_array_equal(outputs.view(np.uint32), cpp_outputs.view(np.uint32))
    np.testing.assert_array_equal(tokens, cpp_tokens)
    assert size == cpp_size
    # The spec took effect (the method is not silently dropped).
    appended = PROMPT + DECODE
    if method.family == "eviction" and method.name != "none" or method.family == "merging":
        assert tokens.min() < appended, spec
    if method.family == "quantization" and method.name != "none:f32" or method.family == "projection":
        f32 = kvc.Cache("none:f32", **SHAPE)
        assert size < run_python(f32, prompt, steps)[2], spec

def test_decode_time_eviction_matches_cpp(tmp_path):
    spec = "k8v4 + h2o:0.5 + compensation"
    prompt, steps = scenario(seed=8)
    outputs, tokens, size = run_python(kvc.Cache(spec, **SHAPE, evict_every=2), prompt, steps)
    cpp_outputs, cpp_tokens, cpp_size = run_cpp(spec, prompt, steps, tmp_path, evict_every=2)
    np.testing.assert_array_equal(outputs.view(np.uint32), cpp_outputs.view(np.uint32))
    np.testing.assert_array_equal(tokens, cpp_tokens)
    assert size == cpp_size


# --- lossless configurations against float64 numpy -----------------------------


@pytest.mark.parametrize("scale", [0.0, 0.3])
@pytest.mark.parametrize("spec,dtype", [("none:f32", np.float32), ("none:f32", np.float16), ("none:f16", np.float16)])
def test_lossless_attention_matches_float64_reference(spec, dtype, scale):
    # fp16 rows are stored exactly by none:f16 and by none:f32 (widened):
    # these caches lose nothing, so they must agree with exact attention.
    prompt, steps = scenario(seed=3)
    cache = kvc.Cache(spec, **SHAPE, scale=scale)
    logit_scale = scale if scale else 1 / np.sqrt(HEAD_DIM)
    assert cache.scale == pytest.approx(logit_scale)
    for layer, (keys, values, queries) in enumerate(prompt):
        keys, values = keys.astype(dtype), values.astype(dtype)
        cache.append(layer, keys, values, 0)
        chunk = 40  # the prompt's last 40 tokens, causally
        out, mass = cache.attend_chunk(layer, queries[-chunk:], mass=True)
        ref_out, ref_mass = reference(keys, values, queries[-chunk:], range(PROMPT - chunk, PROMPT), logit_scale)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * np.abs(ref_out).max())
        assert len(mass) == KV_HEADS and all(m.shape == (PROMPT,) for m in mass)
        np.testing.assert_allclose(np.stack(mass), ref_mass, rtol=1e-5, atol=1e-6 * chunk)
        # Decode: one query per head over the whole prompt.
        query = queries[-1]
        out, mass = cache.attend(layer, query, mass=True)
        ref_out, ref_mass = reference(keys, values, query[None], [PROMPT - 1], logit_scale)
        np.testing.assert_allclose(out, ref_out[0], rtol=1e-5, atol=1e-5 * np.abs(ref_out).max())
        np.testing.assert_allclose(np.stack(mass), ref_mass, rtol=1e-5, atol=1e-7)
        # Each query's probabilities sum to 1: a KV head's mass to its group.
        np.testing.assert_allclose(np.stack(mass).sum(axis=1), QUERY_HEADS // KV_HEADS, rtol=1e-5)
    assert cache.tokens(0) == KV_HEADS * PROMPT and cache.tokens(1, 0) == PROMPT


def test_strided_views_read_the_same_rows_as_contiguous_arrays():
    prompt, _ = scenario(seed=4)
    keys, values, queries = prompt[0]
    contiguous = kvc.Cache("q4_0", **SHAPE)
    contiguous.append(0, keys, values, 0)
    # Rows contiguous along head_dim, other strides not: viewed in place.
    wide = np.zeros((PROMPT, KV_HEADS, 2 * HEAD_DIM), np.float32)
    wide[:, :, HEAD_DIM:] = keys
    head_major_values = np.ascontiguousarray(values.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not wide[:, :, HEAD_DIM:].flags.c_contiguous and not head_major_values.flags.c_contiguous
    strided = kvc.Cache("q4_0", **SHAPE)
    strided.append(0, wide[:, :, HEAD_DIM:], head_major_values, 0)
    a = contiguous.attend_chunk(0, queries[-8:])
    b = strided.attend_chunk(0, queries[-8:])
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    assert contiguous.bytes == strided.bytes


# --- the cache's operations ---------------------------------------------------


def test_compress_keeps_the_budget_and_reports_positions():
    prompt, _ = scenario(seed=5)
    cache = kvc.Cache("snapkv:0.25", **SHAPE)
    prefill(cache, prompt)
    before = cache.bytes
    cache.compress(0)
    assert cache.tokens(0, 0) == PROMPT // 4 and cache.tokens(1, 0) == PROMPT  # layer 1 untouched
    cache.compress()
    assert cache.tokens(1) == KV_HEADS * PROMPT // 4 and cache.bytes < before
    assert cache.tokens_seen(0) == PROMPT and cache.next_position(0) == PROMPT
    for h in range(KV_HEADS):
        p = cache.positions(0, h)
        assert p.dtype == np.int32 and p.shape == (PROMPT // 4,)
        assert np.all(np.diff(p) > 0) and p[0] >= 0 and p[-1] < PROMPT
    # A policy that keeps an attention statistic reports it per held token.
    h2o = kvc.Cache("h2o:0.5", **SHAPE)
    h2o.append(0, *prompt[0][:2], 0)
    h2o.attend_chunk(0, prompt[0][2])
    assert h2o.attention_statistic(0, 1).shape == (PROMPT,)
    assert kvc.Cache("none:f32", **SHAPE).attention_statistic(0, 0) is None


def test_stored_bytes_are_the_rows_one_attention_reads():
    # From the layouts at head_dim 64: fp32 rows 64 x 4 bytes for K and V
    # each; q4_0 18 bytes per 32 values, so 36 a row. Layer 1 stays empty.
    prompt, _ = scenario(seed=6)
    for spec, per_token in [("none:f32", 2 * HEAD_DIM * 4), ("q4_0", 2 * 36)]:
        cache = kvc.Cache(spec, **SHAPE)
        cache.append(0, *prompt[0][:2], 0)
        assert cache.stored_bytes(0) == KV_HEADS * PROMPT * per_token, spec
        assert cache.stored_bytes(1) == 0 and cache.stored_bytes(0) <= cache.bytes
        with pytest.raises(kvc.error, match="layer"):
            cache.stored_bytes(LAYERS)


def test_external_scores_choose_what_eviction_keeps():
    prompt, _ = scenario(seed=6)
    keys, values, queries = prompt[0]
    cache = kvc.Cache("external:0.25", **SHAPE)
    cache.append(0, keys, values, 0)
    cache.attend_chunk(0, queries)
    wanted = np.arange(PROMPT, dtype=np.float32)[::-1].copy()  # earlier tokens score higher
    for h in range(KV_HEADS):
        cache.set_external_scores(0, h, wanted)
    cache.compress(0)
    for h in range(KV_HEADS):
        np.testing.assert_array_equal(cache.positions(0, h), kept_by(wanted, PROMPT // 4))
    with pytest.raises(kvc.error, match=r"expected scores of shape \[48\] float32"):
        cache.set_external_scores(0, 0, wanted)
    with pytest.raises(kvc.error, match="expected a cache whose eviction is 'external'"):
        kvc.Cache("none:f32", **SHAPE).set_external_scores(0, 0, np.zeros(0, np.float32))


def test_fork_copies_and_clear_empties():
    prompt, steps = scenario(seed=9)
    cache = kvc.Cache("kivi:2 + h2o:0.5", **SHAPE, evict_every=1)
    prefill(cache, prompt)
    twin = cache.fork()
    assert type(twin) is kvc.Cache and twin.spec == cache.spec
    # A copy holds the same tokens (its bytes may be fewer: it allocates no spare capacity).
    for c in (copy.copy(cache), copy.deepcopy(cache)):
        assert [c.positions(l, h).tolist() for l in range(LAYERS) for h in range(KV_HEADS)] == [
            cache.positions(l, h).tolist() for l in range(LAYERS) for h in range(KV_HEADS)]
    key, value, query = steps[0][0]
    twin.append(0, key, value, PROMPT)  # compresses the prompt, then stores the token
    assert twin.tokens_seen(0) == PROMPT + 1 and cache.tokens_seen(0) == PROMPT
    assert cache.tokens(0) == KV_HEADS * PROMPT  # the original is untouched
    cache.append(0, key, value, PROMPT)  # the same step on the original: the same state
    np.testing.assert_array_equal(twin.attend(0, query).view(np.uint32), cache.attend(0, query).view(np.uint32))
    assert twin.tokens(0) == cache.tokens(0) < KV_HEADS * PROMPT
    cache.clear()
    assert cache.tokens(0) == cache.tokens(1) == 0 and twin.tokens(0) > 0
    # A cleared cache starts again at position 0 as a new one does.
    fresh = kvc.Cache("kivi:2 + h2o:0.5", **SHAPE, evict_every=1)
    for c in (cache, fresh):
        c.append(0, *prompt[0][:2], 0)
    a, b = cache.attend_chunk(0, prompt[0][2][-4:]), fresh.attend_chunk(0, prompt[0][2][-4:])
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_save_and_load_continue_bit_for_bit_and_refuse_other_caches():
    prompt, steps = scenario(seed=13)
    cache = kvc.Cache("q4_0 + snapkv:0.25", **SHAPE)
    prefill(cache, prompt)
    data = cache.save()
    assert isinstance(data, bytes) and data[:8] == b"KVCCACHE"
    whole, by_layer = kvc.Cache("q4_0 + snapkv:0.25", **SHAPE), kvc.Cache("q4_0 + snapkv:0.25", **SHAPE)
    whole.load(bytearray(data))
    for layer in range(LAYERS):
        by_layer.load(memoryview(cache.save(layer)), layer=layer)
    assert whole.save() == by_layer.save() == data
    for step in steps:
        for layer, (key, value, query) in enumerate(step):
            position = cache.next_position(layer)
            outputs = []
            for c in (cache, whole, by_layer):
                c.append(layer, key, value, position)
                outputs.append(c.attend(layer, query).view(np.uint32))
            np.testing.assert_array_equal(outputs[0], outputs[1])
            np.testing.assert_array_equal(outputs[0], outputs[2])
    # Another codec, another budget, damaged bytes: refused, nothing changed.
    other = kvc.Cache("q8_0 + snapkv:0.25", **SHAPE)
    before = other.save()
    with pytest.raises(kvc.error, match="quantization policy"):
        other.load(data)
    with pytest.raises(kvc.error, match="keep.keep_ratio"):
        kvc.Cache("q4_0 + snapkv:0.5", **SHAPE).load(data)
    with pytest.raises(kvc.error, match="truncated"):
        other.load(data[:100])
    with pytest.raises(kvc.error, match="expected the bytes of save"):
        other.load(np.zeros((2, 2), dtype=np.uint8))
    assert other.save() == before


def test_threads_sharing_a_cache_get_sequential_results():
    prompt, _ = scenario(seed=10)
    shared, alone = kvc.Cache("q8_0", **SHAPE), kvc.Cache("q8_0", **SHAPE)
    results = {}

    def work(layer):
        keys, values, queries = prompt[layer]
        for start in range(0, PROMPT, 32):
            shared.append(layer, keys[start:start + 32], values[start:start + 32], start)
        results[layer] = shared.attend_chunk(layer, queries[-16:])

    threads = [threading.Thread(target=work, args=(layer,)) for layer in range(LAYERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for layer, (keys, values, queries) in enumerate(prompt):
        alone.append(layer, keys, values, 0)
        expected = alone.attend_chunk(layer, queries[-16:])
        np.testing.assert_array_equal(results[layer].view(np.uint32), expected.view(np.uint32))


def test_the_gil_is_released_while_kvc_attends():
    # A long attend_chunk (~0.1-0.2 s) in a thread: the main thread must run
    # Python during the middle half of the call. With the GIL held it runs
    # not once there (checked by removing the release: 0 iterations).
    tokens, kv_heads, query_heads, dim = 2048, 2, 8, 128
    rng = np.random.default_rng(17)
    cache = kvc.Cache("none:f32", 1, kv_heads, query_heads, dim)
    keys = rng.standard_normal((tokens, kv_heads, dim), dtype=np.float32)
    cache.append(0, keys, keys, 0)
    queries = rng.standard_normal((tokens, query_heads, dim), dtype=np.float32)
    span = []

    def work():
        start = time.perf_counter()
        cache.attend_chunk(0, queries)
        span.extend([start, time.perf_counter()])

    stamps = []
    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    start, end = span
    quarter = (end - start) / 4
    assert any(start + quarter < s < end - quarter for s in stamps), f"call of {end - start:.3f} s"


# --- bad input: a clear error, and the cache as it was ----------------------------

F32 = np.float32
GOOD = np.zeros((3, KV_HEADS, HEAD_DIM), F32)
BAD_ROWS = {
    "rank": (np.zeros((3, KV_HEADS * HEAD_DIM), F32), r"got \[3, 128\] float32"),
    "kv_heads": (np.zeros((3, 4, HEAD_DIM), F32), r"got \[3, 4, 64\] float32"),
    "head_dim": (np.zeros((3, KV_HEADS, 32), F32), r"got \[3, 2, 32\] float32"),
    "float64": (np.zeros((3, KV_HEADS, HEAD_DIM)), r"got \[3, 2, 64\] float64"),
    "int32": (np.zeros((3, KV_HEADS, HEAD_DIM), np.int32), r"got \[3, 2, 64\] int32"),
    "big-endian": (np.zeros((3, KV_HEADS, HEAD_DIM), ">f4"), r"got \[3, 2, 64\] >f4"),
    "strided rows": (np.zeros((3, KV_HEADS, 2 * HEAD_DIM), F32)[:, :, ::2], r"byte strides \(1024, 512, 8\)"),
    "reversed tokens": (np.zeros((3, KV_HEADS, HEAD_DIM), F32)[::-1], r"byte strides \(-512, 256, 4\)"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_bad_keys_raise_naming_expected_and_given(case):
    array, given = BAD_ROWS[case]
    cache = kvc.Cache("none:f32", **SHAPE)
    for keys, values, name in ((array, GOOD, "keys"), (GOOD, array, "values")):
        with pytest.raises(kvc.error) as raised:
            cache.append(0, keys, values, 0)
        message = str(raised.value)
        assert message.startswith("kvc.Cache.append: expected " + name)
        assert "[tokens, 2, 64]" in message or "in place" in message
        assert re.search(given, message), message
    assert cache.tokens(0) == 0


def test_other_bad_calls_raise_with_useful_messages():
    cache = kvc.Cache("none:f32", **SHAPE)
    cache.append(0, GOOD, GOOD, 0)
    cases = [
        (lambda: cache.append(0, GOOD, GOOD.astype(np.float16), 3), kvc.error,
         r"same shape and dtype, got keys \[3, 2, 64\] float32 and values \[3, 2, 64\] float16"),
        (lambda: cache.append(0, GOOD, GOOD[:2], 3), kvc.error, "same shape and dtype"),
        (lambda: cache.append(0, GOOD, GOOD, 2), kvc.error, "must be greater than the last appended position 2"),
        (lambda: cache.append(5, GOOD, GOOD, 3), kvc.error, "layer"),
        (lambda: cache.append(0, GOOD.tolist(), GOOD, 3), TypeError, "expected keys as a numpy array, got list"),
        (lambda: cache.attend(0, np.zeros((QUERY_HEADS, HEAD_DIM), np.float16)), kvc.error,
         r"expected queries of shape \[4, 64\] \[query_heads, head_dim\], C-contiguous float32 .*got \[4, 64\] float16"),
        (lambda: cache.attend(0, np.zeros((HEAD_DIM, QUERY_HEADS), F32).T), kvc.error, r"\(not C-contiguous\)"),
        (lambda: cache.attend(0, np.zeros((2, HEAD_DIM), F32)), kvc.error, r"got \[2, 64\] float32"),
        (lambda: cache.attend_chunk(0, np.zeros((QUERY_HEADS, HEAD_DIM), F32)), kvc.error,
         r"expected queries of shape \[chunk, 4, 64\]"),
        (lambda: cache.attend_chunk(0, np.zeros((4, QUERY_HEADS, HEAD_DIM), F32)), kvc.error, r"chunk in 1\.\.3"),
        (lambda: cache.positions(0, 7), kvc.error, "head"),
        (lambda: cache.compress(9), kvc.error, "layer"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


BAD_SPECS = {
    "snapk": "unknown method 'snapk'.*close: snapkv",
    "snapkv:1.5": r"'snapkv:1.5': expected snapkv:keep_ratio with a number in \(0, 1\], got '1.5'",
    "kivi:3": "expected kivi:2 or kivi:4",
    "q4_0 + q8_0": "expected one quantization method, got 'q4_0' and 'q8_0'",
    "q4_0 + ": "empty term",
    "cam": "expected an eviction policy, got none",
    "qfilter:0.5": r"expected its calibration artifact in cache_options::artifacts\[\"qfilter\"\], got none",
    "q4_0 + think": "expected the codec none:f32, none:f16 or none:bf16",
}


@pytest.mark.parametrize("spec", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_specs_raise_naming_the_term(spec):
    with pytest.raises(kvc.error, match=BAD_SPECS[spec]):
        kvc.Cache(spec, **SHAPE)


def test_bad_shapes_and_options_raise():
    with pytest.raises(kvc.error, match="expected query_heads a positive multiple of kv_heads"):
        kvc.Cache("none:f32", layers=1, kv_heads=2, query_heads=3, head_dim=64)
    with pytest.raises(kvc.error, match="expected storage 'f32', 'f16' or 'bf16', got 'f64'"):
        kvc.Cache("none", **SHAPE, storage="f64")
    with pytest.raises(kvc.error, match="expected artifacts as a dict"):
        kvc.Cache("none", **SHAPE, artifacts=["qfilter"])
    assert issubclass(kvc.error, ValueError)


def test_a_cache_survives_failed_calls_unchanged():
    prompt, steps = scenario(seed=11)
    cache = kvc.Cache("q4_0 + h2o:0.5", **SHAPE, evict_every=1)
    prefill(cache, prompt)
    key, value, query = steps[0][0]
    cache.append(0, key, value, PROMPT)  # decode: the prompt is compressed

    def state(c):
        return (c.bytes, [c.tokens(l, h) for l in range(LAYERS) for h in range(KV_HEADS)],
                [c.positions(l, h).tolist() for l in range(LAYERS) for h in range(KV_HEADS)],
                [c.attention_statistic(l, h).tolist() for l in range(LAYERS) for h in range(KV_HEADS)])

    witness = cache.fork()
    before = state(cache)
    failing = [
        lambda: cache.append(0, key.astype(np.float64), value, PROMPT + 1),
        lambda: cache.append(0, key, value[:, :1], PROMPT + 1),
        lambda: cache.append(0, key, value, PROMPT),  # position already used
        lambda: cache.append(0, key, value, 2**31),  # past int32 positions
        lambda: cache.attend(0, query[:2]),
        lambda: cache.attend_chunk(0, np.zeros((PROMPT * 2, QUERY_HEADS, HEAD_DIM), F32)),
        lambda: cache.compress(LAYERS),
    ]
    for call in failing:
        with pytest.raises(kvc.error):
            call()
        assert state(cache) == before
    # And it goes on exactly as the copy taken before the failures.
    for c in (cache, witness):
        c.append(0, key, value, PROMPT + 1)
    np.testing.assert_array_equal(cache.attend(0, query).view(np.uint32), witness.attend(0, query).view(np.uint32))
    assert state(cache)[1:] == state(witness)[1:]  # bytes aside: a copy allocates no spare capacity


# --- calibration artifacts ----------------------------------------------------


def test_artifacts_round_trip_and_feed_calibrated_methods(tmp_path):
    rng = np.random.default_rng(12)
    filters = rng.standard_normal((LAYERS, KV_HEADS, HEAD_DIM)).astype(np.float32)
    artifact = kvc.Artifact("qfilter", {"filters": filters})
    path = tmp_path / "qfilter.kvccal"
    artifact.save(str(path))
    loaded = kvc.load_artifact(str(path))
    assert loaded.kind == "qfilter" and list(loaded.tensors) == ["filters"]
    np.testing.assert_array_equal(loaded.tensors["filters"], filters)
    prompt, _ = scenario(seed=12)
    by_object = kvc.Cache("qfilter:0.25", **SHAPE, artifacts={"qfilter": artifact})
    by_path = kvc.Cache("qfilter:0.25", **SHAPE, artifacts={"qfilter": path})
    for c in (by_object, by_path):
        c.append(0, *prompt[0][:2], 0)
        c.compress(0)
    assert by_object.tokens(0, 0) == PROMPT // 4
    np.testing.assert_array_equal(by_object.positions(0, 1), by_path.positions(0, 1))
    # Q-Filters keeps the keys most along the filter, <f, k> (keys as stored, fp16).
    for h in range(KV_HEADS):
        keys = prompt[0][0][:, h].astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(by_object.positions(0, h), kept_by(keys @ filters[0, h], PROMPT // 4))
    with pytest.raises(kvc.error, match=r"calibration is for \[2\]\[2\]\[32\] .*the cache is \[2\]\[2\]\[64\]"):
        kvc.Cache("qfilter", **SHAPE, artifacts={"qfilter": kvc.Artifact("qfilter", {"filters": filters[:, :, :32].copy()})})
    corrupt = tmp_path / "corrupt.kvccal"
    corrupt.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(kvc.error):
        kvc.load_artifact(str(corrupt))
    with pytest.raises(kvc.error, match="C-contiguous float32"):
        kvc.Artifact("qfilter", {"filters": filters.astype(np.float64)})


# --- the README's example -----------------------------------------------------


def test_readme_python_example_runs():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "README.md has no ```python block"
    exec(compile(blocks[0], "README.md", "exec"), {})


# --- calibration ----------------------------------------------------------------


def test_query_filters_are_the_top_eigenvector_of_the_query_moment():
    rng = np.random.default_rng(13)
    group = QUERY_HEADS // KV_HEADS
    queries = []
    for _ in range(LAYERS):
        # A planted direction per KV head (a clear eigengap) plus noise.
        directions = rng.standard_normal((KV_HEADS, HEAD_DIM))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        q = 3 * np.repeat(directions, group, axis=0)[None] * rng.uniform(0.5, 1.5, (80, QUERY_HEADS, 1))
        queries.append((q + 0.3 * rng.standard_normal(q.shape)).astype(np.float32))
    artifact = kvc.calibration.query_filters(queries, kv_heads=KV_HEADS)
    assert artifact.kind == "qfilter"
    filters = artifact.tensors["filters"]
    assert filters.shape == (LAYERS, KV_HEADS, HEAD_DIM)
    for layer in range(LAYERS):
        for h in range(KV_HEADS):
            rows = queries[layer][:, h * group:(h + 1) * group].reshape(-1, HEAD_DIM).astype(np.float64)
            _, vectors = np.linalg.eigh(rows.T @ rows)
            top = vectors[:, -1] * np.sign(vectors[:, -1] @ rows.sum(axis=0))
            np.testing.assert_allclose(filters[layer, h], top, atol=1e-5)
    cache = kvc.Cache("qfilter:0.25", **SHAPE, artifacts={"qfilter": artifact})
    prompt, _ = scenario(seed=13)
    cache.append(0, *prompt[0][:2], 0)
    cache.compress(0)
    assert cache.tokens(0, 0) == PROMPT // 4
    with pytest.raises(kvc.error, match="expected query_heads a positive multiple of kv_heads"):
        kvc.calibration.query_filters(queries, kv_heads=3)
    with pytest.raises(kvc.error, match=r"expected queries of shape \[tokens, 4, 64\].*got \[80, 4, 32\]"):
        kvc.calibration.query_filters([queries[0], queries[1][:, :, :32]], kv_heads=KV_HEADS)
    with pytest.raises(kvc.error, match="non-empty list"):
        kvc.calibration.query_filters([], kv_heads=KV_HEADS)


def test_head_roles_measure_far_attention_as_the_float64_definition():
    rng = np.random.default_rng(14)
    tokens, sinks, window, group = 60, 4, 16, QUERY_HEADS // KV_HEADS
    keys = [rng.standard_normal((tokens, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(LAYERS)]
    queries = [2 * rng.standard_normal((tokens, QUERY_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(LAYERS)]
    artifact = kvc.calibration.head_roles(keys, queries, sinks=sinks, window=window, threshold=0.3)
    far = artifact.tensors["far_mass"]
    scale = 1 / np.sqrt(HEAD_DIM)
    for layer in range(LAYERS):
        for h in range(KV_HEADS):
            masses = []
            for i in range(sinks + window, tokens):
                for j in range(h * group, (h + 1) * group):
                    logits = keys[layer][: i + 1, h].astype(np.float64) @ queries[layer][i, j].astype(np.float64)
                    p = np.exp(scale * logits - scale * logits.max())
                    t = np.arange(i + 1)
                    masses.append(p[(t >= sinks) & (t + window < i)].sum() / p.sum())
            assert far[layer, h] == pytest.approx(np.mean(masses), rel=1e-5)
    np.testing.assert_array_equal(artifact.tensors["retrieval"], (far >= 0.3).astype(np.float32))
    # B6 from an artifact: retrieval heads keep every token, streaming heads
    # the sinks and the newest 16 (the registry's head_roles).
    roles = np.array([[1, 0], [0, 1]], np.float32)
    marked = kvc.Artifact("head_roles", {"far_mass": far, "retrieval": roles})
    cache = kvc.Cache("head_roles:0.5", **SHAPE, artifacts={"head_roles": marked})
    prompt, _ = scenario(seed=14)
    for layer in range(LAYERS):
        cache.append(layer, *prompt[layer][:2], 0)
    cache.compress()
    assert [[cache.tokens(l, h) for h in range(KV_HEADS)] for l in range(LAYERS)] == [[PROMPT, 20], [20, PROMPT]]


def test_cq_codebooks_reproduce_rows_drawn_from_few_patterns():
    # Every 4-channel slice of the samples is one of 8 patterns per group:
    # k-means with 256 centroids finds them all, so rows made of the same
    # patterns are stored exactly and attention matches float64.
    rng = np.random.default_rng(15)
    groups, patterns = HEAD_DIM // 4, 8
    books = rng.standard_normal((LAYERS, KV_HEADS, groups, patterns, 4)).astype(np.float32)

    def rows(layer, tokens):
        pick = rng.integers(0, patterns, (tokens, KV_HEADS, groups))
        out = np.empty((tokens, KV_HEADS, groups, 4), np.float32)
        for h in range(KV_HEADS):
            out[:, h] = books[layer, h][np.arange(groups), pick[:, h]]
        return out.reshape(tokens, KV_HEADS, HEAD_DIM)

    keys = [rows(l, 256) for l in range(LAYERS)]
    values = [rows(l, 256) for l in range(LAYERS)]
    artifact = kvc.calibration.cq(keys, values, channels_per_group=4, bits=8)
    assert artifact.kind == "cq"
    assert artifact.tensors["key_codebooks"].shape == (LAYERS, KV_HEADS, groups, 256, 4)
    cache = kvc.Cache("cq:c4b8", **SHAPE, artifacts={"cq:c4b8": artifact})
    k, v = rows(0, 40), rows(0, 40)
    queries = rng.standard_normal((8, QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    cache.append(0, k, v, 0)
    out = cache.attend_chunk(0, queries)
    ref, _ = reference(k, v, queries, range(32, 40), 1 / np.sqrt(HEAD_DIM))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(kvc.error, match="kvc::calibration::calibrate_cq"):
        kvc.calibration.cq(keys, values, channels_per_group=3)


def test_kvquant_key_ranges_are_per_channel_quantiles():
    rng = np.random.default_rng(16)
    keys = [rng.standard_normal((300, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(LAYERS)]
    values = [rng.standard_normal((300, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(LAYERS)]
    artifact = kvc.calibration.kvquant(keys, values, bits=3, outlier_fraction=0.02)
    lower, upper = artifact.tensors["key_lower"], artifact.tensors["key_upper"]
    for layer in range(LAYERS):
        # numpy's default quantile interpolates linearly between order statistics, as kvc does.
        np.testing.assert_allclose(lower[layer], np.quantile(keys[layer].astype(np.float64), 0.01, axis=0), rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(upper[layer], np.quantile(keys[layer].astype(np.float64), 0.99, axis=0), rtol=1e-6,
                                   atol=1e-6)
    assert artifact.tensors["key_codebook"].shape == (LAYERS, 8)
    cache = kvc.Cache("kvquant", **SHAPE, artifacts={"kvquant": artifact}, rope_theta=10000.0)
    prompt, _ = scenario(seed=16)
    cache.append(0, *prompt[0][:2], 0)
    assert np.all(np.isfinite(cache.attend_chunk(0, prompt[0][2][-8:])))
    with pytest.raises(kvc.error, match="expected bits 2, 3 or 4, got 5"):
        kvc.calibration.kvquant(keys, values, bits=5)
    with pytest.raises(kvc.error, match="RoPE theta"):
        kvc.Cache("kvquant", **SHAPE, artifacts={"kvquant": artifact}, rope_theta=-1.0)
