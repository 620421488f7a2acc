// kvc/cache/attention_scratch.hpp -- per-call working memory of attention.
//
// attend() is const and may run on several threads at once, so its running
// softmax state lives in the call, on the stack when small. Only the optional
// attention statistics need memory proportional to the context.
#pragma once

#include <cstddef>
#include <vector>

#include "kvc/kernels/problem.hpp"

namespace kvc::detail {

class attention_scratch {
public:
    explicit attention_scratch(std::size_t floats) {
        if (floats > inline_floats) heap_.resize(floats);
        data_ = floats > inline_floats ? heap_.data() : inline_;
    }
    attention_scratch(const attention_scratch&) = delete;
    attention_scratch& operator=(const attention_scratch&) = delete;

    float* data() noexcept { return data_; }

    // Running softmax state for `group` query heads of `dim` at the start of the scratch.
    kernels::decode_state state(std::size_t group) noexcept {
        return kernels::decode_state{data_, data_ + group, data_ + 2 * group};
    }

private:
    static constexpr std::size_t inline_floats = 2048;
    alignas(64) float inline_[inline_floats];
    std::vector<float> heap_;
    float* data_;
};

} // namespace kvc::detail
