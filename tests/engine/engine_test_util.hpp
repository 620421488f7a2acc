// tests/engine/engine_test_util.hpp -- what the engine tests share: where the
// real models are, how much work a (sanitized) build can afford, and a plain
// double-precision forward pass written independently of examples/engine.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace engine_test {

// ASan/UBSan/TSan builds at -O1 run the model 10-50x slower: use fewer tokens there.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__OPTIMIZE__)
inline constexpr bool slow_build = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer) || __has_feature(thread_sanitizer)
inline constexpr bool slow_build = true;
#else
inline constexpr bool slow_build = false;
#endif
#else
inline constexpr bool slow_build = false;
#endif

inline std::size_t scaled(std::size_t normal, std::size_t slow) { return slow_build ? slow : normal; }

// This file is tests/engine/engine_test_util.hpp: the repository is two levels up.
inline std::filesystem::path repository_root() {
    return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path();
}

// ../shared/models next to the repository (KVC_SHARED_MODELS overrides).
inline std::filesystem::path shared_models() {
    if (const char* path = std::getenv("KVC_SHARED_MODELS")) return path;
    return repository_root().parent_path() / "shared" / "models";
}

struct model_files {
    std::filesystem::path model, tokenizer, eval_text; // tokenizer, eval_text: empty when the model has none
};

// kvref ships in the repository (models/kvref); the shared copy is the fallback.
inline model_files kvref() {
    std::filesystem::path dir = repository_root() / "models" / "kvref";
    if (!std::filesystem::exists(dir / "model.bin")) dir = shared_models() / "kvref";
    return {dir / "model.bin", {}, dir / "eval.txt"};
}

// stories260K is third-party and not committed: only in ../shared/models.
inline model_files stories260k() {
    const std::filesystem::path dir = shared_models() / "stories260K";
    return {dir / "model.bin", dir / "tokenizer.bin", {}};
}

// Why a test must skip ("" when every file is there).
inline std::string missing(const model_files& files) {
    for (const auto& path : {files.model, files.tokenizer, files.eval_text})
        if (!path.empty() && !std::filesystem::exists(path))
            return "model file " + path.string() +
                   " is absent (the engine tests need ../shared/models next to the repository, "
                   "or KVC_SHARED_MODELS); skipping";
    return {};
}

#define KVC_SKIP_WITHOUT(files)                                                                                       \
    do {                                                                                                               \
        const std::string kvc_skip_reason = ::engine_test::missing(files);                                             \
        if (!kvc_skip_reason.empty()) GTEST_SKIP() << kvc_skip_reason;                                                 \
    } while (0)

// A small random checkpoint with shapes the real models do not have (head
// dim 4, GQA 2), so the engine tests that need no trained weights never skip.
struct synthetic_shape {
    std::int32_t dim = 16, hidden = 40, layers = 2, heads = 4, kv_heads = 2, vocab = 48, context = 64;
};

inline std::size_t checkpoint_floats(const synthetic_shape& s) {
    const std::size_t dim = static_cast<std::size_t>(s.dim), hidden = static_cast<std::size_t>(s.hidden),
                      layers = static_cast<std::size_t>(s.layers), vocab = static_cast<std::size_t>(s.vocab),
                      head_dim = dim / static_cast<std::size_t>(s.heads),
                      kv = static_cast<std::size_t>(s.kv_heads) * head_dim;
    return vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim) + dim +
           static_cast<std::size_t>(s.context) * head_dim;
}

// Writes the checkpoint; `trim` bytes are cut off the end (negative: that many appended).
inline void write_checkpoint(const std::filesystem::path& path, const synthetic_shape& s, unsigned seed = 7,
                             long trim = 0) {
    std::mt19937 generator(seed);
    std::normal_distribution<float> normal(0.0f, 0.3f);
    std::vector<float> weights(checkpoint_floats(s));
    for (float& value : weights) value = normal(generator);
    std::string bytes(28 + 4 * weights.size(), '\0');
    const std::int32_t header[7] = {s.dim, s.hidden, s.layers, s.heads, s.kv_heads, s.vocab, s.context};
    std::memcpy(&bytes[0], header, sizeof header);
    std::memcpy(&bytes[28], weights.data(), 4 * weights.size());
    if (trim > 0) bytes.resize(bytes.size() - static_cast<std::size_t>(trim));
    if (trim < 0) bytes.append(static_cast<std::size_t>(-trim), '\0');
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A scratch file path unique to the running test (ctest runs tests in parallel processes).
inline std::filesystem::path scratch_file(const std::string& suffix) {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    return std::filesystem::temp_directory_path() /
           ("kvc_engine_" + std::string(test->test_suite_name()) + "_" + test->name() + "_" + suffix);
}

inline std::string read_bytes(const std::filesystem::path& path) {
    std::ifstream file(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

// ---------------------------------------------------------------------------
// The oracle: the forward pass of ../shared/models/README.md, token by token,
// in double, with a plain vector as the KV store and naive softmax attention.
// Written from the format description, sharing no code with examples/engine.
// ---------------------------------------------------------------------------
class reference_model {
public:
    explicit reference_model(const std::filesystem::path& path) {
        const std::string bytes = read_bytes(path);
        if (bytes.size() < 28) throw std::runtime_error("reference_model: short file " + path.string());
        std::int32_t header[7];
        std::memcpy(header, bytes.data(), sizeof header);
        auto size = [](std::int32_t value) { return static_cast<std::size_t>(value < 0 ? -value : value); };
        dim_ = size(header[0]);
        hidden_ = size(header[1]);
        layers_ = size(header[2]);
        heads_ = size(header[3]);
        kv_heads_ = size(header[4]);
        vocab_ = size(header[5]);
        context_ = size(header[6]);
        head_dim_ = dim_ / heads_;
        weights_.resize((bytes.size() - 28) / 4);
        std::memcpy(weights_.data(), bytes.data() + 28, weights_.size() * 4);

        const std::size_t kv = kv_dim();
        std::size_t at = 0;
        auto next = [&](std::size_t floats) {
            const std::size_t start = at;
            at += floats;
            return start;
        };
        embedding_ = next(vocab_ * dim_);
        rms_att_ = next(layers_ * dim_);
        wq_ = next(layers_ * dim_ * dim_);
        wk_ = next(layers_ * kv * dim_);
        wv_ = next(layers_ * kv * dim_);
        wo_ = next(layers_ * dim_ * dim_);
        rms_ffn_ = next(layers_ * dim_);
        w1_ = next(layers_ * hidden_ * dim_);
        w2_ = next(layers_ * dim_ * hidden_);
        w3_ = next(layers_ * hidden_ * dim_);
        rms_final_ = next(dim_);
        if (at > weights_.size()) throw std::runtime_error("reference_model: truncated " + path.string());
        keys_.assign(layers_, {});
        values_.assign(layers_, {});
    }

    std::size_t vocab() const { return vocab_; }

    // Logits after feeding `token` at the next position (0, 1, 2, ...).
    std::vector<double> step(int token) {
        const std::size_t kv = kv_dim(), group = heads_ / kv_heads_, pos = position_++;
        std::vector<double> x(dim_);
        for (std::size_t i = 0; i < dim_; ++i) x[i] = w(embedding_ + static_cast<std::size_t>(token) * dim_ + i);

        for (std::size_t l = 0; l < layers_; ++l) {
            std::vector<double> h = rmsnorm(x, rms_att_ + l * dim_);
            std::vector<double> q = linear(h, wq_ + l * dim_ * dim_, dim_, dim_);
            std::vector<double> k = linear(h, wk_ + l * kv * dim_, dim_, kv);
            std::vector<double> v = linear(h, wv_ + l * kv * dim_, dim_, kv);
            rotate(q, pos);
            rotate(k, pos);
            keys_[l].insert(keys_[l].end(), k.begin(), k.end());
            values_[l].insert(values_[l].end(), v.begin(), v.end());

            const std::size_t seen = pos + 1;
            std::vector<double> attended(dim_, 0.0);
            for (std::size_t head = 0; head < heads_; ++head) {
                const std::size_t kv_head = head / group;
                std::vector<double> score(seen);
                double largest = -1e300;
                for (std::size_t t = 0; t < seen; ++t) {
                    double s = 0.0;
                    for (std::size_t d = 0; d < head_dim_; ++d)
                        s += q[head * head_dim_ + d] * keys_[l][t * kv + kv_head * head_dim_ + d];
                    score[t] = s / std::sqrt(static_cast<double>(head_dim_));
                    largest = std::max(largest, score[t]);
                }
                double total = 0.0;
                for (double& s : score) total += (s = std::exp(s - largest));
                for (std::size_t t = 0; t < seen; ++t)
                    for (std::size_t d = 0; d < head_dim_; ++d)
                        attended[head * head_dim_ + d] +=
                            score[t] / total * values_[l][t * kv + kv_head * head_dim_ + d];
            }
            const std::vector<double> projected = linear(attended, wo_ + l * dim_ * dim_, dim_, dim_);
            for (std::size_t i = 0; i < dim_; ++i) x[i] += projected[i];

            h = rmsnorm(x, rms_ffn_ + l * dim_);
            std::vector<double> gate = linear(h, w1_ + l * hidden_ * dim_, dim_, hidden_);
            const std::vector<double> up = linear(h, w3_ + l * hidden_ * dim_, dim_, hidden_);
            for (std::size_t i = 0; i < hidden_; ++i) gate[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
            const std::vector<double> down = linear(gate, w2_ + l * dim_ * hidden_, hidden_, dim_);
            for (std::size_t i = 0; i < dim_; ++i) x[i] += down[i];
        }
        return linear(rmsnorm(x, rms_final_), embedding_, dim_, vocab_);
    }

private:
    std::size_t kv_dim() const { return kv_heads_ * head_dim_; }
    double w(std::size_t index) const { return weights_[index]; }

    std::vector<double> linear(const std::vector<double>& in, std::size_t matrix, std::size_t in_size,
                               std::size_t out_size) const {
        std::vector<double> out(out_size, 0.0);
        for (std::size_t o = 0; o < out_size; ++o)
            for (std::size_t i = 0; i < in_size; ++i) out[o] += w(matrix + o * in_size + i) * in[i];
        return out;
    }
    std::vector<double> rmsnorm(const std::vector<double>& x, std::size_t gain) const {
        double squares = 0.0;
        for (double value : x) squares += value * value;
        const double scale = 1.0 / std::sqrt(squares / static_cast<double>(x.size()) + 1e-5);
        std::vector<double> out(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] * scale * w(gain + i);
        return out;
    }
    // Pairs (2i, 2i+1) of each head turn by pos * 10000^(-2i / head_dim).
    void rotate(std::vector<double>& x, std::size_t pos) const {
        for (std::size_t start = 0; start < x.size(); start += head_dim_)
            for (std::size_t i = 0; i < head_dim_ / 2; ++i) {
                const double angle = static_cast<double>(pos) *
                                     std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim_));
                const double a = x[start + 2 * i], b = x[start + 2 * i + 1];
                x[start + 2 * i] = a * std::cos(angle) - b * std::sin(angle);
                x[start + 2 * i + 1] = a * std::sin(angle) + b * std::cos(angle);
            }
    }

    std::size_t dim_ = 0, hidden_ = 0, layers_ = 0, heads_ = 0, kv_heads_ = 0, vocab_ = 0, context_ = 0,
                head_dim_ = 0;
    std::vector<float> weights_;
    std::size_t embedding_ = 0, rms_att_ = 0, wq_ = 0, wk_ = 0, wv_ = 0, wo_ = 0, rms_ffn_ = 0, w1_ = 0, w2_ = 0,
                w3_ = 0, rms_final_ = 0;
    std::vector<std::vector<double>> keys_, values_; // [layer][position * kv_dim]
    std::size_t position_ = 0;
};

} // namespace engine_test
