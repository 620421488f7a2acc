// kvc's registry (kvc/registry.hpp): every method by name, the spec parser,
// and the factory per method. Each factory builds its family's slot of a
// dynamic_cache (quant::any, evict::any, a merger, a projection), so this
// file instantiates each codec's store and each scorer once, and no
// combination of them: adding a method is one entry below.
#include "kvc/registry.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvc/all.hpp"
#include "kvc/core/error.hpp"

namespace kvc {
namespace {

// What the factories of a spec's terms fill in, one slot per family.
struct composition {
    std::optional<quant::any> codec;
    std::optional<evict::any> eviction;
    any_merger merging = merge::none{};
    any_projection projection = project::none{};
};

// What a factory has to work with.
struct build_context {
    const cache_config& config;
    const cache_options& options;
    const spec_term& term;
    composition& into;
};

using factory = void (*)(const build_context&);

struct entry {
    method_info info;
    factory build;
};

// "--- `snapkv:abc`": how an error names the term as written.
std::string written(const spec_term& term) {
    return term.value.empty() ? term.method->name : term.method->name + ":" + term.value;
}

// The term's value as a number in [low, high] (open at low when `open_low`).
double number(const build_context& c, double low, double high, bool open_low = false) {
    const std::string& text = c.term.value;
    char* end = nullptr;
    const double value = text.empty() ? NAN : std::strtod(text.c_str(), &end);
    const bool parsed = !text.empty() && end == text.c_str() + text.size() && std::isfinite(value);
    const bool inside = parsed && (open_low ? value > low : value >= low) && value <= high;
    detail::require(inside, "kvc::make_cache: '", written(c.term), "': expected ", c.term.method->name, ":",
                    c.term.method->parameter, " with a number in ", open_low ? "(" : "[", low, ", ", high, "], got '",
                    text, "'");
    return value;
}

// The term's value as a whole number in [low, high].
std::size_t whole(const build_context& c, std::size_t low, std::size_t high) {
    const double value = number(c, static_cast<double>(low), static_cast<double>(high));
    detail::require(value == std::floor(value), "kvc::make_cache: '", written(c.term), "': expected ",
                    c.term.method->parameter, " as a whole number, got '", c.term.value, "'");
    return static_cast<std::size_t>(value);
}

// A value of two parts, "A:B" (loki:RANK:RATIO, cskv:RANK:WINDOW): a term
// for each, so whole() and number() check and name them as they do one value.
std::pair<spec_term, spec_term> two_values(const build_context& c, const char* example) {
    const std::string& text = c.term.value;
    const std::size_t colon = text.find(':');
    detail::require(colon != std::string::npos, "kvc::make_cache: '", written(c.term), "': expected ",
                    c.term.method->name, ":", c.term.method->parameter, " (e.g. ", example, "), got ",
                    c.term.method->name, ":", text);
    return {spec_term{c.term.method, text.substr(0, colon)}, spec_term{c.term.method, text.substr(colon + 1)}};
}

const calibration::artifact& artifact_of(const build_context& c) {
    const auto found = c.options.artifacts.find(c.term.method->name);
    detail::require(found != c.options.artifacts.end(), "kvc::make_cache: '", written(c.term),
                    "' is learnt from the model: expected its calibration artifact in cache_options::artifacts[\"",
                    c.term.method->name, "\"], got none");
    return found->second;
}

template <class Codec>
void set_codec(const build_context& c, Codec codec) {
    c.into.codec.emplace(std::move(codec));
}

// An eviction policy keeping the term's share of the tokens, compressing
// after the prompt and, with options.evict_every, during decode.
template <class Scorer, class Selector = evict::per_head_topk>
void set_eviction(const build_context& c, Scorer scorer = {}, Selector selector = {}, evict::budget keep = {}) {
    keep.keep_ratio = number(c, 0.0, 1.0, true);
    const evict::schedule when{true, c.options.evict_every};
    c.into.eviction.emplace(keep, when, evict::score::any(std::move(scorer)), evict::select::any(std::move(selector)));
}
template <class Scorer>
entry scorer_entry(std::string name, std::string id, std::string summary) {
    return {{std::move(name), method_family::eviction, std::move(id), "keep_ratio", "0.25", std::move(summary)},
            [](const build_context& c) { set_eviction<Scorer>(c); }};
}

// B6: the share of (layer, KV head) pairs attending farthest back on the
// calibration text (tensor far_mass) become retrieval heads, the rest
// streaming heads; ties to the earlier head. An artifact that already marks
// them (tensor retrieval) is taken as it is.
evict::by_head_role head_roles_of(const build_context& c, double share) {
    calibration::artifact roles = artifact_of(c);
    const std::vector<std::uint64_t> shape{c.config.layers, c.config.kv_heads};
    for (const calibration::tensor& t : roles.tensors)
        if (t.name == "retrieval") return evict::by_head_role::from(roles);
    const std::vector<float>& far = roles.get("far_mass", shape).values;
    const auto retrieval_heads = static_cast<std::size_t>(std::floor(share * static_cast<double>(far.size()) + 1e-9));
    std::vector<std::size_t> order(far.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return far[a] > far[b]; });
    calibration::tensor retrieval{"retrieval", shape, std::vector<float>(far.size(), 0.0f)};
    for (std::size_t i = 0; i < retrieval_heads; ++i) retrieval.values[order[i]] = 1.0f;
    roles.tensors.push_back(std::move(retrieval));
    return evict::by_head_role::from(roles);
}

const std::vector<entry>& entries() {
    namespace q = quant;
    namespace e = evict;
    using s = method_family;
    static const std::vector<entry> list = {
        // Quantization: the codec of the rows (docs/METHODS.md Q1-Q10).
        {{"none:f32", s::quantization, "", "", "", "rows as they are, fp32"},
         [](const build_context& c) { set_codec(c, q::none<float>{}); }},
        {{"none:f16", s::quantization, "", "", "", "rows as they are, fp16"},
         [](const build_context& c) { set_codec(c, q::none<half>{}); }},
        {{"none:bf16", s::quantization, "", "", "", "rows as they are, bf16"},
         [](const build_context& c) { set_codec(c, q::none<bfloat16>{}); }},
        {{"q8_0", s::quantization, "Q1", "", "", "int8 symmetric, groups of 32 (ggml q8_0), 8.5 bits/value"},
         [](const build_context& c) { set_codec(c, q::q8_0{}); }},
        {{"q4_0", s::quantization, "Q1", "", "", "int4 symmetric, groups of 32 (ggml q4_0), 4.5 bits/value"},
         [](const build_context& c) { set_codec(c, q::q4_0{}); }},
        {{"q4_1", s::quantization, "Q1", "", "", "int4 asymmetric, groups of 32 (ggml q4_1), 5 bits/value"},
         [](const build_context& c) { set_codec(c, q::q4_1{}); }},
        {{"int8:g64", s::quantization, "Q1", "", "", "int8 symmetric, groups of 64, 8.25 bits/value"},
         [](const build_context& c) { set_codec(c, q::block<q::int8_sym, 64>{}); }},
        {{"int4:g64", s::quantization, "Q1", "", "", "int4 asymmetric, groups of 64, 4.5 bits/value"},
         [](const build_context& c) { set_codec(c, q::block<q::int4_asym, 64>{}); }},
        {{"int2:g32", s::quantization, "Q1", "", "", "int2 asymmetric, groups of 32, 3 bits/value"},
         [](const build_context& c) { set_codec(c, q::block<q::int2_asym, 32>{}); }},
        {{"fp8:e4m3", s::quantization, "Q1", "", "", "fp8 e4m3 with a scale per 32, 8.5 bits/value"},
         [](const build_context& c) { set_codec(c, q::block<q::fp8_e4m3, 32>{}); }},
        {{"fp8:e5m2", s::quantization, "Q1", "", "", "fp8 e5m2 with a scale per 32, 8.5 bits/value"},
         [](const build_context& c) { set_codec(c, q::block<q::fp8_e5m2, 32>{}); }},
        {{"k8v4", s::quantization, "Q5", "", "", "keys int8, values int4 (groups of 32), 6.5 bits/value"},
         [](const build_context& c) { set_codec(c, q::block_kv<q::int8_sym, q::int4_sym, 32>{}); }},
        {{"k4v2", s::quantization, "Q5", "", "", "keys int4, values int2 (groups of 32), 3.75 bits/value"},
         [](const build_context& c) { set_codec(c, q::block_kv<q::int4_sym, q::int2_asym, 32>{}); }},
        {{"q4_0+sinks", s::quantization, "Q9", "", "", "q4_0 with the first 4 tokens of every head in fp16"},
         [](const build_context& c) { set_codec(c, q::block<q::int4_sym, 32, 4>{}); }},
        {{"kivi", s::quantization, "Q2", "bits", "2",
          "KIVI: keys per channel, values per token, at 2 or 4 bits; the newest 128+ in fp16"},
         [](const build_context& c) {
             const double bits = number(c, 2, 4);
             detail::require(bits == 2 || bits == 4, "kvc::make_cache: '", written(c.term),
                             "': expected kivi:2 or kivi:4, got kivi:", c.term.value);
             if (bits == 2) set_codec(c, q::kivi<2>{});
             else set_codec(c, q::kivi<4>{});
         }},
        {{"gear", s::quantization, "Q7", "", "", "GEAR: 4-bit groups, 2% outliers kept exactly, a rank-2 residual"},
         [](const build_context& c) { set_codec(c, q::gear{}); }},
        {{"hadamard:q4_0", s::quantization, "Q4", "", "", "Hadamard rotation of keys and values, then q4_0"},
         [](const build_context& c) { set_codec(c, q::rotated<q::q4_0>{}); }},
        {{"hadamard:k4v2", s::quantization, "Q4", "", "", "Hadamard rotation, then keys int4, values int2"},
         [](const build_context& c) { set_codec(c, q::rotated<q::block_kv<q::int4_sym, q::int2_asym, 32>>{}); }},
        {{"sparse", s::quantization, "Q10", "sparsity", "0.5",
          "Mustafar: that share of each key and value row dropped, the rest as bitmap + fp16"},
         [](const build_context& c) { set_codec(c, q::sparse(number(c, 0.0, 1.0))); }},
        {{"cq:c4b8", s::quantization, "Q8", "", "", "CQ: 4 channels per 8-bit code (2 bits/channel), learnt codebooks",
          true},
         [](const build_context& c) { set_codec(c, q::cq(artifact_of(c))); }},
        {{"cq:c8b8", s::quantization, "Q8", "", "", "CQ: 8 channels per 8-bit code (1 bit/channel), learnt codebooks",
          true},
         [](const build_context& c) { set_codec(c, q::cq(artifact_of(c))); }},
        {{"kvquant", s::quantization, "Q3", "", "",
          "KVQuant: pre-RoPE per-channel keys, 1% sparse outliers, learnt codebooks (bits as calibrated)", true},
         [](const build_context& c) { set_codec(c, q::kvquant(artifact_of(c), c.options.rope)); }},
        {{"mixed:int8/int2", s::quantization, "Q6", "high_fraction", "0.2",
          "mixed precision: that share of the tokens, the most attended, in int8, the rest int2"},
         [](const build_context& c) { set_codec(c, q::mixed<q::int8_sym, q::int2_asym, 32>(number(c, 0.0, 1.0))); }},
        {{"mixed:int4/int2", s::quantization, "Q6", "high_fraction", "0.2",
          "mixed precision: that share of the tokens, the most attended, in int4, the rest int2"},
         [](const build_context& c) { set_codec(c, q::mixed<q::int4_sym, q::int2_asym, 32>(number(c, 0.0, 1.0))); }},

        // Eviction: which tokens stay (E1-E18 scorers, B2-B6 selectors and budgets).
        {{"none", s::eviction, "", "", "", "keep every token"}, [](const build_context&) {}},
        scorer_entry<e::score::streaming>("streaming", "E1", "StreamingLLM: attention sinks + newest tokens"),
        scorer_entry<e::score::h2o>("h2o", "E2", "H2O: attention accumulated over all queries"),
        scorer_entry<e::score::a2sf>("a2sf", "E3", "A2SF: accumulated attention with a forgetting factor"),
        scorer_entry<e::score::scissorhands>("scissorhands", "E4", "Scissorhands: persistence of high attention"),
        scorer_entry<e::score::snapkv>("snapkv", "E5", "SnapKV: attention of the last 64 queries, pooled"),
        scorer_entry<e::score::tova>("tova", "E6", "TOVA: attention of the newest query"),
        scorer_entry<e::score::knorm>("knorm", "E7", "K-norm: keep low-norm keys"),
        scorer_entry<e::score::keydiff>("keydiff", "E8", "KeyDiff: keep keys unlike the mean key"),
        scorer_entry<e::score::expected_attention>("expected_attention", "E9",
                                                   "expected attention from query statistics"),
        {{"qfilter", s::eviction, "E10", "keep_ratio", "0.25",
          "Q-Filters: keys along each head's dominant query direction (learnt)", true},
         [](const build_context& c) { set_eviction(c, e::score::qfilter::from(artifact_of(c))); }},
        scorer_entry<e::score::lagkv>("lagkv", "E11", "LagKV: lag-relative information, chunks of 128"),
        {{"lagkv16", s::eviction, "E11", "keep_ratio", "0.25", "LagKV with chunks of 16 (short prompts)"},
         [](const build_context& c) {
             e::score::lagkv lag16;
             lag16.lag = 16;
             set_eviction(c, lag16);
         }},
        scorer_entry<e::score::leverage>("leverage", "E12", "leverage scores of the keys"),
        scorer_entry<e::score::cur>("cur", "E13", "CUR: key norm x value norm, windowed"),
        scorer_entry<e::score::value_weighted<>>("value_weighted", "E14",
                                                 "value-weighted SnapKV: attention x value norm"),
        scorer_entry<e::score::hash_evict>("hash_evict", "E15", "HashEvict: LSH distance of keys to the query"),
        scorer_entry<e::score::global_local>("global_local", "E16", "global-local importance"),
        scorer_entry<e::score::random>("random", "E17", "random: the baseline every scorer must beat"),
        scorer_entry<e::score::external>("external", "E18",
                                         "scores the engine writes into external_scores(layer, kv_head)"),
        {{"adakv", s::eviction, "B2", "keep_ratio", "0.25",
          "AdaKV over SnapKV scores: one budget per layer shared by its heads"},
         [](const build_context& c) { set_eviction(c, e::score::snapkv{}, e::adakv{}); }},
        {{"pyramidkv", s::eviction, "B3", "keep_ratio", "0.25",
          "PyramidKV over SnapKV scores: more tokens in lower layers"},
         [](const build_context& c) {
             e::budget keep;
             keep.layers = e::layer_allocation::pyramid();
             set_eviction(c, e::score::snapkv{}, e::per_head_topk{}, keep);
         }},
        {{"chunkkv", s::eviction, "B4", "keep_ratio", "0.25", "ChunkKV over SnapKV scores: whole chunks of 10 tokens"},
         [](const build_context& c) { set_eviction(c, e::score::snapkv{}, e::chunkkv{}); }},
        {{"head_roles", s::eviction, "B6", "retrieval_share", "0.25",
          "head roles: that share of the KV heads (those attending farthest back, learnt) keep every token, the "
          "rest sinks + newest 16", true},
         [](const build_context& c) {
             const double share = number(c, 0.0, 1.0, true);
             c.into.eviction.emplace(e::budget::ratio(share), e::schedule{true, c.options.evict_every},
                                     e::score::any(e::score::streaming{}), e::select::any(head_roles_of(c, share)));
         }},

        // Merging: what eviction drops, folded into what it keeps (M1-M5).
        {{"merge:none", s::merging, "", "", "", "what eviction drops is gone"}, [](const build_context&) {}},
        {{"cam", s::merging, "M1", "", "", "CaM: each dropped value spread over the next 32 kept tokens"},
         [](const build_context& c) { c.into.merging = merge::cam{}; }},
        {{"similarity", s::merging, "M2", "", "",
          "similarity merge (KVMerger, D2O): dropped values blended into the most similar kept token"},
         [](const build_context& c) { c.into.merging = merge::similarity{}; }},
        {{"zero_merge", s::merging, "M4", "", "",
          "ZeroMerge: each dropped token joins its most similar kept key as a count-weighted mean"},
         [](const build_context& c) { c.into.merging = merge::zero_merge{}; }},
        {{"compensation", s::merging, "M5", "", "",
          "one slot per head: the count-weighted mean of everything dropped, attended with log(count)"},
         [](const build_context& c) { c.into.merging = merge::compensation{}; }},

        // Projection: fewer stored channels per token (P3).
        {{"think", s::projection, "P3", "pruned_share", "0.4",
          "ThinK: that share of each head's key channels, the least used by recent queries, dropped from all but "
          "the newest 128 tokens"},
         [](const build_context& c) { c.into.projection = project::think(number(c, 0.0, 1.0)); }},
        {{"pca", s::projection, "P1", "rank", "32",
          "PCA: keys and values kept as rank-r latents in per-head bases learnt from the model, attention in the "
          "latent space", true},
         [](const build_context& c) {
             c.into.projection = project::pca(artifact_of(c), whole(c, 1, c.config.head_dim));
         }},
        {{"loki", s::projection, "P4", "rank:ratio", "32:0.125",
          "Loki: logits estimated from the leading r coordinates of keys in their principal basis (learnt), exact "
          "attention over that share of the tokens", true},
         [](const build_context& c) {
             const auto [rank_term, ratio_term] = two_values(c, "loki:32:0.125");
             const std::size_t rank = whole({c.config, c.options, rank_term, c.into}, 1, c.config.head_dim);
             const double ratio = number({c.config, c.options, ratio_term, c.into}, 0.0, 1.0, true);
             c.into.projection = project::loki(project::pca(artifact_of(c)), rank, ratio);
         }},
        {{"cskv", s::projection, "P5", "rank:window", "32:32",
          "CSKV: the newest `window` tokens of each head whole, older ones as rank-r PCA latents (learnt; any codec "
          "of width r keeps them), one softmax over both", true},
         [](const build_context& c) {
             const auto [rank_term, window_term] = two_values(c, "cskv:32:32");
             const std::size_t rank = whole({c.config, c.options, rank_term, c.into}, 1, c.config.head_dim);
             const std::size_t window = whole({c.config, c.options, window_term, c.into}, 0, std::size_t{1} << 31);
             c.into.projection = project::cskv(project::pca(artifact_of(c), rank), window);
         }},
    };
    return list;
}

// Levenshtein distance, for the close matches an error names.
std::size_t distance(std::string_view a, std::string_view b) {
    std::vector<std::size_t> row(b.size() + 1);
    std::iota(row.begin(), row.end(), std::size_t{0});
    for (std::size_t i = 1; i <= a.size(); ++i) {
        std::size_t diagonal = row[0];
        row[0] = i;
        for (std::size_t j = 1; j <= b.size(); ++j) {
            const std::size_t up = row[j];
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
            diagonal = up;
        }
    }
    return row[b.size()];
}

std::string trimmed(std::string_view text) {
    std::size_t first = 0, last = text.size();
    while (first < last && std::isspace(static_cast<unsigned char>(text[first]))) ++first;
    while (last > first && std::isspace(static_cast<unsigned char>(text[last - 1]))) --last;
    return std::string(text.substr(first, last - first));
}

// The entry a term names: the longest method name that is the whole term or
// the term up to a ':' (so "none:f16" is a name, "kivi:2" is kivi with 2).
const entry* find(const std::string& term, std::string& value) {
    const entry* best = nullptr;
    for (const entry& candidate : entries()) {
        const std::string& name = candidate.info.name;
        if (term == name) {
            value.clear();
            return &candidate;
        }
        if (!candidate.info.parameter.empty() && term.size() > name.size() + 1 && term.compare(0, name.size(), name) == 0 &&
            term[name.size()] == ':' && (!best || name.size() > best->info.name.size()))
            best = &candidate;
    }
    if (best) value = term.substr(best->info.name.size() + 1);
    return best;
}

// The names closest to `term` (its name part), for an error message.
std::string close_matches(const std::string& term) {
    const std::string name = term.substr(0, term.find(':'));
    std::vector<std::pair<std::size_t, std::string>> scored;
    for (const entry& candidate : entries()) {
        const std::string& known = candidate.info.name;
        const std::size_t d = std::min(distance(term, known), distance(name, known.substr(0, known.find(':'))));
        const bool prefix = !name.empty() && known.compare(0, name.size(), name) == 0;
        if (d <= 2 || prefix) scored.emplace_back(prefix ? 0 : d, known);
    }
    std::stable_sort(scored.begin(), scored.end());
    std::string text;
    for (std::size_t i = 0; i < scored.size() && i < 5; ++i) text += (i ? ", " : "") + scored[i].second;
    return text.empty() ? "(none close; kvc::methods() lists them all)" : text;
}

} // namespace

const char* name_of(method_family family) noexcept {
    switch (family) {
    case method_family::quantization: return "quantization";
    case method_family::eviction: return "eviction";
    case method_family::merging: return "merging";
    case method_family::projection: return "projection";
    }
    return "?";
}

const std::vector<method_info>& methods() {
    static const std::vector<method_info> list = [] {
        std::vector<method_info> infos;
        for (const entry& e : entries()) infos.push_back(e.info);
        return infos;
    }();
    return list;
}

std::vector<spec_term> parse_spec(std::string_view spec) {
    // Split on '+', then join neighbours whose joined text is a method name
    // ("q4_0" + "sinks" is the codec q4_0+sinks), longest first.
    std::vector<std::string> pieces;
    if (trimmed(spec).empty()) return {}; // nothing named: rows as they are, every token kept
    std::size_t start = 0;
    for (std::size_t i = 0; i <= spec.size(); ++i)
        if (i == spec.size() || spec[i] == '+') {
            pieces.push_back(trimmed(spec.substr(start, i - start)));
            start = i + 1;
        }
    std::vector<spec_term> terms;
    const entry* family_of[4] = {nullptr, nullptr, nullptr, nullptr};
    for (std::size_t i = 0; i < pieces.size();) {
        std::size_t used = 1;
        std::string value;
        const entry* found = nullptr;
        for (std::size_t n = pieces.size() - i; n >= 1 && !found; --n) {
            std::string joined = pieces[i];
            for (std::size_t j = 1; j < n; ++j) joined += "+" + pieces[i + j];
            found = find(joined, value);
            // Joined pieces must be a name as it is, not a name with a value
            // ("h2o:0.3" + "q4_0" is two terms, not h2o with "0.3+q4_0").
            if (found && n > 1 && !value.empty()) found = nullptr;
            if (found) used = n;
        }
        const std::string& term = pieces[i];
        detail::require(!term.empty(), "kvc::make_cache: expected methods joined by '+' (e.g. \"kivi:2 + snapkv:0.25\"), "
                                       "got an empty term in \"", std::string(spec), "\"");
        detail::require(found != nullptr, "kvc::make_cache: unknown method '", term,
                        "'; expected name or name:value of a method in kvc::methods(); close: ", close_matches(term));
        const method_info& info = found->info;
        if (value.empty()) value = info.default_value;
        detail::require(info.parameter.empty() || !value.empty(), "kvc::make_cache: '", info.name, "' expected a value: ",
                        info.name, ":", info.parameter);
        const auto f = static_cast<std::size_t>(info.family);
        detail::require(family_of[f] == nullptr, "kvc::make_cache: expected one ", name_of(info.family),
                        " method, got '", family_of[f] ? family_of[f]->info.name : "", "' and '", info.name, "'");
        family_of[f] = found;
        terms.push_back({&methods()[static_cast<std::size_t>(found - entries().data())], value});
        i += used;
    }
    return terms;
}

namespace {

dynamic_cache build_from(const cache_config& config, const std::vector<spec_term>& terms,
                         const cache_options& options) {
    composition into;
    for (const spec_term& term : terms) {
        const auto at = static_cast<std::size_t>(term.method - methods().data());
        entries()[at].build({config, options, term, into});
    }
    if (!into.codec) {
        switch (config.storage) {
        case dtype::f32: into.codec.emplace(quant::none<float>{}); break;
        case dtype::bf16: into.codec.emplace(quant::none<bfloat16>{}); break;
        default: into.codec.emplace(quant::none<half>{}); break;
        }
    }
    return dynamic_cache(config, std::move(*into.codec), std::move(into.eviction), std::move(into.merging),
                         std::move(into.projection));
}

} // namespace

dynamic_cache make_cache(const cache_config& config, std::string_view spec, const cache_options& options) {
    return build_from(config, parse_spec(spec), options);
}

dynamic_cache make_cache(const cache_config& config, const cache_spec& spec, const cache_options& options) {
    const std::pair<const std::string*, method_family> fields[] = {{&spec.quantization, method_family::quantization},
                                                                   {&spec.eviction, method_family::eviction},
                                                                   {&spec.merging, method_family::merging},
                                                                   {&spec.projection, method_family::projection}};
    std::vector<spec_term> terms;
    for (const auto& [text, family] : fields) {
        const std::vector<spec_term> field = parse_spec(*text);
        detail::require(field.size() <= 1, "kvc::make_cache: cache_spec::", name_of(family),
                        ": expected one method, got '", *text, "'");
        if (field.empty()) continue;
        detail::require(field[0].method->family == family, "kvc::make_cache: cache_spec::", name_of(family),
                        ": expected a method of the ", name_of(family), " family, got '", *text,
                        "', a method of the ", name_of(field[0].method->family), " family");
        terms.push_back(field[0]);
    }
    return build_from(config, terms, options);
}

} // namespace kvc
