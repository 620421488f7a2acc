// kvc/calibration/file_io.hpp -- whole-file reads and writes that report every failure.
//
// Two helpers that every loader and saver goes through (calibration artifacts
// here, the example engine's model, tokenizer, prompt and report files):
//
//   read_file(path, max_bytes, who)    the bytes of `path`, at most max_bytes of them
//   write_file(path, data, size, who)  writes, flushes, closes and checks each step
//
// Why not the obvious stream one-liners: reading with istreambuf_iterator
// grows memory until the source ends (/dev/zero, a FIFO, a huge file never
// end soon enough) and throws std::ios_base::failure on a directory; writing
// with operator<< leaves the bytes in the stream's buffer, which the
// destructor flushes and whose failure (a full disk, /dev/full) nobody sees.
// Both throw kvc::error naming `who`, the path and what went wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "kvc/core/error.hpp"

namespace kvc::detail {

// `path` opened for binary reading. A directory opens on Linux and fails only
// at the first read, so it is rejected here by name.
inline std::ifstream open_for_reading(const std::string& path, const char* who) {
    std::error_code ec;
    const std::filesystem::file_status status = std::filesystem::status(path, ec);
    require(ec || !std::filesystem::is_directory(status), who, ": '", path, "' is a directory, expected a file");
    std::ifstream in(path, std::ios::binary);
    require(static_cast<bool>(in), who, ": cannot open '", path, "' for reading");
    return in;
}

// Reads up to `size` bytes into `out`; returns how many arrived (fewer only
// at the end of the file). A read error (EIO, EISDIR, ...) throws: istream::read
// turns the filebuf's exception into badbit, which is checked here.
inline std::size_t read_some(std::ifstream& in, void* out, std::size_t size, const std::string& path,
                             const char* who) {
    in.read(static_cast<char*>(out), static_cast<std::streamsize>(size));
    require(!in.bad(), who, ": reading '", path, "' failed");
    return static_cast<std::size_t>(in.gcount());
}

// The whole content of `path`, which must hold at most `max_bytes` bytes:
// memory stays within about twice that whatever the source (a regular file
// too large fails before any read; a device or FIFO fails once it has sent
// one byte more than the limit).
inline std::vector<unsigned char> read_file(const std::string& path, std::uint64_t max_bytes, const char* who) {
    std::ifstream in = open_for_reading(path, who);
    std::vector<unsigned char> bytes;
    std::error_code ec;
    if (std::filesystem::is_regular_file(path, ec)) {
        const std::uintmax_t size = std::filesystem::file_size(path, ec);
        if (!ec) {
            require(size <= max_bytes, who, ": '", path, "' has ", size, " bytes, more than the ", max_bytes,
                    " this reader accepts");
            bytes.reserve(static_cast<std::size_t>(size));
        }
    }
    constexpr std::size_t chunk = std::size_t{1} << 16;
    for (;;) {
        const std::size_t old = bytes.size();
        // At most one byte past the limit, enough to tell that the source goes on.
        const std::uint64_t room = max_bytes - old; // old <= max_bytes (checked below)
        const std::size_t want = room < chunk ? static_cast<std::size_t>(room) + 1 : chunk;
        bytes.resize(old + want);
        const std::size_t got = read_some(in, bytes.data() + old, want, path, who);
        bytes.resize(old + got);
        require(bytes.size() <= max_bytes, who, ": '", path, "' holds more than the ", max_bytes,
                " bytes this reader accepts");
        if (got < want) return bytes; // end of file
    }
}

inline std::string read_text_file(const std::string& path, std::uint64_t max_bytes, const char* who) {
    const std::vector<unsigned char> bytes = read_file(path, max_bytes, who);
    return std::string(bytes.begin(), bytes.end());
}

// Writes `size` bytes to `path` (created or truncated). The flush and the
// close are where a full disk shows, so both are checked; on failure a
// regular file left partial is removed, so no reader mistakes it for output.
inline void write_file(const std::string& path, const void* data, std::size_t size, const char* who) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    require(static_cast<bool>(out), who, ": cannot open '", path, "' for writing");
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    out.flush();
    const bool written = static_cast<bool>(out);
    out.close(); // sets failbit when the last flush or the close itself fails
    if (written && !out.fail()) return;
    std::error_code ec;
    if (std::filesystem::is_regular_file(path, ec)) std::filesystem::remove(path, ec);
    fail(who, ": writing ", size, " bytes to '", path, "' failed (disk full or I/O error)");
}

inline void write_text_file(const std::string& path, const std::string& text, const char* who) {
    write_file(path, text.data(), text.size(), who);
}

} // namespace kvc::detail
