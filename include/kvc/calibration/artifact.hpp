// kvc/calibration/artifact.hpp -- calibration results as versioned, checksummed files.
//
// Calibration (offline statistics: query filters, head roles, ranges,
// codebooks) produces named float tensors. They travel as one binary file:
//
//   magic      8 bytes  "KVCCALIB"
//   version    u32      format version (1)
//   kind       u32 length + UTF-8 bytes  (what produced it, e.g. "qfilter")
//   tensors    u32 count, then per tensor:
//                name  u32 length + bytes
//                rank  u32, then rank x u64 extents
//                data  product(extents) x f32
//   checksum   u32      CRC-32 (IEEE) of every byte before it
//
// All integers and floats little-endian. Loading checks the magic, the
// version, every length against the bytes left, and the checksum, and throws
// kvc::error saying what is wrong: a corrupt or truncated file never yields
// an artifact, and neither does one naming a tensor twice (get() could only
// ever return the first). Files go through file_io.hpp: load() reads at most
// max_artifact_bytes, save() reports a write that did not reach the disk.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvc/calibration/file_io.hpp"
#include "kvc/core/error.hpp"

namespace kvc::calibration {

inline constexpr std::uint32_t artifact_version = 1;
// What load() reads at most by default: artifacts hold per-head statistics
// and codebooks (kilobytes to megabytes), far below this.
inline constexpr std::uint64_t max_artifact_bytes = std::uint64_t{1} << 30;

struct tensor {
    std::string name;
    std::vector<std::uint64_t> shape;
    std::vector<float> values; // product(shape) floats, row-major

    // product(shape); throws kvc::error when it does not fit a size_t
    // (such a shape would otherwise wrap and pass as a small tensor).
    std::size_t elements() const {
        std::size_t n = 1;
        for (std::uint64_t extent : shape) {
            kvc::detail::require(extent == 0 || n <= SIZE_MAX / extent, "calibration tensor '", name,
                                 "': the product of its shape overflows");
            n *= static_cast<std::size_t>(extent);
        }
        return n;
    }
};

struct artifact {
    std::string kind;
    std::vector<tensor> tensors;

    // The tensor called `name`; throws kvc::error when absent or not of `expected_shape`.
    const tensor& get(const std::string& name, const std::vector<std::uint64_t>& expected_shape) const {
        for (const tensor& t : tensors)
            if (t.name == name) {
                if (t.shape != expected_shape) {
                    std::string given, wanted;
                    for (auto e : t.shape) given += (given.empty() ? "" : "x") + std::to_string(e);
                    for (auto e : expected_shape) wanted += (wanted.empty() ? "" : "x") + std::to_string(e);
                    kvc::detail::fail("calibration artifact '", kind, "': tensor '", name, "' has shape ", given,
                                 ", expected ", wanted);
                }
                return t;
            }
        kvc::detail::fail("calibration artifact '", kind, "': no tensor named '", name, "'");
    }
};

namespace detail {

inline std::uint32_t crc32(const unsigned char* data, std::size_t size) noexcept {
    std::uint32_t crc = 0xffffffffu;
    for (std::size_t i = 0; i < size; ++i) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

class writer {
public:
    std::vector<unsigned char> bytes;
    template <class T>
    void put(T value) {
        unsigned char raw[sizeof(T)];
        std::memcpy(raw, &value, sizeof(T)); // little-endian hosts only (x86-64, AArch64)
        bytes.insert(bytes.end(), raw, raw + sizeof(T));
    }
    void put_string(const std::string& s) {
        put(static_cast<std::uint32_t>(s.size()));
        bytes.insert(bytes.end(), s.begin(), s.end());
    }
};

class reader {
public:
    reader(const unsigned char* data, std::size_t size) : data_(data), size_(size) {}
    template <class T>
    T get(const char* what) {
        need(sizeof(T), what);
        T value;
        std::memcpy(&value, data_ + offset_, sizeof(T));
        offset_ += sizeof(T);
        return value;
    }
    std::string get_string(const char* what) {
        const auto length = get<std::uint32_t>(what);
        need(length, what);
        std::string s(reinterpret_cast<const char*>(data_ + offset_), length);
        offset_ += length;
        return s;
    }
    void need(std::size_t bytes, const char* what) const {
        kvc::detail::require(bytes <= size_ - offset_, "calibration artifact: truncated while reading ", what,
                             " (needs ", bytes, " bytes, ", size_ - offset_, " left)");
    }
    std::size_t offset() const noexcept { return offset_; }
    const unsigned char* here() const noexcept { return data_ + offset_; }
    void skip(std::size_t bytes) noexcept { offset_ += bytes; }

private:
    const unsigned char* data_;
    std::size_t size_;
    std::size_t offset_ = 0;
};

} // namespace detail

inline std::vector<unsigned char> serialize(const artifact& a) {
    detail::writer w;
    const char magic[8] = {'K', 'V', 'C', 'C', 'A', 'L', 'I', 'B'};
    w.bytes.insert(w.bytes.end(), magic, magic + 8);
    w.put(artifact_version);
    w.put_string(a.kind);
    w.put(static_cast<std::uint32_t>(a.tensors.size()));
    for (std::size_t i = 0; i < a.tensors.size(); ++i) {
        const tensor& t = a.tensors[i];
        for (std::size_t j = 0; j < i; ++j)
            kvc::detail::require(a.tensors[j].name != t.name, "calibration::serialize: two tensors named '", t.name,
                                 "' (tensors ", j, " and ", i, ")");
        kvc::detail::require(t.values.size() == t.elements(), "calibration::serialize: tensor '", t.name, "' has ",
                             t.values.size(), " values, expected ", t.elements(), " from its shape");
        w.put_string(t.name);
        w.put(static_cast<std::uint32_t>(t.shape.size()));
        for (std::uint64_t extent : t.shape) w.put(extent);
        for (float v : t.values) w.put(v);
    }
    w.put(detail::crc32(w.bytes.data(), w.bytes.size()));
    return w.bytes;
}

inline artifact deserialize(const unsigned char* data, std::size_t size) {
    kvc::detail::require(size >= 8 + 4 + 4, "calibration artifact: ", size, " bytes is too short to be one");
    kvc::detail::require(std::memcmp(data, "KVCCALIB", 8) == 0,
                         "calibration artifact: bad magic, expected 'KVCCALIB' (not a kvc calibration file)");
    std::uint32_t stored_crc;
    std::memcpy(&stored_crc, data + size - 4, 4);
    const std::uint32_t crc = detail::crc32(data, size - 4);
    detail::reader r(data, size - 4);
    r.skip(8);
    const auto version = r.get<std::uint32_t>("version");
    kvc::detail::require(version == artifact_version, "calibration artifact: format version ", version,
                         ", this kvc reads version ", artifact_version);
    kvc::detail::require(crc == stored_crc, "calibration artifact: checksum mismatch (file corrupt or truncated)");
    artifact a;
    a.kind = r.get_string("kind");
    const auto count = r.get<std::uint32_t>("tensor count");
    for (std::uint32_t i = 0; i < count; ++i) {
        tensor t;
        t.name = r.get_string("tensor name");
        for (const tensor& earlier : a.tensors)
            kvc::detail::require(earlier.name != t.name, "calibration artifact: tensor '", t.name,
                                 "' appears twice, expected unique names");
        const auto rank = r.get<std::uint32_t>("tensor rank");
        kvc::detail::require(rank <= 8, "calibration artifact: tensor '", t.name, "' has rank ", rank,
                             ", expected at most 8");
        std::uint64_t elements = 1;
        for (std::uint32_t d = 0; d < rank; ++d) {
            t.shape.push_back(r.get<std::uint64_t>("tensor extent"));
            kvc::detail::require(t.shape.back() == 0 || elements <= (std::uint64_t{1} << 40) / t.shape.back(),
                                 "calibration artifact: tensor '", t.name, "' is implausibly large");
            elements *= t.shape.back();
        }
        r.need(static_cast<std::size_t>(elements) * 4, "tensor data");
        t.values.resize(static_cast<std::size_t>(elements));
        if (elements) std::memcpy(t.values.data(), r.here(), static_cast<std::size_t>(elements) * 4);
        r.skip(static_cast<std::size_t>(elements) * 4);
        a.tensors.push_back(std::move(t));
    }
    kvc::detail::require(r.offset() == size - 4, "calibration artifact: ", size - 4 - r.offset(),
                         " unexpected bytes after the last tensor");
    return a;
}

inline void save(const artifact& a, const std::string& path) {
    const std::vector<unsigned char> bytes = serialize(a);
    kvc::detail::write_file(path, bytes.data(), bytes.size(), "calibration::save");
}

// Reads at most `max_bytes`; a larger file, a device that never ends or a
// directory throws kvc::error like a corrupt file does.
inline artifact load(const std::string& path, std::uint64_t max_bytes = max_artifact_bytes) {
    const std::vector<unsigned char> bytes = kvc::detail::read_file(path, max_bytes, "calibration::load");
    return deserialize(bytes.data(), bytes.size());
}

} // namespace kvc::calibration
