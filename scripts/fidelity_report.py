#!/usr/bin/env python3
"""Writes docs/FIDELITY.md and its plot from the results of scripts/fidelity.sh.

Input: a directory of NNN.json (kvc-fidelity --json) and NNN.md (its
--markdown row) per configuration, in sweep order, and header.md (the table
header). Output: the Markdown report and a PNG of mean KL against cache bytes,
one curve per method, drawn by gnuplot. Standard library only.
"""
import argparse
import datetime
import glob
import json
import math
import os
import platform
import subprocess
import sys


def cpu_name():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quote(text):
    """A gnuplot string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load(results_dir):
    """The runs' JSON reports, in sweep order, and the Markdown table of their rows."""
    names = sorted(path[:-5] for path in glob.glob(os.path.join(results_dir, "[0-9]*.json")))
    if not names:
        sys.exit("%s: no results in %s" % (os.path.basename(sys.argv[0]), results_dir))
    results = []
    rows = []
    for name in names:
        with open(name + ".json") as data:
            results.append(json.load(data))
        with open(name + ".md") as row:
            rows.append(row.read().strip())
    with open(os.path.join(results_dir, "header.md")) as header:
        table = header.read().strip() + "\n" + "\n".join(rows)
    return results, table


def draw(results, plot_path, work_dir,
         heading="kvref on held-out Python source: next-token KL against KV cache memory", labelled=()):
    """KL (log scale) against cache KiB, one curve per method; the reference as a line.

    The points of the methods in `labelled` are labelled with their value
    (a keep ratio, a projection's value)."""
    reference = results[0]
    reference_kib = reference["cache_bytes_reference"] / 1024.0
    curves = {}  # method -> [(kib, kl, label)], in sweep order of first appearance
    for r in results:
        if r["kl_mean"] is None or r["kl_mean"] <= 0.0:
            continue  # exactly zero: identical to the reference, drawn as the reference line
        if r.get("project", "none") != "none":
            label = r["project"].split(":", 1)[-1]
        else:
            label = r["cache"] if r["evict"] == "none" else r["evict"].split(":", 1)[-1]
        curves.setdefault(r["method"], []).append((r["cache_bytes"] / 1024.0, r["kl_mean"], label))

    plots = []
    point_types = [7, 6, 5, 4, 9, 8, 13, 12, 11, 10, 3, 2, 1]
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f", "#393b79", "#ad494a"]
    for index, (method, points) in enumerate(curves.items()):
        data = os.path.join(work_dir, "curve_%02d.dat" % index)
        with open(data, "w") as out:
            for kib, kl, label in sorted(points):
                out.write("%.3f %.6e %s\n" % (kib, kl, quote(label)))
        full = method == "full_cache"
        # full_cache and the identity codec are single points per storage type,
        # not a trade-off: no line through them.
        if full:
            style, title = "points pt 7 ps 1.8 lc rgb 'black'", "full_cache (f16, bf16 storage)"
        elif method == "none":
            style, title = "points pt 6 ps 2 lw 2 lc rgb 'gray50'", "compressed_cache, every policy none"
        else:
            style = "linespoints pt %d ps 1.4 lw 2 lc rgb '%s'" % (point_types[index % len(point_types)],
                                                               colours[index % len(colours)])
            title = method
        plots.append("%s using 1:2 with %s title %s" % (quote(data), style, quote(title)))
        # Storage types are labelled at their points (full_cache's to the left,
        # the identity codec's to the right, as the two coincide); curves of
        # budgets are read from the table, smaller budgets further left.
        if full or method == "none":
            offset = "offset -1.2,0.9 right" if full else "offset 1.2,-0.9 left"
            plots.append("%s using 1:2:3 with labels %s font ',9' notitle" % (quote(data), offset))
        elif method in labelled:
            plots.append("%s using 1:2:3 with labels offset 0,1 font ',9' textcolor rgb '%s' notitle"
                         % (quote(data), colours[index % len(colours)]))

    lowest = min((kl for points in curves.values() for _, kl, _ in points), default=1e-9)
    highest = max((kl for points in curves.values() for _, kl, _ in points), default=1e-3)
    script = "\n".join([
        "set terminal pngcairo size 1500,1150 font 'sans,11' noenhanced",
        "set output %s" % quote(plot_path),
        "set title %s" % quote(heading),
        "set xlabel %s" % quote("KV cache memory after %d tokens (KiB)"
                                % (reference["prompt_tokens"] + reference["scored_tokens"])),
        "set ylabel %s" % quote("mean KL(full_cache f32 || tested) per token, nats"),
        "set logscale y",
        "set format y '%.0e'",
        "set yrange [%g:%g]" % (lowest / 10.0, highest * 10.0),
        "set xrange [0:%g]" % (reference_kib * 1.15),
        "set grid",
        # Dozens of curves: the legend goes under the plot in columns, so the data keeps the width.
        "set key outside below center box maxrows 12 width -2 font 'sans,10'",
        "set arrow from %g, graph 0 to %g, graph 1 nohead dashtype 2 linewidth 2 linecolor rgb 'gray30'"
        % (reference_kib, reference_kib),
        "set label %s at %g, graph 0.96 right offset -0.8,0 textcolor rgb 'gray30'"
        % (quote("full_cache f32, the reference (KL 0)"), reference_kib),
        "plot " + ", \\\n     ".join(plots) if plots else "plot NaN notitle",
        "",
    ])
    script_path = os.path.join(work_dir, "fidelity.gp")
    with open(script_path, "w") as out:
        out.write(script)
    subprocess.run(["gnuplot", script_path], check=True)


def calibration_note(results):
    """The paragraph on the calibrated policies' calibration text ("" when none ran)."""
    texts = sorted({r.get("calibration_text", "") for r in results} - {""})
    if not texts:
        return ""
    return ("Calibrated policies (codecs `cq:*`: CQ codebooks, Q8; `kvquant:*`: KVQuant ranges and "
            "codebooks, Q3, learnt from keys before RoPE; projections `pca` and `loki`: principal bases of "
            "keys after RoPE and of values, P1 and P4; eviction `qfilter`: each KV head's dominant "
            "query direction, E10; `head_roles`: which KV heads attend farthest back, B6, where "
            "`head_roles:S` keeps every token in the share S of the KV heads and the sinks and newest 16 "
            "in the others, so its rows are not those of a keep ratio S) learn from the model's own keys, "
            "values and queries over text that no window scores: %s. Codec bytes include the per-head "
            "codebooks (CQ: 128 KiB per KV head at 8-bit codes). `mixed:HIGH/LOW:F` (Q6) keeps, per "
            "KV head, the fraction F of the prompt tokens that received the most attention from the "
            "prompt's last prefill chunk in HIGH and the rest in LOW, assigned when decoding starts "
            "(`kvc_cache` in `examples/engine/cache_choice.hpp`).\n\n" % "; ".join(texts))


def arguments(description, command):
    """The command line scripts/fidelity.sh gives a report script (FIDELITY_REPORT)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", required=True, help="directory with NNN.json, NNN.md and header.md")
    parser.add_argument("--doc", required=True, help="Markdown report to write")
    parser.add_argument("--plot", required=True, help="PNG to write")
    parser.add_argument("--command", default=command, help="how the report was made, for the text")
    parser.add_argument("--load", default="not recorded", help="load average around the runs, for the text")
    return parser.parse_args()


def setting(args, r):
    """What every report says of how it was measured, for str.format: from the
    command line and the first result (every run shares model, text and windows)."""
    return dict(command=args.command, load=args.load, date=datetime.date.today().isoformat(), cpu=cpu_name(),
                kernels=r["kernels"], model=r["model"], text=r["text"], windows=r["windows"],
                window=r["prompt_tokens"] + r["scored_tokens"] + 1, prompt=r["prompt_tokens"], chunk=r["chunk"],
                scored=r["scored_tokens"], positions=r["scored_positions"], reference=r["reference"],
                reference_ppl=r["perplexity_reference"])


def main():
    args = arguments(__doc__, "scripts/fidelity.sh")

    results, table = load(args.results)

    draw(results, os.path.abspath(args.plot), args.results)

    r = results[0]
    reference_ppl = r["perplexity_reference"]
    bits = math.log2(reference_ppl)
    plot_link = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.doc)))
    text = """# Fidelity: what KV-cache compression costs on a real model

Generated by `{command}` on {date} ({cpu}, kvc kernels `{kernels}`); do not
edit by hand. Every KV cache configuration the engine's registry offers
(`kvc-fidelity --list`) is measured against the same reference.

**Model and text.** `{model}`: kvref, a byte-level Llama-style model trained
for kvc on Python 3.11 standard-library source (4 layers, 4 query heads sharing
2 KV heads, head dim 64, RoPE; see `models/kvref/README.md`). Text: `{text}`,
held-out source files, cut into {windows} disjoint windows of {window} bytes.

**How it is run.** The way an engine uses kvc, with a fresh cache per window:
the first {prompt} bytes are the prompt, prefilled through the cache in chunks
of {chunk} (`append` + `attend_chunk`; policies that compress after the prompt
do it there), then the next {scored} bytes are fed one at a time through the
decode path (`append` + `attend`, where decode-time policies run), teacher
forced with the text's own bytes. **Perplexity and KL are computed on those
{scored} decode positions per window only** ({positions} positions in all),
each predicting the byte after it.

**Reference: `{reference}`**, i.e. `kvc::full_cache` storing keys and values in
fp32, the precision the model computes them in: the uncompressed model. Its
perplexity here is {reference_ppl:.4f} ({bits:.3f} bits per byte).

## Results

{table}

Columns:
- **cache KiB**: `bytes()` of the cache after the last step, with spare
  capacity returned (`shrink_to_fit`): the rows held plus positions and
  bookkeeping, averaged over windows; **bytes vs ref**: relative to the reference.
- **perplexity**: exp of the mean negative log-likelihood of the true next byte;
  **change**: relative to the reference's perplexity.
- **mean KL**, **p99 KL**: KL(reference || tested) of the next-token
  distributions in nats, mean and 99th percentile (nearest rank) over positions.
- **top-1**: positions where both caches rank the same byte first.
- **attention time vs ref**: time inside `attend`/`attend_chunk` (steady_clock
  around the calls, prefill and decode), tested over reference. At this model
  size a call takes microseconds, so this is noisy and shows per-call overheads
  (e.g. fp16/bf16 conversion) that real sizes amortise; `docs/BENCHMARKS.md`
  measures attention speed properly. Load average during these runs:
  {load}.

![KL against cache memory]({plot})

Eviction (`--evict NAME:RATIO`, one curve per scorer, its points the keep
ratios 0.75, 0.5, 0.25 and 0.125 from right to left) stores its rows in fp16
(`none:f16`) and runs as kvc's registry sets it up
(`kvc::make_cache`, `src/registry.cpp`): once, after the
prompt, each KV head keeps that fraction of the {prompt} prompt tokens (its
first 4 and newest 16 always among them); the {scored} decoded tokens are all
kept. Its KL therefore measures what losing part of the prompt costs the
predictions that follow. The rows marked "(decode)" (`--evict-every 16`) also
compress during decode: whenever a head holds 16 tokens more than a quarter
of what it has seen, it goes back to that budget, so those caches stay at
about 0.25 of full_cache through the scored tokens too. Rows named
`SCORER+CODEC` evict from a quantized cache (a keep ratio of 0.25 on `q8_0`
or `q4_0` rows): the two families composed. Rows named `SCORER+compensation`
(`--merge compensation`, M5) run the same eviction and fold everything it drops
from a head into one extra slot holding the mean key and value of the dropped
tokens, attended with log(count): against the same scorer's plain row, they
show what merging recovers. Rows named `think` (`--project think:SHARE`, P3,
no eviction) keep every token and drop that share of each head's key
channels, those the newest 32 prompt queries use least, from all but the
newest 128 tokens. Rows named `pca` (`--project pca:R`, P1) store keys and
values as R coordinates in per-head principal bases learnt from the model;
rows named `loki` (`--project loki:R:F`, P4) keep every row (rotated into the
keys' principal basis) and attend exactly over the share F of the tokens whose
logits, estimated from R coordinates, are largest: Loki saves reading, not
memory. [PROJECTION.md](PROJECTION.md) compares the projections with the
other families. Cache bytes count everything the cache holds,
including the state a policy asks for (accumulated attention for H2O/A2SF, the
window of recent queries SnapKV scores with), which is why equal budgets can
differ in bytes.

{calibration}Points with KL exactly 0 (the reference itself, and `none:f32`, which is
bit-identical to it) cannot sit on the log scale: the dashed line marks the
reference's memory. Each `none:T` row (a `compressed_cache` with every policy
`none`) has exactly the KL of the `full:T` row, as the identity composition
runs the baseline's code; its few extra bytes are positions kept per KV head,
which eviction needs once heads hold different tokens.

## Caveats

- kvref is small and briefly trained: its absolute perplexity is specific to
  it; compare methods with each other and with `full_cache`.
- kvref does not copy from context (a 500-byte span repeated right after itself
  costs about as many bits the second time), so its attention is mostly local.
  Eviction results on it flatter recency-based policies; judge scorers that
  must keep far-back tokens on synthetic retrieval tests as well.
- {windows} windows x {scored} positions: both caches are scored on the same
  positions, so the perplexity change and KL are paired comparisons; the
  absolute perplexity varies from window to window.

## Reproducing and extending

`scripts/fidelity.sh` builds `kvc-fidelity` (Release) and runs it for every
line of `kvc-fidelity --list`; `FIDELITY_WINDOWS` sets the windows. One
configuration by hand:

```sh
build/fidelity/examples/engine/kvc-fidelity --model models/kvref/model.bin --cache none:f16 --markdown
```

A new policy appears here after one entry in kvc's registry (`src/registry.cpp`;
its sweep values, when not the defaults, in `examples/engine/cache_registry.hpp`)
and a rerun of `scripts/fidelity.sh`.
""".format(
        calibration=calibration_note(results),
        bits=bits,
        table=table,
        plot=plot_link,
        **setting(args, r)
    )
    with open(args.doc, "w") as out:
        out.write(text)


if __name__ == "__main__":
    main()
