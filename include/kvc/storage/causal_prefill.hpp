// kvc/storage/causal_prefill.hpp -- chunked causal prefill for any head store that can attend a prefix.
//
// A codec whose decode kernel can fold "the first n rows" into a running
// softmax state gets prefill for free: query i of the chunk attends rows
// 0 .. tokens - chunk + i, which is one decode partial per query. This costs
// chunk decode passes over the rows (no tiling across queries), so codecs with
// a fused prefill kernel (dense_rows, packed_rows) use that instead; for the
// rest it is the reference-quality path, and its outputs and attention mass
// are exactly what their decode attention would give token by token.
#pragma once

#include <cstddef>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/problem.hpp"

namespace kvc::detail {

// `attend_prefix(n, problem, state)` folds the first n rows into `state` for
// the query group of `problem` (queries, group, scale, logits as decode_problem;
// logits, when set, get n entries per query head). `tokens` is the rows held.
// `workspace`: prefill_workspace_floats(p.group, p.dim, tokens, p.mass != nullptr).
template <class AttendPrefix>
void causal_prefill_by_decode(const kernels::prefill_problem& p, std::size_t tokens, float* workspace,
                              AttendPrefix&& attend_prefix) noexcept {
    using kernels::reference_arch;
    kernels::decode_state state;
    state.max = workspace;
    state.sum = workspace + p.group;
    state.acc = workspace + 2 * p.group;
    float* logits = p.mass ? workspace + p.group * (p.dim + 2) : nullptr;
    for (std::size_t i = 0; i < p.chunk; ++i) {
        const std::size_t visible = tokens - p.chunk + i + 1;
        kernels::decode_problem d;
        d.tokens = visible;
        d.dim = p.dim;
        d.group = p.group;
        d.queries = p.queries + i * p.query_token_stride;
        d.query_stride = p.query_head_stride;
        d.scale = p.scale;
        d.logits = logits;
        d.logits_stride = visible;
        kernels::common::reset_state<reference_arch>(state, p.group, p.dim);
        attend_prefix(visible, d, state);
        kernels::common::finalize_state<reference_arch>(state, p.group, p.dim, p.out + i * p.out_token_stride,
                                                         p.out_head_stride);
        if (logits)
            kernels::common::accumulate_mass<reference_arch>(logits, visible, p.group, visible, state.max, state.sum,
                                                             p.mass);
    }
}

} // namespace kvc::detail
