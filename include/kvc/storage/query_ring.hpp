// kvc/storage/query_ring.hpp -- the most recent queries of one layer, for
// policies that read them (SnapKV's observation window and its kin, ThinK).
//
// A ring of `window` rows of `row` floats ([query_heads][head_dim] each),
// stored in the cache's element type: an fp16 cache keeps them in fp16 (half
// the bytes of fp32, issue 18's measurement had the ring at 53% of a
// compressed cache), an fp32 cache in fp32, so no cache stores its queries
// more precisely than its keys. Readers get them widened to fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/table.hpp"

namespace kvc {

class query_ring {
public:
    explicit query_ring(memory_resource* resource) noexcept : data_(resource) {}

    // Keeps the newest `window` of `count` rows (row floats each) after what
    // it held, converted to `type`. The first push sizes the ring (the only
    // step that may throw, before anything changes); later pushes must give
    // the same type, window and row.
    void push(const kernels::kernel_table& k, dtype type, std::size_t window, std::size_t row, const float* rows,
              std::size_t count) {
        if (window == 0 || row == 0) return;
        const std::size_t row_bytes = row * size_of(type);
        if (data_.capacity() < window * row_bytes) {
            data_.reserve(window * row_bytes);
            count_ = next_ = 0;
        }
        data_.resize_within_capacity(window * row_bytes);
        type_ = type, window_ = window, row_ = row;
        const std::size_t first = count > window ? count - window : 0;
        for (std::size_t i = first; i < count; ++i) {
            k.from_f32[kernels::index_of(type)](rows + i * row, data_.data() + next_ * row_bytes, row);
            next_ = (next_ + 1) % window;
            count_ = count_ < window ? count_ + 1 : window;
        }
    }

    std::size_t count() const noexcept { return count_; }

    // The newest (at most `most`) rows, oldest first, each reduced to its
    // floats [offset, offset + width) and widened to fp32: out is [n][width].
    std::size_t gather(const kernels::kernel_table& k, std::size_t most, std::size_t offset, std::size_t width,
                       std::vector<float>& out) const {
        const std::size_t n = count_ < most ? count_ : most;
        out.resize(n * width);
        if (n == 0) return 0;
        const std::size_t row_bytes = row_ * size_of(type_), element = size_of(type_);
        const std::size_t oldest = (next_ + window_ - n) % window_;
        for (std::size_t i = 0; i < n; ++i) {
            const std::uint8_t* src = data_.data() + ((oldest + i) % window_) * row_bytes + offset * element;
            k.to_f32[kernels::index_of(type_)](src, out.data() + i * width, width);
        }
        return n;
    }

    std::size_t bytes() const noexcept { return data_.bytes(); }
    void release() noexcept {
        data_.release();
        count_ = next_ = 0;
    }

    // Serialization (cache/serialization.hpp): whether the ring is
    // allocated, then its shape (which must be the one the cache would give
    // it: element type, window, row floats), position and rows.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a, dtype type, std::size_t window, std::size_t row) {
        std::size_t held = self.data_.size() != 0 ? 1 : 0;
        a.count("query_ring allocated", held, window != 0 && row != 0 ? 1 : 0);
        if (held == 0) return;
        a.shape("query_ring element type", static_cast<std::size_t>(type));
        a.shape("query_ring window", window);
        a.shape("query_ring row floats", row);
        std::size_t count = self.count_, next = self.next_;
        a.count("query_ring rows held", count, window);
        a.count("query_ring next slot", next, window - 1);
        a.elements("query_ring rows", self.data_, window * row * size_of(type));
        a.check(count == window || next == count, "query_ring holds ", count, " rows with its next slot at ", next,
                ", expected the slot after them until the ring is full");
        if constexpr (Archive::loading) {
            self.type_ = type, self.window_ = window, self.row_ = row;
            self.count_ = count, self.next_ = next;
        }
    }

private:
    aligned_buffer<std::uint8_t> data_;
    dtype type_ = dtype::f32;
    std::size_t window_ = 0, row_ = 0;
    std::size_t count_ = 0; // rows held (<= window)
    std::size_t next_ = 0;  // slot the next row goes to
};

} // namespace kvc
