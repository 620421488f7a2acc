// Instruction-set detection and dispatch: kvc::active_arch, KVC_ARCH,
// kvc::parse_arch, kvc::set_active_arch, available_archs / table_for.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kvc/core/error.hpp"
#include "kernel_test_util.hpp"

namespace {

using namespace kvc_test;

const arch_id every_arch[] = {arch_id::scalar, arch_id::sse2, arch_id::avx2, arch_id::avx512, arch_id::neon};

std::vector<arch_id> available() {
    arch_id archs[kvc::arch_count];
    const int count = kk::available_archs(archs);
    return std::vector<arch_id>(archs, archs + count);
}

bool is_available(arch_id arch) {
    for (arch_id a : available())
        if (a == arch) return true;
    return false;
}

// The table kvc should pick with KVC_ARCH unset: the widest instruction set.
arch_id best_available() {
    for (arch_id arch : {arch_id::avx512, arch_id::avx2, arch_id::neon, arch_id::sse2})
        if (is_available(arch)) return arch;
    return arch_id::scalar;
}

// Restores the active table (and KVC_ARCH) when a test that changes them ends.
class restore_dispatch {
public:
    restore_dispatch() : arch_(kvc::active_arch()) {
        const char* env = std::getenv("KVC_ARCH");
        had_env_ = env != nullptr;
        if (had_env_) env_ = env;
    }
    ~restore_dispatch() {
        if (had_env_) setenv("KVC_ARCH", env_.c_str(), 1);
        else unsetenv("KVC_ARCH");
        kvc::set_active_arch(arch_);
    }

private:
    arch_id arch_;
    bool had_env_ = false;
    std::string env_;
};

TEST(Dispatch, ListsAvailableArchs) {
    std::string names;
    for (arch_id arch : available()) names += std::string(" ") + kvc::name_of(arch);
    std::cout << "[ kvc      ] available:" << names << "; active: " << kvc::name_of(kvc::active_arch())
              << "; KVC_ARCH=" << (std::getenv("KVC_ARCH") ? std::getenv("KVC_ARCH") : "(unset)") << std::endl;
    const auto archs = available();
    ASSERT_FALSE(archs.empty());
    EXPECT_EQ(archs.front(), arch_id::scalar);
    for (std::size_t i = 1; i < archs.size(); ++i) EXPECT_LT(archs[i - 1], archs[i]) << "listed in arch_id order";
}

TEST(Dispatch, ActiveArchIsOneOfTheAvailable) {
    const arch_id active = kvc::active_arch();
    EXPECT_TRUE(is_available(active)) << kvc::name_of(active);
    EXPECT_EQ(&kk::active(), kk::table_for(active));
    EXPECT_EQ(kk::active().arch, active);
}

TEST(Dispatch, EveryTableReportsItsOwnArch) {
    for (arch_id arch : every_arch) {
        SCOPED_TRACE(kvc::name_of(arch));
        const kk::kernel_table* table = kk::table_for(arch);
        EXPECT_EQ(table != nullptr, is_available(arch));
        EXPECT_EQ(table != nullptr, kvc::cpu().supports(arch)) << "this build has kernels for every arch of its CPU family";
        if (table != nullptr) {
            EXPECT_EQ(table->arch, arch);
        }
    }
    EXPECT_EQ(kk::table_for(arch_id::scalar), &kk::reference_table());
}

TEST(Dispatch, DetectionIsConsistent) {
    const kvc::cpu_features& f = kvc::cpu();
    EXPECT_TRUE(f.supports(arch_id::scalar));
    EXPECT_TRUE(!f.avx512 || f.avx2) << "avx512 implies avx2";
    EXPECT_TRUE(!f.avx2 || f.sse2) << "avx2 implies sse2";
    EXPECT_TRUE(!f.avx512_vnni || f.avx512);
#if defined(__x86_64__) || defined(_M_X64)
    EXPECT_TRUE(f.sse2) << "sse2 is part of x86-64";
    EXPECT_FALSE(f.neon);
    // The compiler knows what it targets; the CPU running the test has at least that.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    EXPECT_TRUE(f.avx2);
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
    EXPECT_TRUE(f.avx512);
#endif
#elif defined(__aarch64__)
    EXPECT_TRUE(f.neon);
    EXPECT_FALSE(f.sse2 || f.avx2 || f.avx512);
#endif
}

TEST(Dispatch, ParseArchAcceptsTheFiveNamesOnly) {
    for (arch_id arch : every_arch) {
        arch_id parsed = arch == arch_id::scalar ? arch_id::neon : arch_id::scalar;
        EXPECT_TRUE(kvc::parse_arch(kvc::name_of(arch), parsed)) << kvc::name_of(arch);
        EXPECT_EQ(parsed, arch);
    }
    for (const char* bad : {"", "AVX2", "Scalar", "avx", "sse", "sse4", "avx512bw", "avx2 ", " avx2", "neon64",
                            "scalar\n", "avx-512", "native", "auto"}) {
        arch_id parsed = arch_id::avx2;
        EXPECT_FALSE(kvc::parse_arch(bad, parsed)) << "'" << bad << "'";
        EXPECT_EQ(parsed, arch_id::avx2) << "a rejected name leaves the output alone";
    }
    arch_id parsed = arch_id::sse2;
    EXPECT_FALSE(kvc::parse_arch(nullptr, parsed));
    EXPECT_EQ(parsed, arch_id::sse2);
}

TEST(Dispatch, SetActiveArchSwitchesToEveryAvailableArch) {
    restore_dispatch restore;
    for (arch_id arch : available()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        EXPECT_EQ(kvc::active_arch(), arch);
        EXPECT_EQ(&kk::active(), kk::table_for(arch));
    }
}

TEST(Dispatch, SetActiveArchToAnUnavailableArchThrowsAndKeepsTheTable) {
    restore_dispatch restore;
    std::vector<arch_id> unavailable;
    for (arch_id arch : every_arch)
        if (!is_available(arch)) unavailable.push_back(arch);
    if (unavailable.empty()) GTEST_SKIP() << "every instruction set is available here";
#if defined(__x86_64__) || defined(_M_X64)
    EXPECT_FALSE(is_available(arch_id::neon));
#endif
    const arch_id before = kvc::active_arch();
    for (arch_id arch : unavailable) {
        SCOPED_TRACE(kvc::name_of(arch));
        EXPECT_THROW(kvc::set_active_arch(arch), kvc::error);
        EXPECT_EQ(kvc::active_arch(), before);
    }
}

// With KVC_ARCH unset (or empty) the process starts on the widest available
// instruction set; with KVC_ARCH set, on that one. Reads the environment the
// test runs in rather than changing it.
TEST(Dispatch, InitialChoiceFollowsKvcArch) {
    const char* env = std::getenv("KVC_ARCH");
    const kk::kernel_table* initial = kk::detail::initial_table();
    if (env == nullptr || *env == '\0') {
        EXPECT_EQ(initial->arch, best_available()) << "KVC_ARCH unset: expected the best table, got "
                                                   << kvc::name_of(initial->arch);
    } else {
        arch_id requested;
        ASSERT_TRUE(kvc::parse_arch(env, requested)) << "KVC_ARCH=" << env << " would have failed at start-up";
        EXPECT_EQ(initial->arch, requested);
    }
    EXPECT_EQ(kk::detail::best_table()->arch, best_available());
}

// KVC_ARCH parsing at start-up: valid available names select that table,
// unknown names and unavailable instruction sets are errors, not fallbacks.
// (initial_table() reads the variable on each call; the active table is not
// touched, and the variable is restored.)
TEST(Dispatch, KvcArchSelectsOrRejects) {
    restore_dispatch restore;
    for (arch_id arch : available()) {
        SCOPED_TRACE(kvc::name_of(arch));
        setenv("KVC_ARCH", kvc::name_of(arch), 1);
        EXPECT_EQ(kk::detail::initial_table(), kk::table_for(arch));
    }
    setenv("KVC_ARCH", "", 1);
    EXPECT_EQ(kk::detail::initial_table()->arch, best_available());
    unsetenv("KVC_ARCH");
    EXPECT_EQ(kk::detail::initial_table()->arch, best_available());
    setenv("KVC_ARCH", "avx3", 1);
    EXPECT_THROW(kk::detail::initial_table(), kvc::error);
    for (arch_id arch : every_arch)
        if (!is_available(arch)) {
            SCOPED_TRACE(kvc::name_of(arch));
            setenv("KVC_ARCH", kvc::name_of(arch), 1);
            EXPECT_THROW(kk::detail::initial_table(), kvc::error);
        }
}

} // namespace
