// kvc/kernels/problem.hpp -- the plain-data arguments of the attention kernels.
//
// Kernels see pointers, sizes and element formats, never caches or policies.
// Everything here is checked by the caller; kernels assume it is valid.
#pragma once

#include <cstddef>

#include "kvc/core/dtype.hpp"

namespace kvc::kernels {

// The query side of decode attention over one KV head, the same whatever form
// its rows take: every decode problem (plain rows below; packed, KIVI,
// KVQuant, CQ, sparse and GEAR rows in their own headers) is one of these plus
// where its rows are, so the query fields are declared once, and a problem
// hands them on to another with queries_of(other) = problem. Token indices of
// bias and logits run over every row of the problem, in the order it attends
// its segments.
struct decode_queries {
    std::size_t dim = 0;            // elements of a query, key and value row (the storage may ask for a multiple)
    // Elements of a query and key row when keys are stored narrower than
    // values (key channels pruned, P3): 0 means dim. Honoured by the plain-row
    // kernels (attend_partial); the packed formats always use dim.
    std::size_t key_dim = 0;
    std::size_t group = 1;          // query heads sharing this KV head
    const float* queries = nullptr; // query g at queries + g * query_stride
    std::size_t query_stride = 0;
    float scale = 1.0f;             // logit = scale * <q, k> (+ bias)
    const float* bias = nullptr;    // optional per-token additive logit (e.g. log count of merged slots)
    float* logits = nullptr;        // optional: logit of query g on token t stored at logits[g * logits_stride + t]
    std::size_t logits_stride = 0;
};

// The query block of any decode problem, to read or to overwrite as a whole.
inline decode_queries& queries_of(decode_queries& p) noexcept { return p; }
// The elements one logit reads from the query and the key row.
constexpr std::size_t key_width(const decode_queries& p) noexcept { return p.key_dim != 0 ? p.key_dim : p.dim; }

// Decode attention of one KV head for its group of query heads (GQA), over
// `tokens` stored rows. Each key and value row is read from memory once for
// the whole group.
//
// The kernel is a *partial*: it folds these tokens into a running softmax
// state (flash-decoding style), so one attention can span several segments
// (e.g. a quantized body and a full-precision window) before finalize().
struct decode_problem : decode_queries {
    const void* keys = nullptr;     // row t at keys + t * key_stride elements
    const void* values = nullptr;   // row t at values + t * value_stride elements
    std::size_t key_stride = 0;     // elements between consecutive key rows (>= dim)
    std::size_t value_stride = 0;
    std::size_t tokens = 0;
};

// Running softmax state per query head: max logit, sum of exp(logit - max),
// and the unnormalised output acc = sum_t exp(logit_t - max) v_t.
struct decode_state {
    float* max = nullptr; // [group]
    float* sum = nullptr; // [group]
    float* acc = nullptr; // [group][dim]
};

// Chunked prefill with a causal mask: `chunk` query tokens, the last `chunk`
// of `tokens` stored rows; query i sees rows 0 .. tokens - chunk + i.
struct prefill_problem {
    const void* keys = nullptr;
    const void* values = nullptr;
    std::size_t key_stride = 0;
    std::size_t value_stride = 0;
    std::size_t tokens = 0;
    std::size_t chunk = 0;
    std::size_t dim = 0;
    std::size_t group = 1;
    const float* queries = nullptr;  // query (i, g) at queries + i * query_token_stride + g * query_head_stride
    std::size_t query_token_stride = 0;
    std::size_t query_head_stride = 0;
    float* out = nullptr;            // output (i, g) at out + i * out_token_stride + g * out_head_stride
    std::size_t out_token_stride = 0;
    std::size_t out_head_stride = 0;
    float scale = 1.0f;
    float* mass = nullptr;           // optional [tokens]: += attention probability summed over queries and group
    const float* bias = nullptr;     // optional [tokens]: additive logit of each row (as decode_queries::bias)
};

// Floats of workspace prefill needs (state plus, with mass, one row of logits per query head).
constexpr std::size_t prefill_workspace_floats(std::size_t group, std::size_t dim, std::size_t tokens,
                                               bool with_mass) noexcept {
    return group * (dim + 2) + (with_mass ? group * tokens : 0);
}

} // namespace kvc::kernels
