// kvc_engine: generates text with a llama2.c checkpoint whose KV cache is kvc.
//
//   kvc_engine --model models/kvref/model.bin --cache none:f16 --prompt 'def main():'
//   kvc_engine --model ../shared/models/stories260K/model.bin --prompt 'Once upon a time' --temperature 0.8
//   kvc_engine --model models/kvref/model.bin --prompt-file models/kvref/eval.txt --prompt-limit 512
//              --cache none:f16 --compare full:f32     (one line)
//
// The prompt is prefilled through the cache in chunks, compressed (when the
// cache evicts), then tokens are generated one at a time (model.hpp shows the
// kvc calls). With --compare the
// same tokens also run through a second, reference cache, and the summary puts
// the two side by side: memory, decode speed, attention time, and how often
// the two caches agree on the next token (top-1) and by how much their
// next-token distributions differ (KL divergence).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <kvc/kvc.hpp>

#include "cache_choice.hpp"
#include "calibration.hpp"
#include "cli.hpp"
#include "fidelity.hpp"
#include "model.hpp"
#include "sampling.hpp"
#include "tokenizer.hpp"

namespace {

const char* const usage = R"(usage: kvc_engine --model FILE [options]

  --model FILE         llama2.c checkpoint (fp32, version 0)
  --tokenizer FILE     tokenizer.bin (default: the one next to the model; byte level for a 256-token vocabulary)
  --prompt TEXT        the prompt (default 'Once upon a time' with a tokenizer, 'def ' at byte level)
  --prompt-file FILE   read the prompt from FILE instead
  --prompt-limit N     keep only the first N prompt tokens
  --steps N            tokens to generate (default 200; stops early at end of text)
  --temperature T      0 = greedy (default), else sample from softmax(logits / T)
  --seed S             sampling seed (default 42)
  --chunk N            prefill chunk size in tokens (default 64)
  --cache SPEC         KV cache: full:f32, full:f16 (default), full:bf16 or a codec of kvc::methods() (see --list)
  --evict SPEC         eviction policy of a compressed cache (default none)
  --evict-every N      also compress during decode whenever a head is N tokens over budget (default 0)
  --merge NAME         fold what eviction drops into what it keeps (default none; e.g. compensation)
  --project SPEC       project keys and values (default none; e.g. think:0.4, pca:32, loki:16:0.125, cskv:32:32; not with --merge)
  --compare SPEC       also run a reference cache (e.g. full:f32) over the same tokens and compare
  --quiet              do not print the generated text
  --list               list the kvc::methods() names each flag takes
  --help
)";

struct options {
    std::string model, tokenizer_path, prompt, prompt_file;
    bool prompt_given = false;
    std::size_t prompt_limit = 0, steps = 200, chunk = 64;
    double temperature = 0.0;
    std::uint64_t seed = 42;
    engine::cache_spec cache{"full:f16", "none"};
    std::string compare;
    bool quiet = false;
};

options parse(int argc, char** argv) {
    engine::arguments args(argc, argv);
    options o;
    while (!args.done()) {
        const std::string flag = args.flag();
        if (flag == "--help") {
            std::fputs(usage, stdout);
            std::exit(0);
        } else if (flag == "--list") {
            std::fputs(engine::describe_options().c_str(), stdout);
            std::exit(0);
        } else if (flag == "--model") o.model = args.value(flag);
        else if (flag == "--tokenizer") o.tokenizer_path = args.value(flag);
        else if (flag == "--prompt") o.prompt = args.value(flag, true), o.prompt_given = true;
        else if (flag == "--prompt-file") o.prompt_file = args.value(flag);
        else if (flag == "--prompt-limit") o.prompt_limit = args.count(flag, 1);
        else if (flag == "--steps") o.steps = args.count(flag, 0);
        else if (flag == "--temperature") o.temperature = args.real(flag, 0.0, 100.0);
        else if (flag == "--seed") o.seed = args.count(flag, 0);
        else if (flag == "--chunk") o.chunk = args.count(flag, 1, 1 << 20);
        else if (flag == "--cache") o.cache.cache = args.value(flag);
        else if (flag == "--evict") o.cache.evict = args.value(flag);
        else if (flag == "--evict-every") o.cache.every = args.count(flag, 0, 1 << 20);
        else if (flag == "--merge") o.cache.merge = args.value(flag);
        else if (flag == "--project") o.cache.project = args.value(flag);
        else if (flag == "--compare") o.compare = args.value(flag);
        else if (flag == "--quiet") o.quiet = true;
        else throw engine::usage_error("unknown option " + flag);
    }
    if (o.model.empty()) throw engine::usage_error("--model FILE is required");
    if (o.prompt_given && !o.prompt_file.empty()) throw engine::usage_error("give --prompt or --prompt-file, not both");
    return o;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string mebibytes(std::size_t bytes) {
    char text[32];
    std::snprintf(text, sizeof text, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
    return text;
}

// One cache and what it measured while the engine ran.
struct run {
    engine::cache_spec spec;
    std::unique_ptr<engine::timed_cache> cache;
    std::vector<float> logits; // of the last step
    double prefill_seconds = 0.0, compress_seconds = 0.0, decode_seconds = 0.0, decode_attention_seconds = 0.0;
    std::size_t decode_steps = 0;
    std::size_t query_window_bytes = 0; // held at the end of the prompt, until its compression

    run(const kvc::cache_config& config, engine::cache_spec chosen, const engine::calibration& calibrated)
        : spec(std::move(chosen)),
          cache(std::make_unique<engine::timed_cache>(engine::make_cache(config, spec, calibrated))) {}

    void prefill(engine::transformer& model, const std::vector<int>& prompt, std::size_t chunk) {
        const auto start = std::chrono::steady_clock::now();
        const float* out = model.prefill(prompt.data(), prompt.size(), 0, *cache, chunk);
        prefill_seconds += seconds_since(start);
        logits.assign(out, out + model.shape().vocab);
        // The prompt is complete: compress every layer now. Left to the
        // cache's after-prefill schedule, each layer's compression would run
        // inside the first decode step's append, and the first new token would
        // wait for all of them (about 110 ms for a 2048-token prompt, 4 layers
        // of 8 KV heads, q4_0 + SnapKV: BM_prompt_compression in kvc_bench).
        // Same compression, same outputs; only its time moves here, where the
        // summary reports it on its own.
        query_window_bytes = cache->query_window_bytes();
        for (std::size_t layer = 0; layer < model.shape().layers; ++layer) cache->compress(layer);
        compress_seconds = cache->compress_seconds();
    }
    void decode(engine::transformer& model, int token, std::size_t position) {
        const double attention_before = cache->attention_seconds();
        const auto start = std::chrono::steady_clock::now();
        const float* out = model.decode(token, static_cast<std::int64_t>(position), *cache);
        decode_seconds += seconds_since(start);
        decode_attention_seconds += cache->attention_seconds() - attention_before;
        ++decode_steps;
        logits.assign(out, out + model.shape().vocab);
    }
    double decode_rate() const { return decode_steps ? static_cast<double>(decode_steps) / decode_seconds : 0.0; }
    double attention_micros_per_step() const {
        return decode_steps ? 1e6 * decode_attention_seconds / static_cast<double>(decode_steps) : 0.0;
    }
};

std::string format(const char* pattern, double value) {
    char text[64];
    std::snprintf(text, sizeof text, pattern, value);
    return text;
}

int generate(const options& o) {
    engine::transformer model = engine::transformer::load(o.model);
    const engine::model_shape& shape = model.shape();
    const engine::tokenizer words = engine::tokenizer_for(o.model, o.tokenizer_path, shape.vocab);

    // The prompt, as tokens.
    std::string prompt_text = o.prompt;
    if (!o.prompt_file.empty())
        prompt_text = engine::read_file(o.prompt_file, "--prompt-file");
    else if (!o.prompt_given)
        prompt_text = words.byte_level() ? "def " : "Once upon a time";
    std::vector<int> prompt = words.encode(prompt_text);
    if (o.prompt_limit && prompt.size() > o.prompt_limit) prompt.resize(o.prompt_limit);
    if (prompt.empty())
        throw engine::usage_error("the prompt is empty and a byte-level model has no start token; give --prompt TEXT");
    if (!engine::sum_within(prompt.size(), o.steps, shape.context))
        throw engine::usage_error("the prompt (" + std::to_string(prompt.size()) + " tokens) plus --steps " +
                                  std::to_string(o.steps) + " exceeds the model's context of " +
                                  std::to_string(shape.context) + " tokens; use --prompt-limit or fewer --steps");

    // The caches: the one under test and, with --compare, a reference.
    // Calibrated methods (cq:*, kvquant:*, qfilter, head_roles, pca, loki) learn from stories the model writes
    // itself from fixed seeds (from BOS, or a newline for a byte-level model).
    const engine::calibration calibrated =
        engine::generated_calibration(model, words.byte_level() ? '\n' : words.bos(), engine::calibration_seed);
    const kvc::cache_config config = engine::kv_cache_config(shape);
    std::vector<run> runs;
    runs.emplace_back(config, o.cache, calibrated);
    if (!o.compare.empty()) runs.emplace_back(config, engine::cache_spec{o.compare, "none"}, calibrated);

    const std::string sampling =
        o.temperature > 0 ? "temperature " + format("%g", o.temperature) + ", seed " + std::to_string(o.seed) : "greedy";
    std::printf("kvc_engine: %s (%s), kernels %s\n", o.model.c_str(), engine::transformer::describe(shape).c_str(),
                kvc::name_of(kvc::active_arch()));
    std::printf("cache %s%s; prompt %zu tokens%s; %s, up to %zu new tokens\n\n", o.cache.label().c_str(),
                o.compare.empty() ? "" : (" compared with " + o.compare).c_str(), prompt.size(),
                o.prompt_file.empty() ? "" : (" from " + o.prompt_file).c_str(), sampling.c_str(), o.steps);

    for (run& r : runs) r.prefill(model, prompt, o.chunk);
    if (!o.quiet) {
        // A long prompt from a file is shown by its last lines, for context.
        std::string shown = words.decode(prompt);
        if (!o.prompt_file.empty()) {
            std::size_t start = shown.size();
            for (int lines = 0; lines < 3 && start > 0; ++lines) start = shown.rfind('\n', start - 1);
            shown = "[... prompt continues from the file ...]\n" + shown.substr(start == std::string::npos ? 0 : start + 1);
        }
        std::fputs(shown.c_str(), stdout);
    }

    // Generation: the tested cache's logits choose each token; the reference
    // cache, if any, is fed the same token and its prediction compared first.
    engine::sampler choose(o.temperature, o.seed);
    engine::agreement compared(shape.vocab);
    std::vector<int> generated;
    int previous = prompt.back();
    while (generated.size() < o.steps) {
        if (runs.size() == 2) compared.add(runs[1].logits.data(), runs[0].logits.data(), -1);
        const int next = choose.next(runs[0].logits.data(), shape.vocab);
        if (next == words.eos()) break;
        generated.push_back(next);
        if (!o.quiet) {
            std::fputs(words.piece(next, previous).c_str(), stdout);
            std::fflush(stdout);
        }
        previous = next;
        if (generated.size() == o.steps) break; // the last token need not run
        for (run& r : runs) r.decode(model, next, prompt.size() + generated.size() - 1);
    }
    if (!o.quiet) std::printf("\n\n");

    // Summary. bytes() after shrink_to_fit: what the held rows need, not spare capacity.
    for (run& r : runs) r.cache->shrink_to_fit();
    const std::size_t tokens = prompt.size() + runs[0].decode_steps;
    if (runs.size() == 1) {
        const run& r = runs[0];
        std::printf("cache %s: %s for %zu tokens (%.1f%% of the rows seen are kept; %s of recent queries "
                    "held until the prompt's compression, %s after)\n",
                    r.spec.label().c_str(), mebibytes(r.cache->bytes()).c_str(), tokens,
                    100.0 * static_cast<double>(r.cache->rows()) /
                        static_cast<double>(shape.layers * shape.kv_heads * tokens),
                    mebibytes(r.query_window_bytes).c_str(), mebibytes(r.cache->query_window_bytes()).c_str());
        std::printf("prefill %zu tokens at %.0f tokens/s, then compression of the prompt %.1f ms; decode %zu "
                    "tokens at %.0f tokens/s, %.1f us of attention per step\n",
                    prompt.size(), static_cast<double>(prompt.size()) / r.prefill_seconds, 1e3 * r.compress_seconds,
                    r.decode_steps, r.decode_rate(), r.attention_micros_per_step());
        return 0;
    }
    const run &tested = runs[0], &reference = runs[1];
    const double bytes_ratio = static_cast<double>(tested.cache->bytes()) / static_cast<double>(reference.cache->bytes());
    const std::string left = "tested " + tested.spec.label(), right = "reference " + reference.spec.label();
    const int width = static_cast<int>(std::max<std::size_t>(22, left.size() + 2));
    auto row = [width](const char* what, const std::string& a, const std::string& b, const std::string& ratio) {
        std::printf("%-26s %-*s %-22s %s\n", what, width, a.c_str(), b.c_str(), ratio.c_str());
    };
    row("", left, right, "");
    row("KV cache memory", mebibytes(tested.cache->bytes()), mebibytes(reference.cache->bytes()),
        format("%.2fx", bytes_ratio));
    row("compress after prefill", format("%.1f ms", 1e3 * tested.compress_seconds),
        format("%.1f ms", 1e3 * reference.compress_seconds), "");
    row("query window until then", mebibytes(tested.query_window_bytes), mebibytes(reference.query_window_bytes), "");
    row("decode speed", format("%.0f tokens/s", tested.decode_rate()), format("%.0f tokens/s", reference.decode_rate()),
        "");
    row("attention per decode step", format("%.1f us", tested.attention_micros_per_step()),
        format("%.1f us", reference.attention_micros_per_step()),
        format("%.2fx", tested.attention_micros_per_step() / reference.attention_micros_per_step()));
    std::printf("%-26s same next token at %.1f%% of %zu steps; KL(reference || tested) mean %.2g nats, p99 %.2g\n",
                "agreement", 100.0 * compared.top1(), compared.positions(), compared.mean_kl(),
                compared.percentile_kl(99.0));
    std::printf("\n=> %s holds the KV cache in %.2fx the memory of %s and chose the same next token at %.1f%% of "
                "%zu steps.\n",
                tested.spec.label().c_str(), bytes_ratio, reference.spec.label().c_str(), 100.0 * compared.top1(),
                compared.positions());
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    try {
        return generate(parse(argc, argv));
    } catch (const engine::usage_error& e) {
        std::fprintf(stderr, "kvc_engine: %s\n(run kvc_engine --help for usage)\n", e.what());
        return 2;
    } catch (const std::invalid_argument& e) { // a --cache/--evict/--compare spelling the registry does not know
        std::fprintf(stderr, "kvc_engine: %s\n(run kvc_engine --help for usage)\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kvc_engine: error: %s\n", e.what());
        return 1;
    }
}
