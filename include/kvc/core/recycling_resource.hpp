// kvc/core/recycling_resource.hpp -- a memory resource that keeps what
// caches free and hands it to the next allocation.
//
// Why: eviction compacts each head into a new, smaller buffer and frees the
// old one. With operator new behind the cache, large buffers come from and go
// back to the operating system, and every page of a fresh buffer is faulted
// in and zeroed on first write. On the benchmark machine that is about 17 ms
// for the 32 MiB a 32K-token, 8-head layer keeps at ratio 0.25: more than an
// attention pass over the whole layer. Engines that serve many sequences
// reuse memory anyway (their own arena or block pool); this resource is the
// small version of that for engines that have none:
//
//   kvc::recycling_resource pool;              // keeps up to all it is given back
//   kvc::cache_config config = ...;
//   config.resource = &pool;                   // or kvc::set_default_resource(&pool)
//
// What it does: a freed block is kept (up to `max_retained_bytes` in total)
// and handed out again for a later request of at least two thirds of its
// size with no stricter alignment; otherwise requests go to the upstream
// resource. Best fit: the smallest kept block that is large enough. A cache's
// bytes() still reports what the cache asked for; what this resource keeps
// for reuse is retained_bytes(). release() (and the destructor) return every
// kept block upstream. Blocks in use when it is destroyed must not outlive it,
// as with any memory_resource.
//
// Thread-safe: one mutex around the bookkeeping, so caches used from several
// threads may share one pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory_resource>
#include <mutex>
#include <unordered_map>

#include "kvc/core/memory.hpp"

namespace kvc {

class recycling_resource : public memory_resource {
public:
    explicit recycling_resource(std::size_t max_retained_bytes = SIZE_MAX,
                                memory_resource* upstream = std::pmr::new_delete_resource())
        : max_retained_(max_retained_bytes), upstream_(upstream ? upstream : std::pmr::new_delete_resource()) {}
    recycling_resource(const recycling_resource&) = delete;
    recycling_resource& operator=(const recycling_resource&) = delete;
    ~recycling_resource() override { release(); }

    // Bytes kept for reuse (freed by their users, not yet handed out again).
    std::size_t retained_bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return retained_;
    }
    // Bytes of the blocks handed out and not yet freed (block sizes, which may
    // exceed what was requested when a larger kept block was reused).
    std::size_t in_use_bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return in_use_;
    }
    memory_resource* upstream() const noexcept { return upstream_; }

    // Returns every kept block to the upstream resource.
    void release() noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& [size, block] : kept_) upstream_->deallocate(block.pointer, size, block.alignment);
        kept_.clear();
        retained_ = 0;
    }

private:
    struct block {
        void* pointer;
        std::size_t alignment;
    };
    struct handed_out {
        std::size_t size;
        std::size_t alignment;
    };

    void* do_allocate(std::size_t bytes, std::size_t alignment) override {
        std::lock_guard<std::mutex> lock(mutex_);
        // Smallest kept block of at least `bytes`; reused only if the request
        // is at least two thirds of it (so a small request cannot pin a large
        // block) and the block is aligned at least as strictly.
        for (auto it = kept_.lower_bound(bytes); it != kept_.end() && bytes >= it->first - it->first / 3; ++it) {
            if (it->second.alignment < alignment) continue;
            const std::size_t size = it->first;
            const block reused = it->second;
            outstanding_.emplace(reused.pointer, handed_out{size, reused.alignment});
            kept_.erase(it);
            retained_ -= size;
            in_use_ += size;
            return reused.pointer;
        }
        void* fresh = upstream_->allocate(bytes, alignment);
        try {
            outstanding_.emplace(fresh, handed_out{bytes, alignment});
        } catch (...) {
            upstream_->deallocate(fresh, bytes, alignment);
            throw;
        }
        in_use_ += bytes;
        return fresh;
    }

    void do_deallocate(void* pointer, std::size_t, std::size_t) override {
        std::lock_guard<std::mutex> lock(mutex_);
        const auto found = outstanding_.find(pointer);
        const handed_out given = found->second; // the block's own size and alignment, not the request's
        outstanding_.erase(found);
        in_use_ -= given.size;
        if (retained_ + given.size <= max_retained_ && retained_ + given.size >= retained_) {
            try {
                kept_.emplace(given.size, block{pointer, given.alignment});
                retained_ += given.size;
                return;
            } catch (...) { // no room to remember it: give it back instead
            }
        }
        upstream_->deallocate(pointer, given.size, given.alignment);
    }

    bool do_is_equal(const memory_resource& other) const noexcept override { return this == &other; }

    std::size_t max_retained_;
    memory_resource* upstream_;
    mutable std::mutex mutex_;
    std::multimap<std::size_t, block> kept_;                // size -> freed block, kept for reuse
    std::unordered_map<void*, handed_out> outstanding_;     // handed-out block -> its real size
    std::size_t retained_ = 0, in_use_ = 0;
};

} // namespace kvc
