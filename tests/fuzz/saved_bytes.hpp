// tests/fuzz/saved_bytes.hpp -- comparing saved caches in the fuzz targets
// that load them (cache_load_fuzz.cpp, parse_spec_fuzz.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvc_fuzz {

// Equal, apart from the kvc version (bytes 24..35: the first header fields)
// and the header section's CRC (docs/SERIALIZATION.md): a reader accepts
// other versions' files and writes its own.
inline bool same_but_version(const std::vector<unsigned char>& a, const std::vector<unsigned char>& b) {
    if (a.size() != b.size() || a.size() < 36) return false;
    std::uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = (header << 8) | a[16 + static_cast<std::size_t>(i)];
    if (header > a.size() - 28) return false;
    const std::size_t crc = 24 + static_cast<std::size_t>(header);
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i] != b[i] && !(i >= 24 && i < 36) && !(i >= crc && i < crc + 4)) return false;
    return true;
}

} // namespace kvc_fuzz
