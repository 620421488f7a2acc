// examples/engine/fidelity.hpp -- what a compressed KV cache costs, measured
// on a real model against a reference cache.
//
// The model runs over the same tokens twice, once per cache, exactly as an
// engine would: the first `prompt` tokens are prefilled through the cache in
// chunks (append + attend_chunk; policies that compress after the prompt do it
// here), then `scored` more tokens are fed one at a time through the decode
// path (append + attend; decode-time policies run) with the text's own tokens
// (teacher forcing). Only the predictions of those decode steps are scored:
// step i sees tokens up to prompt + i and predicts token prompt + i + 1. So a
// window needs prompt + scored + 1 tokens.
//
// Per scored position, with P the reference's next-token distribution and Q
// the tested cache's: KL(P || Q) in nats, whether the most likely tokens agree
// (top-1), and each cache's negative log-likelihood of the true next token
// (perplexity = exp of its mean). The reference is kvc::full_cache storing
// fp32 rows ("full:f32") unless told otherwise.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache_choice.hpp"
#include "model.hpp"
#include "sampling.hpp"

namespace engine {

// Next-token distributions of a reference and a tested cache, compared
// position by position. Everything in double.
class agreement {
public:
    explicit agreement(std::size_t vocab) : vocab_(vocab), reference_log_(vocab), tested_log_(vocab) {}

    // `target`: the token that really came next, or -1 (then no perplexity).
    void add(const float* reference, const float* tested, int target) {
        log_softmax(reference, reference_log_);
        log_softmax(tested, tested_log_);
        double kl = 0.0;
        for (std::size_t i = 0; i < vocab_; ++i)
            kl += std::exp(reference_log_[i]) * (reference_log_[i] - tested_log_[i]);
        kl_.push_back(kl > 0.0 ? kl : 0.0); // KL >= 0; a negative sum is rounding around an exact 0
        if (argmax(reference, vocab_) == argmax(tested, vocab_)) ++top1_matches_;
        if (target >= 0) {
            reference_nll_ -= reference_log_[static_cast<std::size_t>(target)];
            tested_nll_ -= tested_log_[static_cast<std::size_t>(target)];
            ++targets_;
        }
    }

    std::size_t positions() const noexcept { return kl_.size(); }
    double mean_kl() const {
        double total = 0.0;
        for (double kl : kl_) total += kl;
        return kl_.empty() ? 0.0 : total / static_cast<double>(kl_.size());
    }
    // Nearest-rank percentile (p in 0..100) of the per-position KL.
    double percentile_kl(double p) const {
        if (kl_.empty()) return 0.0;
        std::vector<double> sorted = kl_;
        std::sort(sorted.begin(), sorted.end());
        const double rank = std::ceil(p / 100.0 * static_cast<double>(sorted.size()));
        const std::size_t index = rank < 1.0 ? 0 : static_cast<std::size_t>(rank) - 1;
        return sorted[std::min(index, sorted.size() - 1)];
    }
    double max_kl() const { return kl_.empty() ? 0.0 : *std::max_element(kl_.begin(), kl_.end()); }
    double top1() const { return kl_.empty() ? 0.0 : static_cast<double>(top1_matches_) / static_cast<double>(kl_.size()); }
    double reference_perplexity() const { return targets_ ? std::exp(reference_nll_ / static_cast<double>(targets_)) : 0.0; }
    double tested_perplexity() const { return targets_ ? std::exp(tested_nll_ / static_cast<double>(targets_)) : 0.0; }

private:
    void log_softmax(const float* logits, std::vector<double>& out) const {
        double largest = logits[0];
        for (std::size_t i = 1; i < vocab_; ++i) largest = std::max(largest, static_cast<double>(logits[i]));
        double total = 0.0;
        for (std::size_t i = 0; i < vocab_; ++i) total += std::exp(static_cast<double>(logits[i]) - largest);
        const double log_total = largest + std::log(total);
        for (std::size_t i = 0; i < vocab_; ++i) out[i] = static_cast<double>(logits[i]) - log_total;
    }

    std::size_t vocab_;
    std::vector<double> reference_log_, tested_log_, kl_;
    std::size_t top1_matches_ = 0, targets_ = 0;
    double reference_nll_ = 0.0, tested_nll_ = 0.0;
};

// One window through `model` with `cache` as an engine runs it (see the top
// of this file). Returns the [scored][vocab] logits of the decode steps; row i
// predicts tokens[prompt + i + 1].
inline std::vector<float> decode_logits(transformer& model, kv_cache& cache, const std::vector<int>& tokens,
                                        std::size_t prompt, std::size_t scored, std::size_t chunk) {
    if (prompt == 0) throw std::invalid_argument("the prompt needs at least one token");
    if (prompt > tokens.size() || scored >= tokens.size() - prompt) // prompt + scored + 1 > size, unwrapped
        throw std::invalid_argument("a window of " + std::to_string(tokens.size()) + " tokens is too short for " +
                                    std::to_string(prompt) + " prompt + " + std::to_string(scored) +
                                    " scored tokens (+1 to predict)");
    const std::size_t vocab = model.shape().vocab;
    std::vector<float> logits(scored * vocab);
    model.prefill(tokens.data(), prompt, 0, cache, chunk);
    for (std::size_t i = 0; i < scored; ++i) {
        const float* row = model.decode(tokens[prompt + i], static_cast<std::int64_t>(prompt + i), cache);
        std::copy(row, row + vocab, logits.begin() + static_cast<std::ptrdiff_t>(i * vocab));
    }
    return logits;
}

// Text the model writes itself: `first_token`, then length - 1 tokens sampled
// with a full:f32 cache (greedy when temperature <= 0).
inline std::vector<int> generate_text(transformer& model, int first_token, std::size_t length, double temperature,
                                      std::uint64_t seed) {
    const auto cache = make_cache(kv_cache_config(model.shape()), cache_spec{"full:f32", "none"});
    sampler choose(temperature, seed);
    std::vector<int> tokens{first_token};
    while (tokens.size() < length) {
        const float* logits =
            model.decode(tokens.back(), static_cast<std::int64_t>(tokens.size() - 1), *cache);
        tokens.push_back(choose.next(logits, model.shape().vocab));
    }
    return tokens;
}

struct fidelity_setup {
    cache_spec reference{"full:f32", "none"};
    cache_spec tested{"full:f32", "none"};
    std::size_t prompt = 512; // tokens prefilled per window
    std::size_t scored = 256; // decode steps scored per window
    std::size_t chunk = 64;   // prefill chunk
    std::string model;        // for the report only
    std::string text;         // for the report only
    std::string calibration;  // for the report only: the calibration text, when a cache was calibrated
};

// What one cache measured, summed or averaged over the windows.
struct cache_figures {
    double perplexity = 0.0;
    double bytes = 0.0;          // after the last decode step, spare capacity returned (mean over windows)
    double rows_kept = 0.0;      // rows held / rows seen (1 without eviction)
    double attention_seconds = 0.0; // inside attend + attend_chunk, all windows
    double append_seconds = 0.0;    // inside append, all windows
};

struct fidelity_report {
    fidelity_setup setup;
    std::size_t windows = 0;
    std::size_t positions = 0; // scored positions, all windows
    cache_figures reference, tested;
    double perplexity_change_percent = 0.0;
    double kl_mean = 0.0, kl_p99 = 0.0, kl_max = 0.0;
    double top1_agreement = 0.0; // fraction in 0..1
    double bytes_ratio = 0.0;    // tested / reference
    double attention_time_ratio = 0.0;
};

// Runs every window with both caches (a fresh cache per window) and compares.
// Calibrated policies learn from `calibrated` (once, for every window).
inline fidelity_report measure_fidelity(transformer& model, const std::vector<std::vector<int>>& windows,
                                        const fidelity_setup& setup, const calibration& calibrated = {}) {
    if (windows.empty()) throw std::invalid_argument("no text windows to score");
    const model_shape& shape = model.shape();
    const kvc::cache_config config = kv_cache_config(shape);
    agreement compared(shape.vocab);
    fidelity_report report;
    report.setup = setup;
    report.windows = windows.size();
    const double rows_seen = static_cast<double>(shape.layers * shape.kv_heads * (setup.prompt + setup.scored));

    for (std::size_t w = 0; w < windows.size(); ++w) {
        timed_cache reference_cache(make_cache(config, setup.reference, calibrated));
        timed_cache tested_cache(make_cache(config, setup.tested, calibrated));
        std::vector<float> reference_logits, tested_logits;
        auto run = [&](timed_cache& cache, std::vector<float>& logits) {
            logits = decode_logits(model, cache, windows[w], setup.prompt, setup.scored, setup.chunk);
        };
        // Alternate which cache runs first, so neither always meets cold caches.
        if (w % 2 == 0) {
            run(reference_cache, reference_logits);
            run(tested_cache, tested_logits);
        } else {
            run(tested_cache, tested_logits);
            run(reference_cache, reference_logits);
        }
        for (std::size_t i = 0; i < setup.scored; ++i)
            compared.add(&reference_logits[i * shape.vocab], &tested_logits[i * shape.vocab],
                         windows[w][setup.prompt + i + 1]);

        for (auto [cache, figures] : {std::pair{&reference_cache, &report.reference},
                                      std::pair{&tested_cache, &report.tested}}) {
            cache->shrink_to_fit();
            figures->bytes += static_cast<double>(cache->bytes());    // summed here, averaged below
            figures->rows_kept += static_cast<double>(cache->rows()); // likewise
            figures->attention_seconds += cache->attention_seconds();
            figures->append_seconds += cache->append_seconds();
        }
    }
    for (cache_figures* figures : {&report.reference, &report.tested}) {
        figures->bytes /= static_cast<double>(windows.size());
        figures->rows_kept /= rows_seen * static_cast<double>(windows.size());
    }

    for (const cache_spec* spec : {&setup.tested, &setup.reference})
        if (learnt_from(calibrated, *spec)) report.setup.calibration = calibrated.text;
    report.positions = compared.positions();
    report.reference.perplexity = compared.reference_perplexity();
    report.tested.perplexity = compared.tested_perplexity();
    report.perplexity_change_percent = 100.0 * (report.tested.perplexity / report.reference.perplexity - 1.0);
    report.kl_mean = compared.mean_kl();
    report.kl_p99 = compared.percentile_kl(99.0);
    report.kl_max = compared.max_kl();
    report.top1_agreement = compared.top1();
    report.bytes_ratio = report.tested.bytes / report.reference.bytes;
    report.attention_time_ratio = report.tested.attention_seconds / report.reference.attention_seconds;
    return report;
}

// ---------------------------------------------------------------------------
// Output: JSON (one flat object, one key per line) and a Markdown table row.
// ---------------------------------------------------------------------------

namespace detail {
inline std::string json_string(const std::string& text) {
    std::string out = "\"";
    for (unsigned char c : text) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
            out += escaped;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + "\"";
}
inline std::string number(double value, const char* format = "%.9g") {
    if (!std::isfinite(value)) return "null";
    char text[64];
    std::snprintf(text, sizeof text, format, value);
    return text;
}
} // namespace detail

inline std::string to_json(const fidelity_report& r) {
    using detail::json_string;
    using detail::number;
    const fidelity_setup& s = r.setup;
    std::string j = "{\n";
    auto field = [&j](const char* key, const std::string& value, bool last = false) {
        j += "  \"" + std::string(key) + "\": " + value + (last ? "\n" : ",\n");
    };
    field("model", json_string(s.model));
    field("text", json_string(s.text));
    field("calibration_text", json_string(s.calibration));
    field("method", json_string(s.tested.method()));
    field("cache", json_string(s.tested.cache));
    field("evict", json_string(s.tested.evict));
    field("evict_every", std::to_string(s.tested.every));
    field("merge", json_string(s.tested.merge));
    field("project", json_string(s.tested.project));
    field("reference", json_string(s.reference.label()));
    field("prompt_tokens", std::to_string(s.prompt));
    field("scored_tokens", std::to_string(s.scored));
    field("chunk", std::to_string(s.chunk));
    field("windows", std::to_string(r.windows));
    field("scored_positions", std::to_string(r.positions));
    field("perplexity_reference", number(r.reference.perplexity));
    field("perplexity", number(r.tested.perplexity));
    field("perplexity_change_percent", number(r.perplexity_change_percent));
    field("kl_mean", number(r.kl_mean));
    field("kl_p99", number(r.kl_p99));
    field("kl_max", number(r.kl_max));
    field("top1_agreement", number(r.top1_agreement));
    field("cache_bytes_reference", number(r.reference.bytes, "%.0f"));
    field("cache_bytes", number(r.tested.bytes, "%.0f"));
    field("bytes_ratio", number(r.bytes_ratio));
    field("rows_kept", number(r.tested.rows_kept));
    field("attention_seconds_reference", number(r.reference.attention_seconds));
    field("attention_seconds", number(r.tested.attention_seconds));
    field("attention_time_ratio", number(r.attention_time_ratio));
    field("append_seconds_reference", number(r.reference.append_seconds));
    field("append_seconds", number(r.tested.append_seconds));
    field("kernels", json_string(kvc::name_of(kvc::active_arch())), true);
    return j + "}\n";
}

inline std::string markdown_header() {
    return "| method | configuration | cache KiB | bytes vs ref | perplexity | change | mean KL | p99 KL | top-1 | "
           "attention time vs ref |\n"
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
}

inline std::string markdown_row(const fidelity_report& r) {
    using detail::number;
    return "| " + r.setup.tested.method() + " | `" + r.setup.tested.label() + "` | " +
           number(r.tested.bytes / 1024.0, "%.1f") + " | " + number(r.bytes_ratio, "%.3f") + " | " +
           number(r.tested.perplexity, "%.4f") + " | " + number(r.perplexity_change_percent, "%+.3f%%") + " | " +
           number(r.kl_mean, "%.2e") + " | " + number(r.kl_p99, "%.2e") + " | " +
           number(100.0 * r.top1_agreement, "%.2f%%") + " | " + number(r.attention_time_ratio, "%.2f") + " |\n";
}

} // namespace engine
