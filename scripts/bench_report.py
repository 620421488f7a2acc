#!/usr/bin/env python3
"""Writes docs/BENCHMARKS.md from kvc_bench's JSON output (Google Benchmark format).

Usage: bench_report.py RESULTS.json OUTPUT.md [--command ...] [--bench-command ...]
                       [--load-before ...] [--load-after ...]

scripts/bench.sh calls it after every run. Standard library only.

Everything in OUTPUT.md is regenerated except a hand-written block between
the markers <!-- analysis:begin --> and <!-- analysis:end -->, which is copied
over from the previous OUTPUT.md if there is one (profiling notes and the like,
dated by whoever wrote them).
"""

import argparse
import json
import os
import platform
import sys

TARGET_BW_FRACTION = 0.6
TARGET_TOKENS = 16384
TARGET_SPEEDUP = 4.0
TARGET_DTYPE = "f16"
ANALYSIS_BEGIN = "<!-- analysis:begin -->"
ANALYSIS_END = "<!-- analysis:end -->"
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
ARCH_ORDER = ["scalar", "sse2", "avx2", "avx512", "neon"]
DTYPE_ORDER = ["f32", "f16", "bf16"]


def parse_name(name):
    """'BM_x/a:1/b:f16/real_time/threads:2' -> ('BM_x', {'a': '1', 'b': 'f16', 'threads': '2'})."""
    parts = name.split("/")
    params = {}
    for part in parts[1:]:
        if ":" in part:
            key, value = part.split(":", 1)
            params[key] = value
    return parts[0], params


def select_runs(benchmarks):
    """One entry per run: with --benchmark_repetitions, the fastest repetition (best of N: on a shared
    machine the slower ones measure the other processes); without iteration entries
    (--benchmark_report_aggregates_only), the median aggregate."""
    medians = {}
    repetitions = {}
    order = []
    for b in benchmarks:
        if b.get("error_occurred"):
            continue
        run = b.get("run_name", b["name"])
        if run not in order:
            order.append(run)
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[run] = b
        else:
            repetitions.setdefault(run, []).append(b)
    runs = []
    for run in order:
        if run in repetitions:
            best = dict(min(repetitions[run], key=lambda e: e["real_time"]))
            best["repetitions_seen"] = len(repetitions[run])
            runs.append(best)
        elif run in medians:
            runs.append(medians[run])
    return runs


def seconds_of(entry):
    return entry["real_time"] * UNIT_SECONDS.get(entry.get("time_unit", "ns"), 1e-9)


def preempted(entry):
    """True when the benchmark's threads got noticeably less CPU than wall time (another process ran)."""
    threads = entry.get("threads", 1) or 1
    real, cpu = entry.get("real_time"), entry.get("cpu_time")
    return bool(real and cpu is not None and cpu < 0.95 * real * threads)


def fmt_entry_time(entry):
    return fmt_time(seconds_of(entry)) + (" †" if preempted(entry) else "")


def fmt_time(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def fmt_gbps(entry):
    value = entry.get("bytes_per_second")
    return "–" if value is None else f"{value / 1e9:.2f}"


def fmt_fraction(entry, key="bw_fraction"):
    value = entry.get(key)
    return "–" if value is None else f"{value:.2f}"


def fmt_mib(value):
    return "–" if value is None else f"{value / 2**20:.1f}"


def table(header, rows, align=None):
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def cpu_info():
    """Model name, the flags that matter to kvc, and whether we run in a VM, from /proc/cpuinfo."""
    text = read_file("/proc/cpuinfo") or ""
    model, flags = None, set()
    for line in text.splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    wanted = ["sse2", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16",
              "avx512_vnni"]
    return model, [f for f in wanted if f in flags], "hypervisor" in flags


def mem_total_gib():
    text = read_file("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return None


def machine_section(context, args):
    model, flags, virtual = cpu_info()
    model = context.get("kvc_cpu_model") or model or "unknown"
    caches = ", ".join(
        f"L{c['level']} {c['type'].lower()} {c['size'] // 1024} KiB"
        + (f" (shared by {c['num_sharing']})" if c.get("num_sharing", 1) > 1 else "")
        for c in context.get("caches", []))
    bandwidth = float(context.get("kvc_read_bandwidth_bytes_per_second", "0"))
    buffer_bytes = int(context.get("kvc_read_buffer_bytes", "0"))
    memory = mem_total_gib()
    load_start = context.get("load_avg")
    rows = [
        ("CPU", f"{model}" + (" (virtual machine)" if virtual else "")),
        ("Cores (logical CPUs)", f"{context.get('num_cpus', '?')} at {context.get('mhz_per_cpu', '?')} MHz nominal"),
        ("Instruction sets (cpuinfo)", " ".join(flags) or "–"),
        ("kvc kernels available / default", f"{context.get('kvc_available_archs', '?')} / "
                                            f"{context.get('kvc_default_arch', '?')}"),
        ("Caches", caches or "–"),
        ("Memory", f"{memory:.1f} GiB" if memory else "–"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Compiler", context.get("kvc_compiler", "?") + ", CMake Release (-O3 -DNDEBUG)"),
        ("Google Benchmark library build", context.get("library_build_type", "?")
         + " (Debian's libbenchmark; its 'DEBUG' warning concerns the library's own code, not kvc's)"),
        ("Single-thread read bandwidth", f"**{bandwidth / 1e9:.2f} GB/s** "
                                         f"({context.get('kvc_read_kernel', '?')}, {buffer_bytes >> 20} MiB buffer, "
                                         f"best of 5 passes per loop)"),
        ("Read loops tried", context.get("kvc_read_variants", "–")),
        ("kvc revision", args.revision or "?"),
        ("Date", context.get("date", "?")),
        ("Load average (1/5/15 min)", f"before {args.load_before or '?'}; at start of benchmarks "
                                      + (" ".join(f"{x:.2f}" for x in load_start) if load_start else "?")
                                      + f"; after {args.load_after or '?'}"),
    ]
    out = ["## Machine and run", "", table(["", ""], rows), ""]
    out += ["Produced by:", "", "```", args.command or "(unknown)", "```", ""]
    if args.bench_command:
        out += ["which ran:", "", "```", args.bench_command, "```", ""]
    return out


def decode_key(params):
    return (params.get("dtype"), int(params.get("tokens", 0)), int(params.get("dim", 0)),
            int(params.get("group", 0)))


def dtype_rank(dtype):
    return DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else len(DTYPE_ORDER)


def verdict(value, target):
    if value is None:
        return "–"
    if value >= target:
        return f"met (+{(value / target - 1) * 100:.0f}%)"
    return f"**short** ({(value / target - 1) * 100:.0f}%)"


def targets_section(decode, sweep):
    out = ["## Project targets", ""]
    out += [f"Target: fp16 `full_cache` decode attention at {TARGET_TOKENS // 1024}K tokens and more, single "
            f"thread, `bw_fraction` ≥ {TARGET_BW_FRACTION}; AVX-512 and AVX2 kernels ≥ {TARGET_SPEEDUP:g}x faster "
            "than the scalar reference.", ""]
    rows, fractions = [], []
    for (dtype, tokens, dim, group, threads), entry in sorted(decode.items(), key=lambda kv: (
            kv[0][2], kv[0][3], kv[0][1])):
        if dtype != TARGET_DTYPE or threads != 1 or tokens < TARGET_TOKENS:
            continue
        fraction = entry.get("bw_fraction")
        fractions.append(fraction)
        rows.append((f"{tokens // 1024}K", dim, group, fmt_entry_time(entry), fmt_gbps(entry),
                     fmt_fraction(entry), verdict(fraction, TARGET_BW_FRACTION), entry.get("label", "")))
    if rows:
        met = sum(1 for f in fractions if f is not None and f >= TARGET_BW_FRACTION)
        out += [f"**Bandwidth:** met in {met} of {len(rows)} configurations "
                f"(bw_fraction {min(fractions):.2f} to {max(fractions):.2f}).", ""]
        out += [table(["tokens", "dim", "group", "time / call", "GB/s", "bw_fraction", "vs 0.6", "arch"], rows,
                      ["--:", "--:", "--:", "--:", "--:", "--:", "---", "---"]), ""]
    else:
        out += ["(no fp16 single-thread runs at 16K tokens or more in this run)", ""]

    rows = []
    for (dtype, tokens, dim, group, arch), entry in sorted(sweep.items()):
        if dtype != TARGET_DTYPE:
            continue
        speedup = entry.get("vs_scalar")
        check = verdict(speedup, TARGET_SPEEDUP) if arch in ("avx2", "avx512") else ""
        rows.append((arch, f"{tokens // 1024}K / {dim} / {group}", fmt_entry_time(entry), fmt_gbps(entry),
                     fmt_fraction(entry), "–" if speedup is None else f"{speedup:.1f}x", check))
    rows.sort(key=lambda r: ARCH_ORDER.index(r[0]) if r[0] in ARCH_ORDER else 99)
    if rows:
        out += ["**Instruction sets:**", ""]
        out += [table(["arch", "tokens / dim / group", "time / call", "GB/s", "bw_fraction", "vs scalar",
                       f"vs {TARGET_SPEEDUP:g}x"], rows, ["---", "---", "--:", "--:", "--:", "--:", "---"]), ""]
    return out


def read_bandwidth_section(runs):
    rows = []
    for entry in runs:
        family, params = parse_name(entry["name"])
        if family not in ("BM_read_bandwidth", "BM_read_bandwidth_end"):
            continue
        when = "last benchmark" if family.endswith("_end") else "first benchmarks"
        rows.append((when, params.get("threads", "1"), params.get("MiB", "?"), fmt_entry_time(entry),
                     fmt_gbps(entry), fmt_fraction(entry), entry.get("label", "")))
    if not rows:
        return []
    return ["## BM_read_bandwidth", "",
            "A plain sum over a buffer far larger than the caches, with the read loop that won at startup. "
            "threads:2 reads the two halves of the buffer at once (aggregate GB/s). bw_fraction is relative to "
            "the single-thread bandwidth measured at startup (best of 5 passes per loop); the single-thread rows "
            "should be close to 1, and BM_read_bandwidth_end, run after everything else, shows how far the "
            "machine's bandwidth drifted during the run.", "",
            table(["when", "threads", "buffer MiB", "time / pass", "GB/s", "bw_fraction", "loop"], rows,
                  ["---", "--:", "--:", "--:", "--:", "--:", "---"]), ""]


def eviction_section(runs):
    """BM_evict_compress / BM_evict_append / BM_evict_decode / BM_attention_stats (bench/eviction.cpp)."""
    compress, append, decode, stats, prompt = [], [], [], [], []
    for entry in runs:
        parts = entry["name"].split("/")
        family = parts[0]
        if family == "BM_evict_compress" and len(parts) >= 3:
            compress.append((parts[1], parts[2], fmt_entry_time(entry), f"{entry.get('attention_ms', 0):.2f} ms",
                             fmt_fraction(entry, "vs_attention")))
        elif family == "BM_evict_append" and len(parts) >= 2:
            append.append((parts[1], fmt_entry_time(entry), f"{entry.get('append_ms', 0):.1f} ms",
                           fmt_fraction(entry, "vs_plain_time")))
        elif family == "BM_evict_decode" and len(parts) >= 2:
            decode.append((parts[1], f"{entry.get('evicted_ms', 0):.2f} ms", f"{entry.get('full_ms', 0):.2f} ms",
                           fmt_fraction(entry, "vs_full_time"), fmt_fraction(entry, "vs_full_bytes"),
                           fmt_fraction(entry)))
        elif family == "BM_prompt_compression" and len(parts) >= 2:
            prompt.append((parts[1], f"{entry.get('inside_ms', 0):.1f} ms", f"{entry.get('compress_ms', 0):.1f} ms",
                           f"{entry.get('after_ms', 0):.2f} ms", fmt_fraction(entry, "inside_vs_after")))
        elif family == "BM_attention_stats" and len(parts) >= 2:
            stats.append((parts[1], f"{entry.get('stats_ms', 0):.2f} ms", f"{entry.get('plain_ms', 0):.2f} ms",
                          f"{entry.get('full_ms', 0):.2f} ms", fmt_fraction(entry, "vs_plain_time"),
                          fmt_fraction(entry, "vs_full_time")))
    if not (compress or append or decode or stats or prompt):
        return []
    out = ["## Eviction (bench/eviction.cpp)", "",
           "One layer of 32K tokens, 8 KV heads, head dim 128, fp16 rows, GQA 4 (32 query heads). Issue 4's "
           "targets: compression < 0.3 of one decode attention pass, decode after eviction to 0.25 at <= 0.3 of "
           "full_cache's time, attention statistics < 10% overhead.", ""]
    if compress:
        out += ["### BM_evict_compress: scoring + selection + compaction to keep ratio 0.25", "",
                "`vs_attention` = one `compress(layer)` / one decode attention pass over the uncompressed layer, "
                "same process. Resource `new_delete`: operator new, so the compacted buffers are fresh pages the "
                "kernel faults in and zeroes, and freed ones go back to the OS; `pool`: kvc::recycling_resource "
                "after one untimed compression, what an engine reusing memory sees.", "",
                table(["scorer", "resource", "compress", "attention pass", "vs_attention"], compress,
                      ["---", "---", "--:", "--:", "--:"]), ""]
    if append:
        out += ["### BM_evict_append: scoring at append", "",
                "knorm, CUR and LagKV score tokens when they are appended, so compression reads one float per "
                "token. Appending the 32K-token layer in 1K-token appends, against the same appends to fp16 "
                "full_cache; streaming (no append-time score) is the control.", "",
                table(["scorer", "append (layer)", "append_ms", "vs_plain_time"], append,
                      ["---", "--:", "--:", "--:"]), ""]
    if prompt:
        out += ["### BM_prompt_compression: the first decode step, with and without the prompt's compression", "",
                "Four layers of a q4_0 + SnapKV (0.25) cache, 8 KV heads, 32 query heads, head dim 128, after a "
                "2048-token prefill. The first decode step (append + attend, every layer) when its appends "
                "compress the prompt (after-prefill schedule), against `compress(layer)` for every layer right "
                "after prefill followed by the same step.", "",
                table(["cache", "first step, compressing", "explicit compress", "first step after it",
                       "inside_vs_after"], prompt, ["---", "--:", "--:", "--:", "--:"]), ""]
    if decode:
        out += ["### BM_evict_decode: decode attention after eviction to 0.25", "",
                "Four such layers visited round robin (cold data), against fp16 full_cache on the same shape, "
                "the two attends alternating in every iteration.", "",
                table(["scorer", "evicted attend", "full_cache attend", "vs_full_time", "vs_full_bytes",
                       "bw_fraction"], decode, ["---", "--:", "--:", "--:", "--:", "--:"]), ""]
    if stats:
        out += ["### BM_attention_stats: collecting per-token attention mass in the fused attention", "",
                "The same four layers in an H2O cache (statistics on), a streaming cache (same storage and "
                "kernels, no statistics) and fp16 full_cache, attended in an order that rotates every "
                "iteration.", "",
                table(["policy", "with statistics", "without", "full_cache", "vs_plain_time", "vs_full_time"],
                      stats, ["---", "--:", "--:", "--:", "--:", "--:"]), ""]
    return out


def drift_note(runs, context):
    """A warning when the single-thread read bandwidth moved by more than 10% during the run."""
    startup = float(context.get("kvc_read_bandwidth_bytes_per_second", "0") or 0)
    if not startup:
        return []
    values = [e["bytes_per_second"] for e in runs
              if parse_name(e["name"])[0] in ("BM_read_bandwidth", "BM_read_bandwidth_end")
              and e.get("threads", 1) == 1 and e.get("bytes_per_second")]
    if not values:
        return []
    low, high = min(values + [startup]), max(values + [startup])
    if high <= 1.1 * low:
        return [f"Read bandwidth stayed within 10% during the run ({low / 1e9:.1f} to {high / 1e9:.1f} GB/s).", ""]
    return [f"**Warning:** the single-thread read bandwidth moved between {low / 1e9:.1f} and {high / 1e9:.1f} "
            "GB/s during the run (startup, first and last measurement): bw_fraction values carry that much "
            "uncertainty. Memory bandwidth of a shared VM depends on its neighbours.", ""]


def decode_section(decode):
    if not decode:
        return []
    out = ["## BM_full_decode", "",
           "One iteration = one `full_cache::attend(layer, q, out)` over 8 KV heads (group = query heads per KV "
           "head: 8 or 32 query heads). GB/s counts the K and V bytes the call must read (tokens x 8 x dim x 2 x "
           "element size). Each fixture holds enough identical layers for a working set of at least 128 MiB, "
           "visited round robin, so every call reads cold data as in an engine. 2T: two threads attend on "
           "alternate layers of the same cache at once; time is wall time per call amortised over both threads, "
           "GB/s and bw_fraction are the aggregate, bw_fraction still relative to the *single-thread* read "
           "bandwidth.", ""]
    shapes = sorted({k[:4] for k in decode}, key=lambda s: (dtype_rank(s[0]), s[2], s[3], s[1]))
    for dtype in sorted({s[0] for s in shapes}, key=dtype_rank):
        rows = []
        for shape in shapes:
            if shape[0] != dtype:
                continue
            one = decode.get(shape + (1,))
            two = decode.get(shape + (2,))
            any_entry = one or two
            row = [f"{shape[1] // 1024}K", shape[2], shape[3]]
            for entry in (one, two):
                row += ([fmt_entry_time(entry), fmt_gbps(entry), fmt_fraction(entry)] if entry
                        else ["–", "–", "–"])
            row += [fmt_mib(any_entry.get("kv_bytes")), int(any_entry.get("layers", 0)), any_entry.get("label", "")]
            rows.append(row)
        out += [f"### {dtype}", "",
                table(["tokens", "dim", "group", "1T time / call", "1T GB/s", "1T bw_fraction",
                       "2T time / call", "2T GB/s", "2T bw_fraction", "KV MiB / layer", "layers", "arch"], rows,
                      ["--:"] * 11 + ["---"]), ""]
    return out


def hot_section(hot, decode):
    if not hot:
        return []
    rows = []
    for key in sorted(hot, key=lambda k: (dtype_rank(k[0]), k[2], k[3], k[1])):
        entry = hot[key]
        cold = decode.get(key + (1,))
        rows.append((key[0], f"{key[1] // 1024}K", key[2], key[3], fmt_entry_time(entry), fmt_gbps(entry),
                     fmt_fraction(entry), fmt_gbps(cold) if cold else "–", fmt_fraction(cold) if cold else "–",
                     entry.get("label", "")))
    return ["## BM_full_decode_hot (diagnostic)", "",
            "The same call with a single layer attended every iteration, so K and V come from L2/L3 instead of "
            "DRAM: the kernel's arithmetic ceiling. A cold row (BM_full_decode, 1 thread, same shape) well below "
            "its hot row waits for memory; a hot row itself below 1.0 means the arithmetic alone cannot keep up "
            "with DRAM.", "",
            table(["dtype", "tokens", "dim", "group", "hot time / call", "hot GB/s", "hot bw_fraction",
                   "cold GB/s", "cold bw_fraction", "arch"], rows, ["---"] + ["--:"] * 8 + ["---"]), ""]


def sweep_section(sweep):
    if not sweep:
        return []
    out = ["## BM_isa_sweep", "",
           "The same decode call on every instruction set this CPU and build support (kvc::set_active_arch). "
           "vs scalar = the scalar reference's time per call (measured once per shape in the same process: "
           "the fastest of at least 5 calls and 1 s) / this row's mean time per call.", ""]
    for dtype in sorted({k[0] for k in sweep}, key=dtype_rank):
        rows = []
        for key in sorted((k for k in sweep if k[0] == dtype),
                          key=lambda k: ARCH_ORDER.index(k[4]) if k[4] in ARCH_ORDER else 99):
            entry = sweep[key]
            speedup = entry.get("vs_scalar")
            rows.append((key[4], f"{key[1] // 1024}K / {key[2]} / {key[3]}", fmt_entry_time(entry),
                         fmt_gbps(entry), fmt_fraction(entry), "–" if speedup is None else f"{speedup:.1f}x"))
        out += [f"### {dtype}", "",
                table(["arch", "tokens / dim / group", "time / call", "GB/s", "bw_fraction", "vs scalar"], rows,
                      ["---", "---", "--:", "--:", "--:", "--:"]), ""]
    return out


def preserved_analysis(path):
    text = read_file(path)
    if not text or ANALYSIS_BEGIN not in text or ANALYSIS_END not in text:
        return []
    start = text.index(ANALYSIS_BEGIN)
    end = text.index(ANALYSIS_END) + len(ANALYSIS_END)
    return [text[start:end], ""]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("output")
    parser.add_argument("--command", help="the command line that produced the results")
    parser.add_argument("--bench-command", help="the kvc_bench command line it ran")
    parser.add_argument("--load-before")
    parser.add_argument("--load-after")
    parser.add_argument("--revision", help="git revision measured")
    args = parser.parse_args()

    with open(args.results, encoding="utf-8") as f:
        data = json.load(f)
    context = data.get("context", {})
    runs = select_runs(data.get("benchmarks", []))

    decode, hot, sweep = {}, {}, {}
    for entry in runs:
        family, params = parse_name(entry["name"])
        if family == "BM_full_decode":
            decode[decode_key(params) + (int(params.get("threads", entry.get("threads", 1))),)] = entry
        elif family == "BM_full_decode_hot":
            hot[decode_key(params)] = entry
        elif family == "BM_isa_sweep":
            sweep[decode_key(params) + (params.get("arch"),)] = entry

    lines = ["# kvc benchmarks", "",
             "Generated by `scripts/bench.sh` (`scripts/bench_report.py` from kvc_bench's JSON); do not edit by "
             "hand except between the analysis markers, which regeneration keeps.", "",
             "`bw_fraction` = achieved bytes/s of K and V reads / the single-thread read bandwidth that kvc_bench "
             "measured at startup in the same process. GB/s = 10^9 bytes/s. Times are wall-clock; † marks a "
             "run whose threads got less than 95% of the wall time on a CPU (another process was running: "
             "treat it as noisy).", ""]
    seen = sorted({e.get("repetitions_seen", 1) for e in runs})
    if seen and seen != [1]:
        lines += [f"Each row is the fastest of {'/'.join(str(n) for n in seen)} repetitions "
                  "(--benchmark_repetitions); the counters are that repetition's.", ""]
    lines += machine_section(context, args)
    lines += drift_note(runs, context)
    lines += targets_section(decode, sweep)
    lines += preserved_analysis(args.output)
    lines += read_bandwidth_section(runs)
    lines += decode_section(decode)
    lines += hot_section(hot, decode)
    lines += sweep_section(sweep)
    lines += eviction_section(runs)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
