// kvc-attention-error: per-layer attention-output error of compressed caches
// on a real model's keys, values and queries (attention_error.hpp).
//
//   kvc-attention-error --model models/kvref/model.bin --cache q4_0
//   kvc-attention-error --model models/kvref/model.bin --eviction-sweep   # every scorer at 0.5, 0.25, 0.125
//
// Prints one JSON object per configuration and line.
//
// Calibrated policies (codecs cq:*, kvquant:*; eviction qfilter, head_roles;
// projection pca, loki) learn from the last 4 x `context` tokens of the text, which no window
// reaches (the windows are taken from its start).
//
//   kvc-attention-error --model models/kvref/model.bin --dump rows/   # the recorded rows as .npy, for Python
//
// --dump writes the windows' keys, values and queries (what every
// configuration replays) as numpy files and exits: keys.npy and values.npy
// [windows][layers][tokens][kv_heads][head_dim], queries.npy
// [windows][layers][tokens][query_heads][head_dim] (float32; token i at
// position i), and meta.json (prompt, steps, chunk, shape, logit scale).
// examples/python/compare_methods.py reads them.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "attention_error.hpp"
#include "calibration.hpp"
#include "cli.hpp"
#include "fidelity.hpp"

namespace {

const char* const usage = R"(usage: kvc-attention-error --model FILE [options]

  --model FILE         llama2.c checkpoint (fp32, version 0)
  --tokenizer FILE     tokenizer.bin (default: next to the model; byte level for a 256-token vocabulary)
  --text FILE          text (default: eval.txt next to the model)
  --cache SPEC         cache to measure (default none:f32; see kvc_engine --list)
  --evict SPEC         its eviction policy (default none)
  --evict-every N      decode-time compression interval (default 0)
  --merge NAME         fold what eviction drops into what it keeps (default none)
  --project SPEC       project keys and values (default none; e.g. think:0.4, pca:32, loki:16:0.125)
  --eviction-sweep     instead: every eviction policy whose value is a share of the cache (a keep
                       ratio, head_roles' retrieval share), at 0.5, 0.25 and 0.125, on --cache
  --prompt N           prompt tokens per window (default 512)
  --steps M            decode steps measured per window (default 32)
  --chunk N            prefill chunk (default 64)
  --windows W          disjoint text windows (default 4)
  --dump DIR           instead: write the windows' keys, values and queries to DIR as .npy (+ meta.json)
  --help
)";

struct options {
    std::string model, tokenizer_path, text;
    engine::cache_spec spec{"none:f32", "none"};
    bool sweep = false;
    std::string dump;
    std::size_t prompt = 512, steps = 32, chunk = 64, windows = 4;
};

options parse(int argc, char** argv) {
    engine::arguments args(argc, argv);
    options o;
    while (!args.done()) {
        const std::string flag = args.flag();
        if (flag == "--help") {
            std::fputs(usage, stdout);
            std::exit(0);
        } else if (flag == "--model") o.model = args.value(flag);
        else if (flag == "--tokenizer") o.tokenizer_path = args.value(flag);
        else if (flag == "--text") o.text = args.value(flag);
        else if (flag == "--cache") o.spec.cache = args.value(flag);
        else if (flag == "--evict") o.spec.evict = args.value(flag);
        else if (flag == "--evict-every") o.spec.every = args.count(flag, 0, 1 << 20);
        else if (flag == "--merge") o.spec.merge = args.value(flag);
        else if (flag == "--project") o.spec.project = args.value(flag);
        else if (flag == "--eviction-sweep") o.sweep = true;
        else if (flag == "--dump") o.dump = args.value(flag);
        else if (flag == "--prompt") o.prompt = args.count(flag, 1);
        else if (flag == "--steps") o.steps = args.count(flag, 1);
        else if (flag == "--chunk") o.chunk = args.count(flag, 1, 1 << 20);
        else if (flag == "--windows") o.windows = args.count(flag, 1, 10000);
        else throw engine::usage_error("unknown option " + flag);
    }
    if (o.model.empty()) throw engine::usage_error("--model FILE is required");
    return o;
}

// calibration_text: where a calibrated policy learnt from ("" for the others).
std::string json_row(const engine::cache_spec& spec, const engine::attention_error& e, const options& o,
                     const std::string& calibration_text) {
    using engine::detail::json_string;
    using engine::detail::number;
    return "{\"method\": " + json_string(spec.method()) + ", \"cache\": " + json_string(spec.cache) +
           ", \"evict\": " + json_string(spec.evict) + ", \"evict_every\": " + std::to_string(spec.every) +
           ", \"merge\": " + json_string(spec.merge) + ", \"project\": " + json_string(spec.project) +
           ", \"error_mean\": " + number(e.mean) + ", \"error_max\": " + number(e.max) +
           ", \"rows_kept\": " + number(e.rows_kept) + ", \"samples\": " + std::to_string(e.samples) +
           ", \"windows\": " + std::to_string(o.windows) + ", \"prompt\": " + std::to_string(o.prompt) +
           ", \"steps\": " + std::to_string(o.steps) + ", \"calibration_text\": " + json_string(calibration_text) +
           "}\n";
}

// One float32 .npy file (format 1.0): the magic, a header dict padded to a
// multiple of 64 bytes, then the elements in C order.
void write_npy(const std::filesystem::path& path, const std::vector<std::size_t>& shape,
               const std::vector<const std::vector<float>*>& parts) {
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
    for (std::size_t extent : shape) dict += std::to_string(extent) + ", ";
    dict += "), }";
    const std::size_t unpadded = 10 + dict.size() + 1;
    dict.append((64 - unpadded % 64) % 64, ' ');
    dict += '\n';
    std::string bytes = std::string("\x93NUMPY\x01\x00", 8);
    bytes += static_cast<char>(dict.size() & 0xff);
    bytes += static_cast<char>(dict.size() >> 8);
    bytes += dict;
    for (const std::vector<float>* part : parts)
        bytes.append(reinterpret_cast<const char*>(part->data()), part->size() * sizeof(float));
    engine::write_file(path.string(), bytes, "--dump");
}

void dump_rows(const std::string& dir, const std::vector<engine::recorded_rows>& recorded,
               const kvc::cache_config& config, const options& o) {
    std::filesystem::create_directories(dir);
    const std::size_t tokens = o.prompt + o.steps;
    std::vector<const std::vector<float>*> keys, values, queries;
    for (const engine::recorded_rows& rows : recorded)
        for (std::size_t l = 0; l < config.layers; ++l) {
            keys.push_back(&rows.keys[l]);
            values.push_back(&rows.values[l]);
            queries.push_back(&rows.queries[l]);
        }
    const std::filesystem::path to(dir);
    write_npy(to / "keys.npy", {recorded.size(), config.layers, tokens, config.kv_heads, config.head_dim}, keys);
    write_npy(to / "values.npy", {recorded.size(), config.layers, tokens, config.kv_heads, config.head_dim}, values);
    write_npy(to / "queries.npy", {recorded.size(), config.layers, tokens, config.query_heads, config.head_dim},
              queries);
    using engine::detail::json_string;
    const std::string meta =
        "{\"model\": " + json_string(o.model) + ", \"text\": " + json_string(o.text) +
        ", \"windows\": " + std::to_string(recorded.size()) + ", \"prompt\": " + std::to_string(o.prompt) +
        ", \"steps\": " + std::to_string(o.steps) + ", \"chunk\": " + std::to_string(o.chunk) +
        ", \"layers\": " + std::to_string(config.layers) + ", \"kv_heads\": " + std::to_string(config.kv_heads) +
        ", \"query_heads\": " + std::to_string(config.query_heads) + ", \"head_dim\": " +
        std::to_string(config.head_dim) + ", \"scale\": " + engine::detail::number(config.logit_scale()) + "}\n";
    engine::write_file((to / "meta.json").string(), meta, "--dump");
    std::printf("kvc-attention-error: wrote %s/{keys,values,queries}.npy and meta.json (%zu windows of %zu tokens)\n",
                dir.c_str(), recorded.size(), tokens);
}

int run(options o) {
    engine::transformer model = engine::transformer::load(o.model);
    const engine::model_shape& shape = model.shape();
    const engine::tokenizer words = engine::tokenizer_for(o.model, o.tokenizer_path, shape.vocab);
    if (!engine::sum_within(o.prompt, o.steps, shape.context))
        throw engine::usage_error("--prompt + --steps exceeds the model's context of " + std::to_string(shape.context));
    if (o.text.empty()) o.text = (std::filesystem::path(o.model).parent_path() / "eval.txt").string();
    const std::vector<int> tokens = words.encode(engine::read_file(o.text, "--text"));
    const std::size_t window = o.prompt + o.steps;
    if (tokens.size() < o.windows * window)
        throw engine::usage_error(o.text + " has too few tokens for " + std::to_string(o.windows) + " windows of " +
                                  std::to_string(window));

    std::vector<engine::cache_spec> specs;
    if (o.sweep) {
        for (const std::string& name : engine::cache_share_evictions())
            for (const char* ratio : {"0.5", "0.25", "0.125"})
                specs.push_back({o.spec.cache, name + ":" + ratio, o.spec.every, o.spec.merge});
    } else {
        specs.push_back(o.spec);
    }
    const kvc::cache_config config = engine::kv_cache_config(shape);
    const engine::calibration calibrated =
        engine::text_tail_calibration(model, tokens, shape.context, o.windows * window, o.text);
    // Spelling errors first; and whether any cache stores keys before RoPE
    // (kvquant), so the recording keeps those too. Only then: recording them
    // routes every key through kvc's RoPE, which rounds differently from the
    // model's, and the other rows should stay exactly what the model produced.
    bool before_rope = false;
    for (const engine::cache_spec& spec : specs)
        before_rope = engine::make_cache(config, spec, calibrated)->wants_keys_before_rope() || before_rope;

    std::vector<engine::recorded_rows> recorded;
    for (std::size_t w = 0; w < o.windows; ++w) {
        const std::vector<int> text(tokens.begin() + static_cast<std::ptrdiff_t>(w * window),
                                    tokens.begin() + static_cast<std::ptrdiff_t>((w + 1) * window));
        recorded.push_back(engine::record_rows(model, text, o.prompt, o.chunk, before_rope));
    }
    if (!o.dump.empty()) {
        dump_rows(o.dump, recorded, config, o);
        return 0;
    }
    for (const engine::cache_spec& spec : specs) {
        engine::attention_error total;
        double sum = 0.0, kept = 0.0;
        for (const engine::recorded_rows& rows : recorded) {
            const engine::attention_error e =
                engine::measure_attention_error(config, rows, o.prompt, o.chunk, spec, calibrated);
            sum += e.mean * static_cast<double>(e.samples);
            total.samples += e.samples;
            total.max = std::max(total.max, e.max);
            kept += e.rows_kept;
        }
        total.mean = sum / static_cast<double>(total.samples);
        total.rows_kept = kept / static_cast<double>(recorded.size());
        const std::string learnt = engine::learnt_from(calibrated, spec) ? calibrated.text : "";
        std::fputs(json_row(spec, total, o, learnt).c_str(), stdout);
        std::fflush(stdout);
    }
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const engine::usage_error& e) {
        std::fprintf(stderr, "kvc-attention-error: %s\n(run kvc-attention-error --help for usage)\n", e.what());
        return 2;
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "kvc-attention-error: %s\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kvc-attention-error: error: %s\n", e.what());
        return 1;
    }
}
