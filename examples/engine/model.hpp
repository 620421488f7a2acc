// examples/engine/model.hpp -- a llama2.c checkpoint and its forward pass, with
// kvc holding the KV cache.
//
// This is the part of an inference engine that touches kvc, written to be
// read. Per layer and per step the engine computes q, k and v for the new
// tokens, hands k and v to the cache as kv_views over its own buffers
// (`append`), and asks the cache for the attention output (`attend` for one
// decode token, `attend_chunk` for a causal chunk of the prompt). Everything
// else (matmuls, RMSNorm, RoPE, SwiGLU) is plain single-threaded C++: the
// models this engine targets have a few million parameters.
//
// Checkpoint format (llama2.c version 0, see ../shared/models/README.md):
// seven little-endian int32 (dim, hidden_dim, layers, heads, kv_heads,
// vocab, context) then fp32 tensors, each stored for all layers before the
// next. Loading checks that the file size is exactly what the header implies,
// so a truncated or padded file is an error, not garbage logits.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include <kvc/calibration/file_io.hpp>
#include <kvc/kvc.hpp>

#include "cache_choice.hpp"

namespace engine {

// The model's hyper-parameters, from the checkpoint header.
struct model_shape {
    std::size_t dim = 0;        // residual stream width
    std::size_t hidden_dim = 0; // SwiGLU width
    std::size_t layers = 0;
    std::size_t heads = 0;      // query heads
    std::size_t kv_heads = 0;   // key/value heads (GQA: heads / kv_heads queries share one)
    std::size_t vocab = 0;
    std::size_t context = 0;    // longest sequence the model was trained on
    bool shared_classifier = true; // output projection = token embedding (positive vocab in the header)

    std::size_t head_dim() const noexcept { return dim / heads; }
    std::size_t kv_dim() const noexcept { return kv_heads * head_dim(); }
};

// llama2.c's RoPE, as kvc spells it: pairs (2i, 2i+1) of every head dim
// rotated by position * theta^(-2i/head_dim). Codecs that rotate keys
// themselves (KVQuant) take it; the model's own rotation below uses it too.
inline kvc::rope_config model_rope() {
    kvc::rope_config rope;
    rope.theta = 10000.0;
    rope.rotary_dims = 0; // all of head_dim
    rope.interleaved = true;
    return rope;
}

// The shape kvc needs: one cache_config per model, chosen storage type.
inline kvc::cache_config kv_cache_config(const model_shape& shape, kvc::dtype storage = kvc::dtype::f16) {
    kvc::cache_config config;
    config.layers = shape.layers;
    config.kv_heads = shape.kv_heads;
    config.query_heads = shape.heads;
    config.head_dim = shape.head_dim();
    config.storage = storage; // used by full_cache; compressed caches take it from their codec
    return config;             // scale 0: 1/sqrt(head_dim), as the model was trained
}

namespace detail {

// Dot product with eight independent partial sums. One running sum would
// serialise on the add latency and cannot be vectorised without -ffast-math
// (reassociation); eight lanes map onto SIMD registers at -O2/-O3.
inline float dot(const float* a, const float* b, std::size_t n) noexcept {
    float partial[8] = {};
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (std::size_t j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
    float tail = 0.0f;
    for (; i < n; ++i) tail += a[i] * b[i];
    return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
           ((partial[4] + partial[5]) + (partial[6] + partial[7])) + tail;
}

// out[t][o] = sum_i weight[o][i] * in[t][i] for `rows` input rows. Weights are
// row-major [out][in] as stored in the checkpoint; each weight row is used for
// every input row while it is in L1.
inline void matmul(float* out, const float* in, const float* weight, std::size_t rows, std::size_t in_features,
                   std::size_t out_features) noexcept {
    for (std::size_t o = 0; o < out_features; ++o) {
        const float* w = weight + o * in_features;
        for (std::size_t t = 0; t < rows; ++t) out[t * out_features + o] = dot(w, in + t * in_features, in_features);
    }
}

// out = x / rms(x) * gain, with eps 1e-5 inside the root as in training.
inline void rmsnorm(float* out, const float* x, const float* gain, std::size_t n) noexcept {
    const float mean_square = dot(x, x, n) / static_cast<float>(n);
    const float inverse = 1.0f / std::sqrt(mean_square + 1e-5f);
    for (std::size_t i = 0; i < n; ++i) out[i] = x[i] * inverse * gain[i];
}

inline std::int32_t read_le_int32(const unsigned char* p) noexcept {
    const std::uint32_t u = static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
                            static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
    std::int32_t value;
    std::memcpy(&value, &u, sizeof value);
    return value;
}

inline bool host_is_little_endian() noexcept {
    const std::uint16_t probe = 1;
    unsigned char first;
    std::memcpy(&first, &probe, 1);
    return first == 1;
}

} // namespace detail

// A loaded checkpoint plus the scratch buffers of its forward pass. Not
// thread-safe (the scratch is shared); use one per thread. The KV cache is
// not part of the model: every call takes the cache of the sequence it runs,
// so one model serves any number of sequences and cache types.
class transformer {
public:
    // Movable, not copyable: the tensor pointers point into weights_, whose
    // buffer a move hands over intact.
    transformer(const transformer&) = delete;
    transformer& operator=(const transformer&) = delete;
    transformer(transformer&&) noexcept = default;
    transformer& operator=(transformer&&) noexcept = default;

    // Reads and validates a checkpoint; throws std::runtime_error naming the
    // file and what is wrong with it.
    static transformer load(const std::string& path) {
        if (!detail::host_is_little_endian())
            throw std::runtime_error(path + ": llama2.c checkpoints are little-endian; this host is not");
        // Read by its size (which a device or FIFO does not have), so only a
        // regular file; a directory would read as zeros ("dim = 0").
        std::ifstream file = kvc::detail::open_for_reading(path, "model");
        std::error_code not_regular;
        if (!std::filesystem::is_regular_file(path, not_regular))
            throw std::runtime_error(path + ": not a regular file, expected a llama2.c checkpoint");
        const std::uint64_t file_bytes = std::filesystem::file_size(path);
        constexpr std::uint64_t header_bytes = 7 * 4;
        unsigned char header[header_bytes];
        if (file_bytes < header_bytes || kvc::detail::read_some(file, header, header_bytes, path, "model") != header_bytes)
            throw std::runtime_error(path + ": " + std::to_string(file_bytes) +
                                     " bytes, too short for a llama2.c header (28 bytes)");

        std::int32_t field[7];
        for (int i = 0; i < 7; ++i) field[i] = detail::read_le_int32(header + 4 * i);
        transformer model;
        model.shape_ = checked_shape(path, field);

        const std::uint64_t floats = weight_floats(model.shape_);
        const std::uint64_t expected = header_bytes + 4 * floats;
        if (file_bytes != expected)
            throw std::runtime_error(path + ": file has " + std::to_string(file_bytes) + " bytes, expected " +
                                     std::to_string(expected) + " for " + describe(model.shape_) +
                                     (file_bytes < expected ? " (truncated?)" : " (trailing data?)"));
        model.weights_.resize(static_cast<std::size_t>(floats));
        if (kvc::detail::read_some(file, model.weights_.data(), static_cast<std::size_t>(4 * floats), path, "model") !=
            4 * floats)
            throw std::runtime_error(path + ": shorter than its size said (changed while being read?)");
        for (std::size_t i = 0; i < model.weights_.size(); ++i)
            if (!std::isfinite(model.weights_[i]))
                throw std::runtime_error(path + ": weight " + std::to_string(i) + " is not finite (corrupt file?)");
        model.locate_tensors();
        return model;
    }

    const model_shape& shape() const noexcept { return shape_; }

    // One-line description: "dim 256, 4 layers, 4 query heads / 2 KV heads of dim 64, ...".
    static std::string describe(const model_shape& s) {
        return "dim " + std::to_string(s.dim) + ", " + std::to_string(s.layers) + " layers, " +
               std::to_string(s.heads) + " query heads / " + std::to_string(s.kv_heads) + " KV heads of dim " +
               std::to_string(s.head_dim()) + ", ffn " + std::to_string(s.hidden_dim) + ", vocab " +
               std::to_string(s.vocab) + ", context " + std::to_string(s.context);
    }

    // Prompt processing: runs `count` tokens at positions first_position, ...
    // through the model in chunks of at most `chunk` tokens, each chunk
    // appended to the cache and attended causally (attend_chunk). Returns the
    // logits of the last token (valid until the next call); when `all_logits`
    // is given it also receives [count][vocab] logits, one row per token.
    const float* prefill(const int* tokens, std::size_t count, std::int64_t first_position, kv_cache& cache,
                         std::size_t chunk, float* all_logits = nullptr) {
        if (count == 0) throw std::runtime_error("prefill: expected at least one token");
        if (chunk == 0) throw std::runtime_error("prefill: expected a chunk size of at least 1");
        for (std::size_t done = 0; done < count; done += chunk) {
            const std::size_t n = count - done < chunk ? count - done : chunk;
            float* rows = all_logits ? all_logits + done * shape_.vocab : nullptr;
            run(tokens + done, n, first_position + static_cast<std::int64_t>(done), cache, false, rows);
        }
        return logits_.data();
    }

    // One generation step: the token at `position`, attended with cache.attend.
    // Returns its logits (vocab floats, valid until the next call).
    const float* decode(int token, std::int64_t position, kv_cache& cache) {
        run(&token, 1, position, cache, true, nullptr);
        return logits_.data();
    }

private:
    transformer() = default;

    // The header, checked: every size positive and consistent, and small
    // enough that the byte counts below cannot overflow.
    static model_shape checked_shape(const std::string& path, const std::int32_t* field) {
        const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
        const std::int64_t limit[7] = {1 << 16, 1 << 18, 1 << 10, 1 << 12, 1 << 12, 1 << 20, 1 << 20};
        for (int i = 0; i < 7; ++i) {
            const std::int64_t value = i == 5 ? std::abs(static_cast<std::int64_t>(field[i])) : field[i];
            if (value <= 0 || value > limit[i])
                throw std::runtime_error(path + ": header field " + names[i] + " = " + std::to_string(field[i]) +
                                         ", expected 1.." + std::to_string(limit[i]) +
                                         " (not a llama2.c version-0 checkpoint?)");
        }
        model_shape s;
        s.dim = static_cast<std::size_t>(field[0]);
        s.hidden_dim = static_cast<std::size_t>(field[1]);
        s.layers = static_cast<std::size_t>(field[2]);
        s.heads = static_cast<std::size_t>(field[3]);
        s.kv_heads = static_cast<std::size_t>(field[4]);
        s.shared_classifier = field[5] > 0;
        s.vocab = static_cast<std::size_t>(std::abs(field[5]));
        s.context = static_cast<std::size_t>(field[6]);
        auto fail = [&](const std::string& what) { throw std::runtime_error(path + ": " + what); };
        if (s.dim % s.heads != 0)
            fail("dim " + std::to_string(s.dim) + " is not a multiple of n_heads " + std::to_string(s.heads));
        if (s.heads % s.kv_heads != 0)
            fail("n_heads " + std::to_string(s.heads) + " is not a multiple of n_kv_heads " +
                 std::to_string(s.kv_heads));
        if (s.head_dim() % 2 != 0 || s.head_dim() > kvc::max_head_dim)
            fail("head dim " + std::to_string(s.head_dim()) + " must be even (RoPE rotates pairs) and at most " +
                 std::to_string(kvc::max_head_dim));
        return s;
    }

    // Floats after the header, in file order (see locate_tensors).
    static std::uint64_t weight_floats(const model_shape& s) {
        const std::uint64_t dim = s.dim, hidden = s.hidden_dim, layers = s.layers, kv = s.kv_dim();
        const std::uint64_t vocab = s.vocab, rope_table = s.context * (s.head_dim() / 2);
        std::uint64_t n = vocab * dim;                        // token embedding
        n += layers * (dim + dim * dim + 2 * kv * dim + dim * dim); // rms_att, wq, wk, wv, wo
        n += layers * (dim + 3 * hidden * dim);                // rms_ffn, w1, w2, w3
        n += dim + 2 * rope_table;                             // rms_final, legacy RoPE tables (unused)
        if (!s.shared_classifier) n += vocab * dim;            // separate output classifier
        return n;
    }

    void locate_tensors() {
        const model_shape& s = shape_;
        const float* p = weights_.data();
        auto take = [&p](std::size_t floats) {
            const float* tensor = p;
            p += floats;
            return tensor;
        };
        const std::size_t dim = s.dim, hidden = s.hidden_dim, layers = s.layers, kv = s.kv_dim();
        embedding_ = take(s.vocab * dim);
        rms_attention_ = take(layers * dim);
        wq_ = take(layers * dim * dim);
        wk_ = take(layers * kv * dim);
        wv_ = take(layers * kv * dim);
        wo_ = take(layers * dim * dim);
        rms_ffn_ = take(layers * dim);
        w1_ = take(layers * hidden * dim);
        w2_ = take(layers * dim * hidden);
        w3_ = take(layers * hidden * dim);
        rms_final_ = take(dim);
        take(2 * s.context * (s.head_dim() / 2)); // RoPE is computed, not read (the tables are legacy)
        classifier_ = s.shared_classifier ? embedding_ : take(s.vocab * dim);
    }

    void reserve_scratch(std::size_t n) {
        const model_shape& s = shape_;
        if (x_.size() >= n * s.dim) return;
        x_.resize(n * s.dim);
        normed_.resize(n * s.dim);
        q_.resize(n * s.dim);
        k_.resize(n * s.kv_dim());
        v_.resize(n * s.kv_dim());
        attention_.resize(n * s.dim);
        gate_.resize(n * s.hidden_dim);
        up_.resize(n * s.hidden_dim);
        rope_cos_.resize(n * s.head_dim() / 2);
        rope_sin_.resize(n * s.head_dim() / 2);
    }

    // RoPE (model_rope()): rotate each pair (2i, 2i+1) of every head by pos * 10000^(-2i/head_dim).
    // Angles are computed in double once per call, then used by every layer.
    void prepare_rope(std::size_t n, std::int64_t first_position) {
        const std::size_t half = shape_.head_dim() / 2;
        const double theta = model_rope().theta;
        for (std::size_t t = 0; t < n; ++t)
            for (std::size_t i = 0; i < half; ++i) {
                const double frequency =
                    std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(shape_.head_dim()));
                const double angle = static_cast<double>(first_position + static_cast<std::int64_t>(t)) * frequency;
                rope_cos_[t * half + i] = static_cast<float>(std::cos(angle));
                rope_sin_[t * half + i] = static_cast<float>(std::sin(angle));
            }
    }
    void apply_rope(float* rows, std::size_t n, std::size_t heads) const noexcept {
        const std::size_t head_dim = shape_.head_dim(), half = head_dim / 2;
        for (std::size_t t = 0; t < n; ++t)
            for (std::size_t h = 0; h < heads; ++h) {
                float* x = rows + (t * heads + h) * head_dim;
                const float* c = &rope_cos_[t * half];
                const float* s = &rope_sin_[t * half];
                for (std::size_t i = 0; i < half; ++i) {
                    const float a = x[2 * i], b = x[2 * i + 1];
                    x[2 * i] = a * c[i] - b * s[i];
                    x[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
    }

    // The forward pass of n tokens. decode_path: one token through
    // cache.attend (what generation does); otherwise a causal chunk through
    // cache.attend_chunk (what prompt processing does).
    void run(const int* tokens, std::size_t n, std::int64_t first_position, kv_cache& cache, bool decode_path,
             float* all_logits) {
        const model_shape& s = shape_;
        if (first_position < 0 || static_cast<std::uint64_t>(first_position) + n > s.context)
            throw std::runtime_error("position " + std::to_string(first_position + static_cast<std::int64_t>(n) - 1) +
                                     " is beyond the model's context of " + std::to_string(s.context) + " tokens");
        for (std::size_t t = 0; t < n; ++t)
            if (tokens[t] < 0 || static_cast<std::size_t>(tokens[t]) >= s.vocab)
                throw std::runtime_error("token " + std::to_string(tokens[t]) + " is outside the vocabulary of " +
                                         std::to_string(s.vocab));
        reserve_scratch(n);
        prepare_rope(n, first_position);
        const bool keys_before_rope = cache.wants_keys_before_rope();
        const std::size_t dim = s.dim, kv = s.kv_dim(), hidden = s.hidden_dim, head_dim = s.head_dim();

        for (std::size_t t = 0; t < n; ++t)
            std::memcpy(&x_[t * dim], embedding_ + static_cast<std::size_t>(tokens[t]) * dim, dim * sizeof(float));

        for (std::size_t layer = 0; layer < s.layers; ++layer) {
            // Attention block: q, k, v of the new tokens, RoPE on q and k
            // (unless the cache rotates keys itself: then k goes in before RoPE).
            for (std::size_t t = 0; t < n; ++t)
                detail::rmsnorm(&normed_[t * dim], &x_[t * dim], rms_attention_ + layer * dim, dim);
            detail::matmul(q_.data(), normed_.data(), wq_ + layer * dim * dim, n, dim, dim);
            detail::matmul(k_.data(), normed_.data(), wk_ + layer * kv * dim, n, dim, kv);
            detail::matmul(v_.data(), normed_.data(), wv_ + layer * kv * dim, n, dim, kv);
            apply_rope(q_.data(), n, s.heads);
            if (!keys_before_rope) apply_rope(k_.data(), n, s.kv_heads);

            // kvc: the new keys and values go into the cache, viewed in place as
            // [tokens][kv_heads][head_dim] fp32 (the cache converts to its own
            // storage), then the cache computes attention over everything it
            // holds, compressed or not. q and the output are [tokens][heads][head_dim].
            const kv_cache::view keys(k_.data(), n, s.kv_heads, head_dim);
            const kv_cache::view values(v_.data(), n, s.kv_heads, head_dim);
            cache.append(layer, keys, values, first_position);
            if (decode_path)
                cache.attend(layer, q_.data(), attention_.data());
            else
                cache.attend_chunk(layer, q_.data(), n, attention_.data());

            // Output projection back into the residual stream (reusing `normed_`).
            detail::matmul(normed_.data(), attention_.data(), wo_ + layer * dim * dim, n, dim, dim);
            for (std::size_t i = 0; i < n * dim; ++i) x_[i] += normed_[i];

            // SwiGLU feed-forward: x += w2(silu(w1 h) * w3 h).
            for (std::size_t t = 0; t < n; ++t)
                detail::rmsnorm(&normed_[t * dim], &x_[t * dim], rms_ffn_ + layer * dim, dim);
            detail::matmul(gate_.data(), normed_.data(), w1_ + layer * hidden * dim, n, dim, hidden);
            detail::matmul(up_.data(), normed_.data(), w3_ + layer * hidden * dim, n, dim, hidden);
            for (std::size_t i = 0; i < n * hidden; ++i) {
                const float g = gate_[i];
                gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
            }
            detail::matmul(normed_.data(), gate_.data(), w2_ + layer * dim * hidden, n, hidden, dim);
            for (std::size_t i = 0; i < n * dim; ++i) x_[i] += normed_[i];
        }

        // Logits: of every token when asked, else only of the last one.
        logits_.resize(s.vocab);
        const std::size_t first = all_logits ? 0 : n - 1;
        for (std::size_t t = first; t < n; ++t) {
            detail::rmsnorm(&normed_[0], &x_[t * dim], rms_final_, dim);
            detail::matmul(logits_.data(), normed_.data(), classifier_, 1, dim, s.vocab);
            if (all_logits) std::memcpy(all_logits + t * s.vocab, logits_.data(), s.vocab * sizeof(float));
        }
    }

    model_shape shape_;
    std::vector<float> weights_; // the whole checkpoint after the header
    const float* embedding_ = nullptr;
    const float* rms_attention_ = nullptr;
    const float* wq_ = nullptr;
    const float* wk_ = nullptr;
    const float* wv_ = nullptr;
    const float* wo_ = nullptr;
    const float* rms_ffn_ = nullptr;
    const float* w1_ = nullptr;
    const float* w2_ = nullptr;
    const float* w3_ = nullptr;
    const float* rms_final_ = nullptr;
    const float* classifier_ = nullptr;

    // Scratch for up to one chunk of tokens, grown on demand.
    std::vector<float> x_, normed_, q_, k_, v_, attention_, gate_, up_, logits_, rope_cos_, rope_sin_;
};

} // namespace engine
