// token_columns: the host's one generic loop over every per-token column.
// Hand-worked cases: values after append, gather and keep; bytes against a
// counting resource; the union of declared lists keeps each column once.
#include <gtest/gtest.h>

#include <cstdint>
#include <type_traits>

#include "../cache/cache_test_util.hpp"
#include "kvc/storage/token_columns.hpp"

namespace {

struct count_column { // e.g. a merger's tokens-per-slot
    using value_type = std::uint32_t;
    static constexpr value_type initial = 1;
};
struct score_column {
    using value_type = double;
    static constexpr value_type initial = -2.5;
};

using kvc::column_list;
using kvc::position_column;
static_assert(std::is_same_v<kvc::column_union_t<column_list<position_column>, column_list<count_column, position_column>,
                                                 column_list<>, column_list<score_column, count_column>>,
                             column_list<position_column, count_column, score_column>>,
              "the union keeps each column once, in first-declared order");
struct declares {
    using columns = column_list<score_column>;
};
static_assert(std::is_same_v<kvc::columns_of_t<declares>, column_list<score_column>>);
static_assert(std::is_same_v<kvc::columns_of_t<int>, column_list<>>, "a policy that declares nothing has no columns");

using three = kvc::token_columns<column_list<position_column, count_column, score_column>>;
static_assert(three::has<count_column> && !kvc::token_columns<column_list<position_column>>::has<count_column>);

TEST(TokenColumns, AllColumnsAreKeptByDefaultAndCountedPerToken) {
    kvc_test::counting_resource counting;
    const three columns(&counting);
    EXPECT_EQ(columns.bytes_per_token(), 4u + 4u + 8u);
    EXPECT_TRUE(columns.active<count_column>() && columns.active<score_column>());
}

// A column switched off (a run-time policy that declares it but does not
// use it) holds nothing through append, gather, keep and copy, and its data is null.
TEST(TokenColumns, SwitchedOffColumnsHoldNothing) {
    kvc_test::counting_resource counting;
    three columns(&counting, three::bit<position_column>() | three::bit<count_column>());
    EXPECT_FALSE(columns.active<score_column>());
    EXPECT_EQ(columns.bytes_per_token(), 4u + 4u);
    columns.reserve_for_append(5);
    columns.append_initial(5);
    EXPECT_EQ(columns.data<score_column>(), nullptr);
    EXPECT_EQ(columns.data<count_column>()[4], 1u);
    EXPECT_EQ(columns.bytes(), counting.in_use);
    const std::uint32_t kept[] = {0, 3};
    const three gathered = columns.gathered(kept, 2);
    EXPECT_FALSE(gathered.active<score_column>());
    EXPECT_EQ(gathered.bytes(), 2 * (4u + 4u));
    EXPECT_EQ(gathered.data<score_column>(), nullptr);
    columns.keep(kept, 2);
    const three copy = columns;
    EXPECT_EQ(copy.data<score_column>(), nullptr);
    EXPECT_EQ(copy.bytes_per_token(), 4u + 4u);
}

TEST(TokenColumns, AppendStartsEveryColumnAtItsInitialValue) {
    kvc_test::counting_resource counting;
    three columns(&counting);
    columns.reserve_for_append(3);
    columns.append_initial(3);
    for (int t = 0; t < 3; ++t) {
        columns.data<position_column>()[t] = 10 + t;
        EXPECT_EQ(columns.data<count_column>()[t], 1u);
        EXPECT_EQ(columns.data<score_column>()[t], -2.5);
    }
    columns.reserve_for_append(2);
    columns.append_initial(2);
    EXPECT_EQ(columns.data<position_column>()[2], 12); // earlier tokens kept through growth
    EXPECT_EQ(columns.data<position_column>()[4], 0);
    EXPECT_EQ(columns.data<count_column>()[4], 1u);
    EXPECT_EQ(columns.bytes(), counting.in_use) << "bytes() is every byte the columns took";
}

TEST(TokenColumns, GatherAndKeepHoldExactlyTheChosenTokens) {
    kvc_test::counting_resource counting;
    three columns(&counting);
    columns.reserve_for_append(6);
    columns.append_initial(6);
    for (std::uint32_t t = 0; t < 6; ++t) {
        columns.data<position_column>()[t] = static_cast<std::int32_t>(100 + t);
        columns.data<count_column>()[t] = t + 1;
        columns.data<score_column>()[t] = 0.5 * t;
    }
    const std::uint32_t kept[] = {1, 4, 5};
    const std::size_t before = counting.in_use;
    const three gathered = columns.gathered(kept, 3);
    EXPECT_EQ(gathered.bytes(), 3 * (4 + 4 + 8)) << "a gathered copy is sized to what it holds";
    EXPECT_EQ(counting.in_use - before, gathered.bytes());
    const std::int32_t positions[] = {101, 104, 105};
    for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(gathered.data<position_column>()[i], positions[i]);
        EXPECT_EQ(gathered.data<count_column>()[i], kept[i] + 1);
        EXPECT_EQ(gathered.data<score_column>()[i], 0.5 * kept[i]);
    }
    columns.keep(kept, 3);
    columns.shrink_to_fit();
    for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(columns.data<position_column>()[i], positions[i]);
        EXPECT_EQ(columns.data<score_column>()[i], 0.5 * kept[i]);
    }
    EXPECT_EQ(columns.bytes(), 3 * (4 + 4 + 8));
    columns.release();
    EXPECT_EQ(columns.bytes(), 0u);
    EXPECT_EQ(counting.in_use, gathered.bytes());
}

TEST(TokenColumns, CopiesAreDeepAndCounted) {
    kvc_test::counting_resource counting;
    three columns(&counting);
    columns.reserve(4);
    columns.append_initial(2);
    three copy = columns;
    copy.data<count_column>()[0] = 7;
    EXPECT_EQ(columns.data<count_column>()[0], 1u);
    EXPECT_EQ(counting.in_use, columns.bytes() + copy.bytes());
}

} // namespace
