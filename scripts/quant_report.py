#!/usr/bin/env python3
"""Writes docs/QUANTIZATION.md: block-format layouts, fidelity and benchmark tables.

Usage:
  scripts/quant_report.py [--build-dir DIR] [--json RESULTS.json] [--output docs/QUANTIZATION.md]
                          [--repetitions N] [--no-build]

Without --json it configures and builds kvc_bench in Release (DIR, default
build-bench), runs `kvc_bench --benchmark_filter=BM_quant` (decode at 32K tokens
against fp16 full_cache, quantize-on-append, attention-output error) and
writes the JSON next to the binary. With --json it only formats an existing
result file. Standard library only.

Everything in the output is regenerated except the hand-written block between
<!-- analysis:begin --> and <!-- analysis:end -->, which is copied over from the
previous output (profiling notes, dated by whoever wrote them).
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys

ANALYSIS_BEGIN = "<!-- analysis:begin -->"
ANALYSIS_END = "<!-- analysis:end -->"
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}

# The formats of kernels/quant/format.hpp: (name, header bytes, payload bytes per 32 elements, rule, G=32 twin).
FORMATS = [
    ("int8_sym", 2, 32, "q * d; d = amax / 127", "ggml block_q8_0"),
    ("int4_sym", 2, 16, "(q - 8) * d; d = m / -8, m the signed value of largest magnitude", "ggml block_q4_0"),
    ("int4_asym", 4, 16, "q * d + m; m = min, d = (max - m) / 15", "ggml block_q4_1"),
    ("int2_asym", 4, 8, "q * d + m; m = min, d = (max - m) / 3", "-"),
    ("fp8_e4m3", 2, 32, "e4m3(x / d) * d; d = amax / 448", "-"),
    ("fp8_e5m2", 2, 32, "e5m2(x / d) * d; d = amax / 57344", "-"),
]

TARGETS = {"int4": 0.35, "int8": 0.6, "kivi2": 0.3}

# Every codec family: (docs/METHODS.md id, policy, head storage, what it stores, bench rows' prefix).
CODECS = [
    ("Q1", "`block<Format, G, Sinks>`, `q8_0`, `q4_0`, `q4_1`", "storage/packed_rows.hpp",
     "int8/int4/int2/fp8 groups of G along the head dim, fp16 scale (+ minimum)", "q8_0, q4_*, int*:g*, fp8:*"),
    ("Q2", "`kivi<Bits, G, R, Sinks>`", "storage/kivi_rows.hpp",
     "keys per channel in blocks of G tokens (fp16 scale + minimum per channel), values per token "
     "(int4/int2 asym groups), the newest R..R+G-1 tokens in fp16", "kivi, kivi:4"),
    ("Q3", "`kvquant(artifact, rope, sinks)`", "storage/kvquant_head.hpp",
     "keys before RoPE per channel in calibrated ranges, non-uniform codebook per layer (k-means), "
     "outliers exact (fp32 + channel), values per token, fp16 sinks; RoPE applied inside attention",
     "kvquant@*"),
    ("Q4", "`rotated<Codec, RotateValues>`", "policy/quantization/rotated.hpp",
     "any codec's rows after a sign-randomised fast Walsh-Hadamard transform (block-diagonal for "
     "non-power-of-two dims); queries rotated, outputs rotated back", "hadamard:*"),
    ("Q5", "`block_kv<KeyFormat, ValueFormat, G>`", "storage/packed_rows.hpp",
     "separate key and value formats", "k8v4, k4v2"),
    ("Q6", "`mixed<High, Low, G>(fraction)`", "storage/mixed_rows.hpp",
     "the top fraction of tokens by any scorer's scores in the high format, the rest low, a token map",
     "mixed:*"),
    ("Q7", "`gear<...>`", "storage/gear_rows.hpp",
     "quantized remainder + per-token sparse outliers + rank-r residual by power iteration per chunk",
     "gear"),
    ("Q8", "`cq(artifact)`", "policy/quantization/cq.hpp",
     "one b-bit code per group of c coupled channels, k-means codebooks per (layer, head, group) "
     "from calibration", "cq:*"),
    ("Q9", "the `Sinks` parameter of block/kivi, `sinks` of kvquant", "(each codec)",
     "the first n tokens of every head in fp16", "q4_0+sinks"),
    ("Q10", "`sparse(key_sparsity, value_sparsity)`", "storage/sparse_rows.hpp",
     "per token the largest (1 - s) of the elements: bitmap + fp16 values", "sparse, sparse:0.7"),
]
TARGET_BW = 0.5
TARGET_APPEND_BW = 0.25


def parse_name(name):
    """'BM_x/codec:mixed:int8/int2/data:gaussian' -> ('BM_x', {'codec': 'mixed:int8/int2', 'data': 'gaussian'}):
    a part without ':' belongs to the value before it (registry specs may hold a '/')."""
    parts = name.split("/")
    params = {}
    last = None
    for part in parts[1:]:
        if ":" in part:
            key, value = part.split(":", 1)
            params[key] = value
            last = key
        elif last is not None and not part.startswith(("iterations", "min_time", "repeats", "real_time")):
            params[last] += "/" + part
    return parts[0], params


def seconds_of(entry):
    return entry["real_time"] * UNIT_SECONDS[entry.get("time_unit", "ns")]


def select_runs(benchmarks):
    """The median aggregate per name when repetitions ran, else the single run."""
    runs, medians = {}, {}
    for b in benchmarks:
        if b.get("error_occurred"):
            continue
        name = b.get("run_name", b["name"])
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = b
            continue
        runs.setdefault(name, b)
    runs.update(medians)
    return runs


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def layouts_section():
    rows = []
    for name, header, payload, rule, twin in FORMATS:
        cells = [f"`{name}`", rule]
        for g in (32, 64, 128):
            size = header + g // 32 * payload
            cells.append(f"{size} B, {8 * size / g:.3g} b/v")
        cells.append(twin)
        rows.append(cells)
    out = ["## Layouts", "",
           "A row of `dim` elements is `dim / G` groups stored one after another; a group is an fp16 scale "
           "`d` (and an fp16 minimum `m` for the asymmetric formats), then `G / 32` payloads of 32 elements. "
           "Bits per value include the scale and minimum.", ""]
    out += table(["format", "element value", "G = 32", "G = 64", "G = 128", "G = 32 is byte for byte"], rows)
    out += ["",
            "Payload of 32 elements, element `j`:", "",
            "- `int8_sym`, `fp8_*`: byte `j`.",
            "- `int4_*`: low nibble of byte `j` for `j < 16`, high nibble of byte `j - 16` otherwise (ggml's order).",
            "- `int2_asym`: bits `2k..2k+1` of byte `j % 8`, `k = j / 8` (byte `i` holds elements `i`, `i+8`, `i+16`, `i+24`).",
            "- fp16 fields are little-endian and unaligned (a q4_0 group is 18 bytes).",
            "- `fp8_e4m3`: OCP E4M3 (bias 7, largest finite 448, no infinity, `S.1111.111` is NaN); "
            "`fp8_e5m2`: OCP E5M2 (bias 15, largest finite 57344, IEEE infinities and NaNs).",
            ""]
    return out


def rules_section():
    return [
        "## Rounding, saturation, NaN",
        "",
        "- Scales are the fp16 value of `amax / 127` (`/ 448`, `/ 57344`; `m / -8` for int4_sym; "
        "`(max - m) / 15` or `/ 3` for the asymmetric formats) rounded **up** in magnitude, and the asymmetric "
        "minimum is the fp16 value of `min` rounded **down**. Codes are then computed against the stored "
        "scale, `q = RNE((x - m) * (1 / d))`, round to nearest with ties to even, clamped to the code range. "
        "So every element is within `d / 2` of its value, except int4_sym's clamped opposite extreme (a value "
        "above `7.5 |d|` with the sign opposite to `m`, within `|d|`), and every instruction set writes the "
        "same bytes (tested bit for bit).",
        "- ggml's reference quantizers round ties away from zero and compute codes with the unrounded fp32 "
        "scale (its SIMD paths round ties to even). The byte layout is identical, so blocks written by either "
        "decode the same way; codes can differ only on exact ties or when the fp16 scale is not exact.",
        "- int4_sym ties between `+a` and `-a` for the largest magnitude take `+a` (ggml takes the first).",
        "- fp8: the per-group fp16 scale maps the group's largest magnitude to the top of the fp8 range, so "
        "each group uses the format's full exponent range from the top down; conversion rounds to nearest "
        "even and saturates to the largest finite value (never NaN or infinity from finite input).",
        "- A scale or minimum beyond fp16's range (only reachable from fp32 input above ~8e6) saturates at "
        "65504 and the codes clamp.",
        "- NaN or +-Inf anywhere in a group: the group is stored with a NaN scale (and minimum) and zero "
        "codes, so all of its elements decode to NaN. Nothing else changes: other groups of the row, the "
        "other rows and other tokens keep their exact bytes. Attention of the KV head that holds it returns "
        "NaN (as full_cache would with a NaN in fp16); evicting the token restores finite outputs (tested).",
        "- Sink tokens (Q9) are stored in fp16 exactly as full_cache stores them; attention over only sink "
        "tokens is bit-identical to full_cache (tested).",
        "- Key scores against the integer formats (int8_sym, int4_sym, int4_asym, int2_asym) use the query "
        "quantized to int8 per 32 elements, as llama.cpp's q8 activations: `a = max |q_j|`, `d = a / 127`, "
        "`c_j = RNE(q_j * (127 / a))` (fp32 divisions; `d = 0` below `a = 2^-96`, NaN for a non-finite "
        "payload), and the score is `sum_p d_p (dk S_p + mk C_p)` with `S_p = sum code_j c_j` and "
        "`C_p = sum c_j` exact integers per 32-element payload: exactly `<value(k), d c>` in real arithmetic. "
        "This lets AVX-512 VNNI compute the scores with integer dot products (VPDPBUSD), and every instruction "
        "set and the scalar reference use the same rule (the float kernels score against the dequantized query "
        "`d c`), so kernels are still tested against the reference and a double oracle at the float-rounding "
        "tolerances. Against the fp32 query a score moves by at most `|scale| (sum_p (a_p / 254)(1 + 3u) "
        "sum_{j in p} |value(k_j)| + 4.01 u sum |q_j value(k_j)|)` (tested): for N(0, 1) queries about 0.4% "
        "of `|scale| sum |q| |k|`, small next to the error of 4-bit keys. fp8 keys keep the fp32 query, and "
        "the sink rows (fp16) always use it. Values are not affected.",
        "",
    ]


def design_section():
    return [
        "## How a codec plugs in (the Q1 block codecs as the example)",
        "",
        "- The policy (`kvc::quant::block_kv<K, V, G, Sinks>`, family `quantization_family`) is a small type "
        "with a `make_head(const cache_config&)` that `compressed_cache`'s constructor calls on the policy "
        "object for every (layer, KV head) (calibrated codecs take `make_head(config, layer, kv_head)`); it "
        "validates the head dim against the group size there (kvc::error).",
        "- `head_storage` is `kvc::packed_rows`: the interface of policy/quantization/none.hpp (tokens, bytes, "
        "reserve_for_append, reserve, push_back, attend, prefill, decode_keys/values, keep, shrink_to_fit, "
        "release, clear). push_back quantizes through `kernels.quant.quantize_row[format][source dtype]`; "
        "attend and prefill hand one `quant_decode_problem` / `quant_prefill_problem` (fp16 sink segment + "
        "packed rows + formats) to `kernels.quant.attend_partial` / `prefill`; decode_keys/values use "
        "`dequantize_row` (what eviction scorers read).",
        "- Kernels see formats as run-time values, so key and value formats combine freely (Q5) without "
        "new instantiations; KIVI, GEAR and mixed precision reuse these row kernels for their per-token "
        "parts, and every other codec has its own section of `kernel_table` (docs/ARCHITECTURE.md).",
        "- Sink tokens (Q9) are a template parameter of the block codecs; `packed_rows` takes the count at "
        "run time for direct users.",
        "- AVX-512 VNNI: the dispatch unit for AVX-512 is compiled without `-mavx512vnni`; its key-score "
        "kernels for int8_sym/int4_sym/int4_asym carry `__attribute__((target(\"avx512vnni\")))` and are "
        "templates on the Arch (their symbols name `xsimd::avx512bw`, so dispatch.hygiene holds). They sit in "
        "a second AVX-512 table (`dispatch_table_avx512_vnni`, `simd::make_table_vnni`) that "
        "`kernels::compiled_table(arch_id::avx512)` returns only when `cpu().avx512_vnni` (cpuid leaf 7, ECX "
        "bit 11). The scores take 16 tokens per step: one gather brings the 16 rows' group headers, a payload "
        "of 16 rows is transposed in registers so each 32-bit lane holds one token's four codes, and one "
        "VPDPBUSD per query dword adds four products per token, with no horizontal sums.",
        "",
    ]


def fmt(value, digits=3):
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else str(value)


def verdict(value, limit, below=True):
    ok = value <= limit if below else value >= limit
    return ("meets" if ok else "misses") + f" {'<=' if below else '>='} {limit}"


def target_for(codec):
    if codec in ("q4_0", "q4_1") or codec.startswith("int4:"):
        return TARGETS["int4"]
    if codec in ("q8_0",) or codec.startswith("int8:"):
        return TARGETS["int8"]
    if codec in ("kivi", "kivi:2"):
        return TARGETS["kivi2"]
    return None


def catalogue_section():
    rows = [[i, p, f"`{st}`" if st.endswith(".hpp") else st, what, f"`{prefix}`"] for i, p, st, what, prefix in CODECS]
    out = ["## The codecs", "",
           "Every quantization method of [METHODS.md](METHODS.md) is a codec policy of `compressed_cache` "
           "(`kvc/policy/quantization/`, all in `kvc::quant`, all in `<kvc/kvc.hpp>`): one type change in the "
           "cache's third slot. Each header opens with the method, its source and the choices made where the "
           "source is silent; each codec attends directly on its stored form (no dequantized copy of the cache) "
           "with a scalar reference and xsimd kernels tested against it on every instruction set. Calibrated "
           "codecs (Q3, Q8) take an artifact from `kvc/calibration/` (versioned, CRC-checked files, "
           "deterministic for a seed).", ""]
    out += table(["id", "policy", "storage", "what a token costs", "bench rows"], rows)
    return out + [""]


def decode_section(runs):
    rows = []
    full = None
    for name, entry in runs.items():
        family, params = parse_name(name)
        if family != "BM_quant_decode":
            continue
        codec = params.get("codec", "?")
        time_ms = seconds_of(entry) * 1e3
        if codec == "f16_full":
            full = entry
        target = target_for(codec)
        rows.append([f"`{codec}`", fmt(entry.get("bits_per_value", 0)), f"{time_ms:.2f}",
                     fmt(entry.get("vs_full_time", 0)), fmt(entry.get("vs_full_bytes", 0)),
                     fmt(entry.get("bw_fraction", 0)),
                     verdict(entry.get("vs_full_time", 0), target) if target else "-",
                     verdict(entry.get("bw_fraction", 0), TARGET_BW, below=False) if codec != "f16_full" else "-"])
    if not rows:
        return []
    out = ["## Decode attention (BM_quant_decode)", "",
           "One decode step of one layer: 8 KV heads, GQA 4 (32 query heads), head dim 128, 32K tokens, one "
           "thread, cold caches (enough identical layers for >= 128 MiB, visited round robin). `vs_full_time` "
           "divides by fp16 full_cache's time on the same shape, measured in the same process right before each "
           "row (the `f16_full` row compares fp16 with itself: its distance from 1 is the run's noise); `vs_full_bytes` "
           "is cache bytes per layer over fp16's; `bw_fraction` counts the bytes one call reads (the cache's "
           "`stored_bytes(layer)`: scales, codebooks and fp16 rows included) against the measured single-thread "
           "read bandwidth, and `bits/value` is those bytes per key or value element. Every row is a spec of "
           "kvc's registry, built by `kvc::make_cache` (a `dynamic_cache`). Issue 3's targets: int4 "
           "vs_full_time <= 0.35, int8 <= 0.6, bw_fraction >= 0.5.", ""]
    if full is not None:
        out += [f"fp16 full_cache: {seconds_of(full) * 1e3:.2f} ms per call "
                f"(bw_fraction {fmt(full.get('bw_fraction', 0))}).", ""]
    out += table(["codec", "bits/value", "ms/call", "vs_full_time", "vs_full_bytes", "bw_fraction",
                  "time target", "bandwidth target"], rows)
    return out + [""]


def append_section(runs):
    rows = []
    for name, entry in runs.items():
        family, params = parse_name(name)
        if family != "BM_quant_append":
            continue
        gbps = entry.get("bytes_per_second", 0) / 1e9
        rows.append([f"`{params.get('codec', '?')}`", f"{seconds_of(entry) * 1e3:.2f}", f"{gbps:.2f}",
                     fmt(entry.get("bw_fraction", 0)),
                     verdict(entry.get("bw_fraction", 0), TARGET_APPEND_BW, below=False)])
    if not rows:
        return []
    out = ["## Quantize on append (BM_quant_append)", "",
           "The prefill path: `append` of 4096 tokens of fp16 keys and values (8 KV heads x 128) into reserved "
           "storage. Throughput counts the fp16 input bytes; the issue's target is >= 0.25 of the read bandwidth.",
           ""]
    out += table(["codec", "ms per 4096 tokens", "GB/s of fp16 input", "bw_fraction", "target"], rows)
    return out + [""]


def fidelity_section(runs):
    data = {}
    bits = {}  # read from the decode rows: stored bits per value at 32K tokens
    for name, entry in runs.items():
        family, params = parse_name(name)
        if family == "BM_quant_decode":
            bits[params.get("codec", "?")] = entry.get("bits_per_value", 0)
        if family != "BM_quant_fidelity":
            continue
        codec = params.get("codec", "?")
        data.setdefault(codec, {})[params.get("data", "?")] = entry
    if not data:
        return []
    kinds = ["gaussian", "outlier_channels"]
    rows = []
    for codec in sorted(data, key=lambda c: (-bits.get(c, 0), c)):
        cells = [f"`{codec}`", fmt(bits[codec]) if codec in bits else "-"]
        for kind in kinds:
            e = data[codec].get(kind)
            cells.append(f"{e['rel_error']:.3g} (max {e['rel_error_max']:.3g})" if e else "-")
        rows.append(cells)
    out = ["## Attention-output error against full_cache (BM_quant_fidelity)", "",
           "`||out - out_fp16|| / ||out_fp16||` per query head, mean (and worst) over 32 query heads x 16 "
           "random N(0, 1) queries (logits of standard deviation ~1 at scale 1/sqrt(128)), 1024 tokens of N(0, 1) "
           "keys and values; `outlier_channels` multiplies 4 fixed channels of every head (keys and values) by "
           "10, as real keys have (logit spread ~2): one large channel sets the scale of its whole group, so "
           "per-token groups lose the other channels' resolution (what KIVI's per-channel keys address). "
           "Calibrated codecs (cq, kvquant) are calibrated on held-out tokens of the same data; kvquant's keys "
           "are appended as pre-RoPE keys and compared with the fp16 cache of the rotated keys. `bits/value` is "
           "the codec's decode row's (32K tokens).", ""]
    out += table(["codec", "bits/value", "gaussian", "outlier channels"], rows)
    return out + [""]


def kvref_section(path):
    """Attention-output error on kvref's own rows, from kvc-attention-error (one JSON object per line)."""
    if not path or not os.path.exists(path):
        return []
    rows = []
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        rows.append([f"`{r['cache']}`", f"{r['error_mean']:.4g}", f"{r['error_max']:.3g}"])
    if not rows:
        return []
    r0 = json.loads(open(path, encoding="utf-8").readline())
    out = ["## Attention-output error on a real model's keys and values (kvref)", "",
           "`kvc-attention-error` (examples/engine) runs the kvref model (4 layers, 2 KV heads of dim 64, "
           "RoPE) once over `models/kvref/eval.txt` with a full fp32 cache, recording every key, value and "
           "query; each codec's cache then replays exactly those rows the way the engine drives a cache "
           f"({r0['prompt']}-token prompt in chunks, then {r0['steps']} decode steps, {r0['windows']} windows) "
           "and each decode output is compared with full_cache f32's: `||out - out_full|| / ||out_full||` per "
           "query head, layer and step, mean and max over "
           f"{r0['samples']} of them. Next-token KL of the same codecs is in docs/FIDELITY.md. kvref's head dim "
           "is 64, so codecs with G = 128 do not apply. The calibrated codecs (cq, kvquant) learn from the last "
           "4096 tokens of eval.txt, past every window scored; KVQuant, which stores keys before RoPE, is given "
           "the keys before RoPE, as the model gives them to it.", ""]
    out += table(["codec (engine spelling)", "mean error", "max error"], rows)
    return out + [""]


def measure_kvref(build):
    """Runs kvc-attention-error for every codec kvc-fidelity --list names alone (no eviction), except
    full_cache; returns the JSON-lines file."""
    tools = os.path.join(build, "examples", "engine")
    listing = subprocess.run([os.path.join(tools, "kvc-fidelity"), "--list"], check=True, capture_output=True,
                             text=True).stdout
    out = os.path.join(build, "kvref_attention_errors.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for line in listing.splitlines():
            method, cache, evict, _every, merge, project = line.split("\t")[:6]
            if evict != "none" or merge != "none" or project != "none" or cache.startswith("full:"):
                continue
            row = subprocess.run([os.path.join(tools, "kvc-attention-error"), "--model", "models/kvref/model.bin",
                                  "--cache", cache, "--windows", "4"], check=True, capture_output=True, text=True)
            f.write(row.stdout)
    return out


def preserved_analysis(path):
    if not os.path.exists(path):
        return [ANALYSIS_BEGIN, "", ANALYSIS_END]
    text = open(path, encoding="utf-8").read()
    if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
        start = text.index(ANALYSIS_BEGIN)
        end = text.index(ANALYSIS_END) + len(ANALYSIS_END)
        return text[start:end].split("\n")
    return [ANALYSIS_BEGIN, "", ANALYSIS_END]


def machine_lines(context):
    bw = float(context.get("kvc_read_bandwidth_bytes_per_second", 0) or 0)
    return [f"- CPU: {context.get('kvc_cpu_model', platform.processor() or 'unknown')}, "
            f"{context.get('num_cpus', '?')} cores; kvc kernels: {context.get('kvc_default_arch', '?')} "
            f"(available: {context.get('kvc_available_archs', '?')})",
            f"- Single-thread read bandwidth: {bw / 1e9:.2f} GB/s ({context.get('kvc_read_kernel', '?')})",
            f"- Compiler: {context.get('kvc_compiler', '?')}; load average at start: "
            f"{context.get('load_avg', ['?'])}", ""]


def run_benchmarks(args):
    build = args.build_dir
    if not args.no_build:
        subprocess.run(["cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DKVC_BUILD_TESTS=OFF", "-DKVC_BUILD_EXAMPLES=OFF", "-DKVC_BUILD_BENCH=ON"], check=True)
        subprocess.run(["cmake", "--build", build, "--target", "kvc_bench"], check=True)
    out = os.path.join(build, "kvc_bench_quant.json")
    command = [os.path.join(build, "bench", "kvc_bench"), "--benchmark_filter=BM_quant",
               f"--benchmark_out={out}", "--benchmark_out_format=json"]
    if args.repetitions > 1:
        command += [f"--benchmark_repetitions={args.repetitions}", "--benchmark_report_aggregates_only=true"]
    subprocess.run(command, check=True)
    return out, command


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default="build-bench")
    parser.add_argument("--json", help="format this kvc_bench JSON instead of running the benchmarks")
    parser.add_argument("--output", default="docs/QUANTIZATION.md")
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--no-build", action="store_true", help="use the kvc_bench already built in --build-dir")
    parser.add_argument("--kvref-errors", help="kvc-attention-error output (JSON lines) for the kvref table")
    parser.add_argument("--kvref-tools", help="build directory with examples (kvc-fidelity, kvc-attention-error): "
                        "measure the kvref table now, every codec of kvc-fidelity --list (kvc's registry) that needs no calibration")
    args = parser.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    invocation = "scripts/quant_report.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.json:
        path, bench_command = args.json, None
    else:
        path, bench_command = run_benchmarks(args)
    if args.kvref_tools:
        args.kvref_errors = measure_kvref(args.kvref_tools)
    results = json.load(open(path, encoding="utf-8"))
    runs = select_runs(results.get("benchmarks", []))
    context = results.get("context", {})

    lines = ["# Quantization: the codecs (Q1-Q10)", "",
             "<!-- Generated by scripts/quant_report.py; edit the script (or the analysis block below), "
             "not this file. -->", "",
             f"Produced by `{invocation.strip()}`" +
             (f", which ran `{' '.join(shlex.quote(c) for c in bench_command)}`." if bench_command else
              f" from `{path}`."), "",
             "How a codec plugs in is described below for the Q1 block codecs and in docs/ARCHITECTURE.md "
             "(Kernels and dispatch) for all of them.", ""]
    lines += ["## Machine", ""] + machine_lines(context)
    lines += catalogue_section()
    lines += design_section()
    lines += layouts_section()
    lines += rules_section()
    lines += fidelity_section(runs)
    lines += kvref_section(args.kvref_errors)
    lines += decode_section(runs)
    lines += append_section(runs)
    lines += ["## Analysis", ""] + preserved_analysis(args.output) + [""]
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"quant_report.py: wrote {args.output} from {path}")


if __name__ == "__main__":
    main()
