// libFuzzer target: calibration artifact bytes -> deserialize -> every consumer.
//
// The input's last four bytes are replaced by the CRC-32 of the rest before
// parsing: random mutations would otherwise almost never pass the checksum
// and the fuzzer would never reach the tensors (the checksum's own check is
// unit-tested in tests/calibration/artifact_test.cpp).
//
// Properties checked on every input:
//   - deserialize() either throws kvc::error or returns an artifact;
//   - an accepted input is canonical: serialize() of the result gives back
//     exactly the input bytes (the format has one spelling per artifact);
//   - the consumer of the artifact's kind (quant::cq, quant::kvquant,
//     evict qfilter, evict by_head_role) either throws kvc::error or builds
//     a policy, whose validate() against a small cache shape either throws
//     kvc::error or accepts it.
// Anything else (another exception, a sanitizer report, a trap) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/policy/eviction/head_roles.hpp"
#include "kvc/policy/eviction/qfilter.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/policy/quantization/kvquant.hpp"

namespace {

// The shape the seed corpus's artifacts are made for (tests/fuzz/make_seeds.py).
kvc::cache_config seed_shape() {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 1;
    c.query_heads = 2;
    c.head_dim = 8;
    return c;
}

void consume(const kvc::calibration::artifact& a) {
    const kvc::cache_config config = seed_shape();
    if (a.kind == "cq") {
        kvc::quant::cq codec(a);
        codec.validate(config);
    } else if (a.kind == "kvquant") {
        kvc::quant::kvquant codec(a);
        codec.validate(config);
    } else if (a.kind == "qfilter") {
        kvc::evict::score::qfilter::from(a).validate(config);
    } else if (a.kind == "head_roles") {
        kvc::evict::by_head_role::from(a).validate(config);
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* input, std::size_t size) {
    std::vector<unsigned char> bytes(input, input + size);
    if (size >= 4) {
        const std::uint32_t crc = kvc::calibration::detail::crc32(bytes.data(), size - 4);
        std::memcpy(bytes.data() + size - 4, &crc, 4);
    }
    const unsigned char* data = bytes.data();
    kvc::calibration::artifact a;
    try {
        a = kvc::calibration::deserialize(data, size);
    } catch (const kvc::error&) {
        return 0;
    }
    const std::vector<unsigned char> again = kvc::calibration::serialize(a);
    if (again.size() != size || std::memcmp(again.data(), data, size) != 0) __builtin_trap();
    try {
        consume(a);
    } catch (const kvc::error&) {
    }
    return 0;
}
