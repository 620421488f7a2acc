// Calibration artifacts: round trip, and every kind of damage is a kvc::error.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "kvc/calibration/artifact.hpp"

namespace {

using kvc::calibration::artifact;
using kvc::calibration::tensor;

artifact sample() {
    artifact a;
    a.kind = "qfilter";
    a.tensors.push_back(tensor{"filters", {2, 3, 4}, {}});
    for (int i = 0; i < 24; ++i) a.tensors[0].values.push_back(0.25f * static_cast<float>(i) - 1.0f);
    a.tensors.push_back(tensor{"scalar", {}, {42.0f}});
    return a;
}

void expect_error(const std::vector<unsigned char>& bytes, const std::string& needle) {
    try {
        kvc::calibration::deserialize(bytes.data(), bytes.size());
        ADD_FAILURE() << "expected kvc::error mentioning '" << needle << "'";
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

TEST(CalibrationArtifact, RoundTripsThroughBytesAndFiles) {
    const artifact a = sample();
    const auto bytes = kvc::calibration::serialize(a);
    // Layout: 8 magic + 4 version + (4 + 7) kind + 4 count + tensor 1 (4 + 7 + 4 + 3*8 + 24*4) + tensor 2 (4 + 6 + 4 + 0 + 4) + 4 crc.
    EXPECT_EQ(bytes.size(), 8u + 4 + 11 + 4 + (11 + 4 + 24 + 96) + (10 + 4 + 4) + 4);
    const artifact b = kvc::calibration::deserialize(bytes.data(), bytes.size());
    EXPECT_EQ(b.kind, "qfilter");
    ASSERT_EQ(b.tensors.size(), 2u);
    EXPECT_EQ(b.get("filters", {2, 3, 4}).values, a.tensors[0].values);
    EXPECT_EQ(b.get("scalar", {}).values, std::vector<float>{42.0f});
    const std::string path = ::testing::TempDir() + "kvc_artifact_test.bin";
    kvc::calibration::save(a, path);
    EXPECT_EQ(kvc::calibration::load(path).get("filters", {2, 3, 4}).values, a.tensors[0].values);
    std::remove(path.c_str());
}

TEST(CalibrationArtifact, CorruptionIsDetectedAnywhere) {
    const auto bytes = kvc::calibration::serialize(sample());
    // Flipping any single bit after the magic is caught (version or checksum).
    for (std::size_t i = 8; i < bytes.size(); ++i) {
        auto damaged = bytes;
        damaged[i] ^= 0x10;
        EXPECT_THROW(kvc::calibration::deserialize(damaged.data(), damaged.size()), kvc::error) << "byte " << i;
    }
    auto bad_magic = bytes;
    bad_magic[0] = 'X';
    expect_error(bad_magic, "magic");
}

TEST(CalibrationArtifact, TruncationIsDetectedAtEveryLength) {
    const auto bytes = kvc::calibration::serialize(sample());
    for (std::size_t size = 0; size < bytes.size(); ++size) {
        std::vector<unsigned char> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(size));
        EXPECT_THROW(kvc::calibration::deserialize(cut.data(), cut.size()), kvc::error) << "size " << size;
    }
}

TEST(CalibrationArtifact, MissingOrMisshapenTensorsAreNamed) {
    const artifact a = sample();
    try {
        a.get("filters", {2, 3, 5});
        ADD_FAILURE();
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find("2x3x4"), std::string::npos) << e.what();
    }
    EXPECT_THROW(a.get("codebook", {1}), kvc::error);
    EXPECT_THROW(kvc::calibration::load("/nonexistent/kvc.bin"), kvc::error);
}

// Issue 19 item 9: load() used to read the whole stream before any check.
// A sparse file one byte over the default limit fails from its size alone
// (the old code read the whole gigabyte, then said "bad magic"); a device
// that never ends fails once it has sent more than the limit.
TEST(CalibrationArtifactFile, LoadReadsAtMostTheLimit) {
    const std::string path = ::testing::TempDir() + "kvc_artifact_huge.bin";
    {
        std::ofstream out(path, std::ios::binary);
        ASSERT_TRUE(out);
    }
    ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(kvc::calibration::max_artifact_bytes + 1)), 0);
    try {
        kvc::calibration::load(path);
        ADD_FAILURE() << "loaded a file over the limit";
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find("more than the 1073741824"), std::string::npos) << e.what();
    }
    std::remove(path.c_str());
    if (::access("/dev/zero", R_OK) == 0) {
        try {
            kvc::calibration::load("/dev/zero", 1 << 20);
            ADD_FAILURE() << "read /dev/zero to its end";
        } catch (const kvc::error& e) {
            EXPECT_NE(std::string(e.what()).find("holds more than the 1048576 bytes"), std::string::npos) << e.what();
        }
    }
}

// Issue 19 item 11: a directory threw std::ios_base::failure.
TEST(CalibrationArtifactFile, DirectoryIsAKvcError) {
    try {
        kvc::calibration::load(::testing::TempDir());
        ADD_FAILURE() << "loaded a directory";
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find("is a directory"), std::string::npos) << e.what();
    }
}

// Issue 19 item 10: the flush happened in the destructor, unchecked, so a
// full disk "succeeded".
TEST(CalibrationArtifactFile, SaveToAFullDeviceFails) {
    if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "no writable /dev/full";
    try {
        kvc::calibration::save(sample(), "/dev/full");
        ADD_FAILURE() << "saving to /dev/full succeeded";
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find("'/dev/full' failed"), std::string::npos) << e.what();
    }
}

// Issue 19 item 16: a file naming a tensor twice was accepted, and get()
// silently returned the first. The bytes are built by renaming tensor "b" to
// "a" and fixing the checksum, so no serializer check stands in the way.
TEST(CalibrationArtifact, DuplicateTensorNamesAreRejected) {
    artifact a;
    a.kind = "test";
    a.tensors.push_back(tensor{"a", {1}, {1.0f}});
    a.tensors.push_back(tensor{"b", {1}, {2.0f}});
    auto bytes = kvc::calibration::serialize(a);
    const std::size_t second_name = 8 + 4 + (4 + 4) + 4 + (4 + 1 + 4 + 8 + 4) + 4;
    ASSERT_EQ(bytes[second_name], 'b');
    bytes[second_name] = 'a';
    const std::uint32_t crc = kvc::calibration::detail::crc32(bytes.data(), bytes.size() - 4);
    std::memcpy(bytes.data() + bytes.size() - 4, &crc, 4);
    expect_error(bytes, "tensor 'a' appears twice");

    a.tensors[1].name = "a";
    EXPECT_THROW(kvc::calibration::serialize(a), kvc::error);
}

// A shape whose product wraps to 0 passed the serializer's count check with
// no values and produced a file load() rejects.
TEST(CalibrationArtifact, ShapeProductOverflowIsAnError) {
    artifact a;
    a.kind = "test";
    a.tensors.push_back(tensor{"huge", {std::uint64_t{1} << 32, std::uint64_t{1} << 32}, {}});
    EXPECT_THROW(kvc::calibration::serialize(a), kvc::error);
}

} // namespace
