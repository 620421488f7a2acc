#!/usr/bin/env python3
"""Compare kvc methods on a real model's keys, values and queries.

    build/rel/examples/engine/kvc-attention-error --model models/kvref/model.bin --dump rows/
    PYTHONPATH=build/rel/python python3 examples/python/compare_methods.py rows/ \\
        none:f16 q4_0 kivi:2 "snapkv:0.25" "kivi:2 + snapkv:0.25" --plot methods.png

Each method (a kvc spec) replays every dumped window the way an engine drives
its cache (the prompt appended and attended in chunks, then one token at a
time), and each decode step's attention output is compared with exact
attention (float64, every token) on the same rows:

    error = ||out - exact|| / ||exact||    per query head, layer and decode step

The table gives its mean and maximum, the cache's bytes after the last step
and the share of tokens it still holds; --plot draws error against bytes
(matplotlib, Debian's python3-matplotlib). Calibrated methods (qfilter,
head_roles, cq:*) learn from the last window and are scored on the others;
kvquant needs keys before RoPE, which the dump does not hold.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import kvc


def load(directory):
    meta = json.loads((directory / "meta.json").read_text())
    rows = {name: np.load(directory / f"{name}.npy") for name in ("keys", "values", "queries")}
    return meta, rows


def exact_decode(keys, values, queries, prompt, scale):
    """float64 attention of each decode step's queries over every token up to it (GQA)."""
    tokens, kv_heads, dim = keys.shape
    group = queries.shape[1] // kv_heads
    k = np.repeat(keys.astype(np.float64), group, axis=1)  # [tokens, query_heads, dim]
    v = np.repeat(values.astype(np.float64), group, axis=1)
    out = []
    for t in range(prompt, tokens):
        logits = np.einsum("hd,thd->ht", queries[t].astype(np.float64), k[: t + 1]) * scale
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out.append(np.einsum("ht,thd->hd", p, v[: t + 1]))
    return np.stack(out)  # [steps, query_heads, dim]


def artifacts_for(spec, meta, rows):
    """Calibration artifacts for the calibrated methods of `spec`, learnt from the last window."""
    artifacts = {}
    for method, _ in kvc.parse_spec(spec):
        if not method.calibrated:
            continue
        if meta["windows"] < 2:
            sys.exit(f"compare_methods: {method.name} learns from the last window; dump at least 2 windows")
        keys, values, queries = (list(rows[n][-1]) for n in ("keys", "values", "queries"))
        if method.name == "qfilter":
            artifacts["qfilter"] = kvc.calibration.query_filters(queries, kv_heads=meta["kv_heads"])
        elif method.name == "head_roles":
            artifacts["head_roles"] = kvc.calibration.head_roles(keys, queries, scale=meta["scale"])
        elif method.name.startswith("cq:"):
            channels = 4 if method.name == "cq:c4b8" else 8
            artifacts[method.name] = kvc.calibration.cq(keys, values, channels_per_group=channels, bits=8)
        else:
            sys.exit(f"compare_methods: {method.name} needs keys before RoPE, which --dump does not write")
    return artifacts


def measure(spec, meta, rows, exact):
    artifacts = artifacts_for(spec, meta, rows)
    windows = meta["windows"] - 1 if artifacts else meta["windows"]
    prompt, chunk, layers = meta["prompt"], meta["chunk"], meta["layers"]
    errors, sizes, kept = [], [], []
    for w in range(windows):
        cache = kvc.Cache(spec, layers, meta["kv_heads"], meta["query_heads"], meta["head_dim"],
                          scale=meta["scale"], artifacts=artifacts or None)
        for layer in range(layers):
            keys, values, queries = (rows[n][w, layer] for n in ("keys", "values", "queries"))
            for start in range(0, prompt, chunk):
                end = min(start + chunk, prompt)
                cache.append(layer, keys[start:end], values[start:end], start)
                cache.attend_chunk(layer, queries[start:end])
        tokens = rows["keys"].shape[2]
        for t in range(prompt, tokens):
            for layer in range(layers):
                keys, values, queries = (rows[n][w, layer] for n in ("keys", "values", "queries"))
                cache.append(layer, keys[t:t + 1], values[t:t + 1], t)
                out = cache.attend(layer, queries[t])
                reference = exact[w][layer][t - prompt]
                errors.append(np.linalg.norm(out - reference, axis=1) / np.linalg.norm(reference, axis=1))
        sizes.append(cache.bytes)
        kept.append(sum(cache.tokens(l) for l in range(layers)) / (layers * meta["kv_heads"] * tokens))
    errors = np.concatenate(errors)
    return {"spec": spec, "error_mean": float(errors.mean()), "error_max": float(errors.max()),
            "bytes": int(np.mean(sizes)), "kept": float(np.mean(kept))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", type=Path, help="directory written by kvc-attention-error --dump")
    parser.add_argument("specs", nargs="+", help="kvc specs, e.g. q4_0 'kivi:2 + snapkv:0.25' (kvc.methods())")
    parser.add_argument("--plot", type=Path, help="save error against bytes here (PNG)")
    args = parser.parse_args()
    meta, rows = load(args.dump)
    exact = [[exact_decode(rows["keys"][w, l], rows["values"][w, l], rows["queries"][w, l], meta["prompt"],
                           meta["scale"]) for l in range(meta["layers"])] for w in range(meta["windows"])]
    results = []
    for spec in args.specs:
        try:
            results.append(measure(spec, meta, rows, exact))
        except kvc.error as e:
            sys.exit(f"compare_methods: {spec}: {e}")
    # The same replay on an uncompressed fp32 cache: the bytes the others are measured against.
    baseline = measure("none:f32", meta, rows, exact)["bytes"]
    print(f"{meta['windows']} windows of {meta['prompt']} prompt + {meta['steps']} decode tokens; error against "
          f"exact attention (float64); bytes against none:f32 replayed alike ({baseline} bytes)\n")
    print("| spec | error mean | error max | bytes | x none:f32 | tokens kept |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| `{r['spec']}` | {r['error_mean']:.2e} | {r['error_max']:.2e} | {r['bytes']} | "
              f"{r['bytes'] / baseline:.3f} | {r['kept']:.3f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4.5))
        for r in results:
            axes.scatter(r["bytes"] / baseline, max(r["error_mean"], 1e-8))
            axes.annotate(r["spec"], (r["bytes"] / baseline, max(r["error_mean"], 1e-8)), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")
        axes.set_xlabel("cache bytes / none:f32")
        axes.set_ylabel("mean relative attention-output error")
        axes.set_yscale("log")
        axes.set_title(f"kvc methods on {Path(meta['model']).parent.name}: {meta['windows']} windows")
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
