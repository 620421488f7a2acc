// Calibration artifacts: round trip, and every kind of damage is a kvc::error.
#include <gtest/gtest.h>

#include <cstdio>
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

} // namespace
