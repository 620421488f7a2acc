// kvc_paged: an engine that keeps its KV rows in a paged pool, the way paging
// engines do, and hands them to kvc without copying them into a layout of its
// own.
//
// The engine's side, for each layer:
//   - a pool of fixed-size blocks, [block_tokens][kv_heads][head_dim] each, of
//     fp16 held as std::uint16_t (the engine's own half type);
//   - a block table: logical block i of the sequence is physical block table[i].
// kvc's side: one compressed cache (SnapKV keeping a quarter of the prompt,
// rows stored in fp16). The loop is
//   prefill, in chunks whose size has nothing to do with the block size:
//       write the chunk's rows into the pool, then
//       cache.append(layer, paged view of tokens first..first+chunk-1, ...)
//       cache.attend_chunk(layer, queries, chunk, out)
//   cache.compress(layer) right after the last chunk: the engine decides when
//       the prompt is compressed, instead of paying for it inside the first
//       decode step;
//   decode, one token at a time:
//       write the token's rows into its slot (mid-block, usually), then
//       cache.append(layer, paged view starting at that position, 1 token, ...)
//       cache.attend(layer, q, out)
// As a check, the same rows also go to a second cache from plain token-major
// buffers; the two caches must agree bit for bit (the program fails if not).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <kvc/kvc.hpp>

namespace {

constexpr std::size_t layers = 2, kv_heads = 4, query_heads = 16, head_dim = 64;
constexpr std::size_t block_tokens = 16, prompt = 300, chunk = 100, decode_steps = 40;
constexpr std::size_t row = kv_heads * head_dim; // one token's rows in one layer

// What the model would produce: smooth, varied rows (keys/values), queries.
float model_value(std::size_t layer, std::size_t token, std::size_t i, double phase) {
    const double x = 0.37 * static_cast<double>(i) + 0.011 * static_cast<double>(token * (layer + 1)) + phase;
    return static_cast<float>(std::sin(x) * std::cos(0.05 * static_cast<double>(token) + phase));
}

// The engine's paged storage of one layer's keys or values.
struct paged_pool {
    std::vector<std::uint16_t> blocks;  // pool_blocks * block_tokens * row fp16 values
    std::vector<std::int32_t> table;    // logical block -> physical block
    std::size_t pool_blocks = 0;

    explicit paged_pool(std::size_t capacity_blocks)
        : blocks(capacity_blocks * block_tokens * row), pool_blocks(capacity_blocks) {}

    // Stores token `t`'s row, taking a new physical block when it starts one.
    // Physical blocks are handed out back to front, so the table is not the identity.
    void store(std::size_t t, const std::uint16_t* values) {
        if (t % block_tokens == 0) table.push_back(static_cast<std::int32_t>(pool_blocks - 1 - table.size()));
        const std::size_t physical = static_cast<std::size_t>(table[t / block_tokens]);
        std::uint16_t* slot = blocks.data() + (physical * block_tokens + t % block_tokens) * row;
        for (std::size_t i = 0; i < row; ++i) slot[i] = values[i];
    }
    // kvc's view of tokens first .. first + count - 1, in place.
    kvc::kv_view<const kvc::half, kvc::layout_paged> view(std::size_t first, std::size_t count) const {
        return {kvc::as_half(blocks.data()), table.data(), table.size(), pool_blocks, block_tokens, first, count,
                kv_heads, head_dim};
    }
};

using cache_type = kvc::compressed_cache<kvc::evict::snapkv, kvc::merge::none, kvc::quant::none<kvc::half>,
                                         kvc::project::none>;

} // namespace

int main() {
    kvc::cache_config config;
    config.layers = layers;
    config.kv_heads = kv_heads;
    config.query_heads = query_heads;
    config.head_dim = head_dim;
    const kvc::evict::snapkv policy(kvc::evict::budget::ratio(0.25));
    cache_type paged_cache(config, policy), plain_cache(config, policy);

    const std::size_t total = prompt + decode_steps;
    const std::size_t pool_blocks = (total + block_tokens - 1) / block_tokens;
    std::vector<paged_pool> keys(layers, paged_pool(pool_blocks)), values(layers, paged_pool(pool_blocks));
    // The plain copy: [token][kv_head][dim] per layer.
    std::vector<std::vector<std::uint16_t>> plain_keys(layers, std::vector<std::uint16_t>(total * row)),
        plain_values(layers, std::vector<std::uint16_t>(total * row));
    std::vector<float> queries(chunk * query_heads * head_dim), out_paged(queries.size()), out_plain(queries.size());
    std::size_t mismatches = 0;

    auto produce = [&](std::size_t layer, std::size_t t) { // the model's rows for token t, into both stores
        std::vector<std::uint16_t> k(row), v(row);
        for (std::size_t i = 0; i < row; ++i) {
            k[i] = kvc::half(model_value(layer, t, i, 0.0)).bits;
            v[i] = kvc::half(model_value(layer, t, i, 1.3)).bits;
        }
        keys[layer].store(t, k.data());
        values[layer].store(t, v.data());
        std::copy(k.begin(), k.end(), plain_keys[layer].begin() + static_cast<std::ptrdiff_t>(t * row));
        std::copy(v.begin(), v.end(), plain_values[layer].begin() + static_cast<std::ptrdiff_t>(t * row));
    };
    auto plain_view = [&](const std::vector<std::uint16_t>& data, std::size_t first, std::size_t count) {
        return kvc::kv_view<const kvc::half>(kvc::as_half(data.data()) + first * row, count, kv_heads, head_dim);
    };
    auto fill_queries = [&](std::size_t layer, std::size_t first, std::size_t count) {
        for (std::size_t i = 0; i < count * query_heads * head_dim; ++i)
            queries[i] = model_value(layer, first + i / (query_heads * head_dim), i, 2.1);
    };
    auto compare = [&](std::size_t floats) {
        for (std::size_t i = 0; i < floats; ++i) mismatches += out_paged[i] != out_plain[i];
    };

    // Prefill in chunks of 100 tokens over blocks of 16: chunks start mid-block.
    for (std::size_t layer = 0; layer < layers; ++layer) {
        for (std::size_t first = 0; first < prompt; first += chunk) {
            for (std::size_t t = first; t < first + chunk; ++t) produce(layer, t);
            paged_cache.append(layer, keys[layer].view(first, chunk), values[layer].view(first, chunk),
                               static_cast<std::int64_t>(first));
            plain_cache.append(layer, plain_view(plain_keys[layer], first, chunk),
                               plain_view(plain_values[layer], first, chunk), static_cast<std::int64_t>(first));
            fill_queries(layer, first, chunk);
            paged_cache.attend_chunk(layer, queries.data(), chunk, out_paged.data());
            plain_cache.attend_chunk(layer, queries.data(), chunk, out_plain.data());
            compare(chunk * query_heads * head_dim);
        }
        // The prompt is complete: compress it now, not inside the first decode step.
        paged_cache.compress(layer);
        plain_cache.compress(layer);
    }
    const std::size_t after_prompt = paged_cache.bytes();

    // Decode: each new token lands in its slot of the pool, mostly mid-block.
    for (std::size_t t = prompt; t < total; ++t)
        for (std::size_t layer = 0; layer < layers; ++layer) {
            produce(layer, t);
            paged_cache.append(layer, keys[layer].view(t, 1), values[layer].view(t, 1), static_cast<std::int64_t>(t));
            plain_cache.append(layer, plain_view(plain_keys[layer], t, 1), plain_view(plain_values[layer], t, 1),
                               static_cast<std::int64_t>(t));
            fill_queries(layer, t, 1);
            paged_cache.attend(layer, queries.data(), out_paged.data());
            plain_cache.attend(layer, queries.data(), out_plain.data());
            compare(query_heads * head_dim);
        }

    std::printf("kvc_paged: %zu layers, %zu-token prompt in chunks of %zu over %zu-token blocks, %zu decode steps\n",
                layers, prompt, chunk, block_tokens, decode_steps);
    std::printf("  kept per KV head after the prompt: %zu of %zu tokens (SnapKV, keep ratio 0.25); now %zu\n",
                paged_cache.tokens(0, 0) - decode_steps, prompt, paged_cache.tokens(0, 0));
    std::printf("  cache bytes: %zu after the prompt, %zu now; engine pool: %zu bytes\n", after_prompt,
                paged_cache.bytes(), 2 * layers * pool_blocks * block_tokens * row * sizeof(std::uint16_t));
    std::printf("  outputs from paged views vs token-major copies: %s\n",
                mismatches == 0 ? "bit-identical" : "DIFFERENT");
    return mismatches == 0 ? 0 : 1;
}
