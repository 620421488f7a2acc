// kvc-fidelity: what a compressed KV cache costs on a real model.
//
//   kvc-fidelity --model models/kvref/model.bin --cache none:f16
//   kvc-fidelity --model ../shared/models/stories260K/model.bin --cache full:bf16 --markdown
//   kvc-fidelity --list            # every configuration scripts/fidelity.sh sweeps
//
// Runs the model over the same text twice, with the reference cache
// (kvc::full_cache with fp32 rows unless --reference says otherwise) and with
// the tested configuration, and reports perplexity and its change, KL(ref ||
// tested) of the next-token distributions (mean and 99th percentile), top-1
// agreement, cache bytes and time inside attention, each relative to the
// reference. See fidelity.hpp for exactly what is scored: per window, the
// first --prompt tokens are prefilled in chunks, the next --tokens are decoded
// one by one, and only those decode steps' predictions are scored.
//
// Text: --text FILE, or for a byte-level model the eval.txt next to it; for a
// model with a tokenizer and no --text, text the model generates itself with
// full_cache from a fixed seed (one window per seed: --seed, --seed + 1, ...).
//
// Calibrated policies (codecs cq:*, kvquant:*; eviction qfilter, head_roles;
// projection pca, loki) learn from text no window scores: the last 4 x `context` tokens of the text
// file, as 4 sequences (the windows are taken from its start, and a text too
// short for both is an error), or for generated text 4 stories of `context`
// tokens from seeds --seed + --windows, ...
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include "cache_choice.hpp"
#include "calibration.hpp"
#include "cli.hpp"
#include "fidelity.hpp"
#include "model.hpp"
#include "tokenizer.hpp"

namespace {

const char* const usage = R"(usage: kvc-fidelity --model FILE [options]

  --model FILE         llama2.c checkpoint (fp32, version 0)
  --tokenizer FILE     tokenizer.bin (default: the one next to the model; byte level for a 256-token vocabulary)
  --text FILE          text to score (default: eval.txt next to a byte-level model; else text the model generates)
  --cache SPEC         tested KV cache (default none:f16; see --list)
  --evict SPEC         its eviction policy (default none)
  --evict-every N      also compress during decode whenever a head is N tokens over budget (default 0: after the prompt only)
  --merge NAME         fold what eviction drops into what it keeps (default none; e.g. compensation)
  --project SPEC       project keys and values (default none; e.g. think:0.4, pca:32, loki:16:0.125, cskv:32:32; not with --merge)
  --reference SPEC     reference cache (default full:f32)
  --prompt N           tokens prefilled per window (default: half the model's context)
  --tokens M           tokens decoded and scored per window (default: a quarter of the context)
  --chunk N            prefill chunk size (default 64)
  --windows W          disjoint text windows, each with fresh caches (default 4)
  --seed S             seed of generated text (default 42)
  --temperature T      sampling temperature of generated text (default 1; 0 = greedy)
  --json FILE          also write the JSON report to FILE
  --markdown           print a Markdown table row instead of JSON
  --markdown-header    print the header of that table and exit
  --list               print every configuration of the sweep (method, cache, evict, evict-every, merge, project; tab-separated) and exit
  --help
)";

struct options {
    std::string model, tokenizer_path, text, json;
    engine::fidelity_setup setup;
    bool prompt_given = false, tokens_given = false, markdown = false;
    std::size_t windows = 4;
    std::uint64_t seed = 42;
    double temperature = 1.0;
};

options parse(int argc, char** argv) {
    engine::arguments args(argc, argv);
    options o;
    o.setup.tested = {"none:f16", "none"};
    while (!args.done()) {
        const std::string flag = args.flag();
        if (flag == "--help") {
            std::fputs(usage, stdout);
            std::exit(0);
        } else if (flag == "--list") {
            for (const engine::sweep_point& point : engine::sweep_points())
                std::printf("%s\t%s\t%s\t%zu\t%s\t%s\n", point.method.c_str(), point.spec.cache.c_str(),
                            point.spec.evict.c_str(), point.spec.every, point.spec.merge.c_str(),
                            point.spec.project.c_str());
            std::exit(0);
        } else if (flag == "--markdown-header") {
            std::fputs(engine::markdown_header().c_str(), stdout);
            std::exit(0);
        } else if (flag == "--model") o.model = args.value(flag);
        else if (flag == "--tokenizer") o.tokenizer_path = args.value(flag);
        else if (flag == "--text") o.text = args.value(flag);
        else if (flag == "--cache") o.setup.tested.cache = args.value(flag);
        else if (flag == "--evict") o.setup.tested.evict = args.value(flag);
        else if (flag == "--evict-every") o.setup.tested.every = args.count(flag, 0, 1 << 20);
        else if (flag == "--merge") o.setup.tested.merge = args.value(flag);
        else if (flag == "--project") o.setup.tested.project = args.value(flag);
        else if (flag == "--reference") o.setup.reference.cache = args.value(flag);
        else if (flag == "--prompt") o.setup.prompt = args.count(flag, 1), o.prompt_given = true;
        else if (flag == "--tokens") o.setup.scored = args.count(flag, 1), o.tokens_given = true;
        else if (flag == "--chunk") o.setup.chunk = args.count(flag, 1, 1 << 20);
        else if (flag == "--windows") o.windows = args.count(flag, 1, 10000);
        else if (flag == "--seed") o.seed = args.count(flag, 0);
        else if (flag == "--temperature") o.temperature = args.real(flag, 0.0, 100.0);
        else if (flag == "--json") o.json = args.value(flag);
        else if (flag == "--markdown") o.markdown = true;
        else throw engine::usage_error("unknown option " + flag);
    }
    if (o.model.empty()) throw engine::usage_error("--model FILE is required");
    return o;
}

int measure(options o) {
    engine::transformer model = engine::transformer::load(o.model);
    const engine::model_shape& shape = model.shape();
    const engine::tokenizer words = engine::tokenizer_for(o.model, o.tokenizer_path, shape.vocab);
    engine::fidelity_setup& setup = o.setup;
    if (!o.prompt_given) setup.prompt = shape.context / 2;
    if (!o.tokens_given) setup.scored = shape.context / 4;
    // Positions 0 .. prompt + scored - 1 run through the model.
    if (!engine::sum_within(setup.prompt, setup.scored, shape.context))
        throw engine::usage_error("--prompt " + std::to_string(setup.prompt) + " + --tokens " +
                                  std::to_string(setup.scored) + " exceeds the model's context of " +
                                  std::to_string(shape.context) + " tokens");
    const std::size_t window_tokens = setup.prompt + setup.scored + 1;
    std::vector<std::vector<int>> windows;
    if (o.text.empty() && words.byte_level()) {
        const auto beside = std::filesystem::path(o.model).parent_path() / "eval.txt";
        if (!std::filesystem::exists(beside))
            throw engine::usage_error("no --text FILE given and no eval.txt next to " + o.model);
        o.text = beside.string();
    }
    std::vector<int> tokens;
    engine::calibration calibrated;
    if (!o.text.empty()) {
        tokens = words.encode(engine::read_file(o.text, "--text"));
        if (tokens.size() < o.windows * window_tokens)
            throw engine::usage_error(o.text + " has " + std::to_string(tokens.size()) + " tokens, fewer than " +
                                      std::to_string(o.windows) + " windows of " + std::to_string(window_tokens) +
                                      " (prompt + tokens + 1); lower --windows, --prompt or --tokens");
        calibrated = engine::text_tail_calibration(model, tokens, shape.context, o.windows * window_tokens, o.text);
    } else {
        calibrated = engine::generated_calibration(model, words.bos(), o.seed + o.windows);
    }
    // Check both spellings before any work, so a typo fails at once.
    engine::make_cache(engine::kv_cache_config(shape), setup.reference, calibrated);
    engine::make_cache(engine::kv_cache_config(shape), setup.tested, calibrated);

    if (!o.text.empty()) {
        for (std::size_t w = 0; w < o.windows; ++w)
            windows.emplace_back(tokens.begin() + static_cast<std::ptrdiff_t>(w * window_tokens),
                                 tokens.begin() + static_cast<std::ptrdiff_t>((w + 1) * window_tokens));
        setup.text = o.text;
    } else {
        // The model's own text: stories from BOS, one seed per window. The
        // last token is only predicted, so generation stops within the context.
        for (std::size_t w = 0; w < o.windows; ++w)
            windows.push_back(engine::generate_text(model, words.bos(), window_tokens, o.temperature, o.seed + w));
        setup.text = "generated by the model with full:f32 (temperature " + engine::format_number(o.temperature) +
                     ", seeds " + std::to_string(o.seed) + ".." + std::to_string(o.seed + o.windows - 1) + ")";
    }
    setup.model = o.model;

    const engine::fidelity_report report = engine::measure_fidelity(model, windows, setup, calibrated);
    const std::string json = engine::to_json(report);
    if (!o.json.empty()) {
        engine::write_file(o.json, json, "--json");
    }
    std::fputs(o.markdown ? engine::markdown_row(report).c_str() : json.c_str(), stdout);
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    try {
        return measure(parse(argc, argv));
    } catch (const engine::usage_error& e) {
        std::fprintf(stderr, "kvc-fidelity: %s\n(run kvc-fidelity --help for usage)\n", e.what());
        return 2;
    } catch (const std::invalid_argument& e) { // a --cache/--evict/--reference spelling the registry does not know
        std::fprintf(stderr, "kvc-fidelity: %s\n(run kvc-fidelity --help for usage)\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kvc-fidelity: error: %s\n", e.what());
        return 1;
    }
}
