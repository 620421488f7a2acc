// examples/ruler/tasks.hpp: every sample is exactly the length asked, its
// answer is what a plain string search of the prompt finds (an independent
// solver written from the format specification in models/kvret/README.md),
// and generation is a function of the seed.
#include <cctype>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "ruler/tasks.hpp"

namespace {

// Filler with Python-like lines of varied length; no line starts with '@', '%' or '?'.
std::string filler_text() {
    std::string text;
    for (int i = 0; i < 4000; ++i) {
        text += std::string(static_cast<std::size_t>(4 * (i % 3)), ' ') + "value_" + std::to_string(i) +
                " = compute(" + std::to_string(i * 7919 % 1000) + ")" + std::string(static_cast<std::size_t>(i % 11), '#') +
                "\n";
    }
    return text;
}

std::vector<std::string> split(const std::string& s, const std::string& sep) {
    std::vector<std::string> out;
    std::size_t from = 0;
    for (;;) {
        const std::size_t at = s.find(sep, from);
        out.push_back(s.substr(from, at == std::string::npos ? std::string::npos : at - from));
        if (at == std::string::npos) return out;
        from = at + sep.size();
    }
}

// Lines of the context that start with `prefix`, in order.
std::vector<std::string> lines_starting(const std::string& context, const std::string& prefix) {
    std::vector<std::string> out;
    for (const std::string& line : split(context, "\n"))
        if (line.compare(0, prefix.size(), prefix) == 0) out.push_back(line);
    return out;
}

bool is_value(const std::string& s) {
    if (s.size() != 7 || s[0] == '0') return false;
    for (char c : s)
        if (!std::isdigit(static_cast<unsigned char>(c))) return false;
    return true;
}

// What the prompt says the answer is, found by string search alone.
std::string solve(const std::string& context, const std::string& question) {
    const std::string asked = question.substr(1, question.size() - 2); // between '?' and '='
    if (asked == "%") {                                                 // aggregate: the most frequent word line
        std::map<std::string, int> count;
        for (const std::string& line : lines_starting(context, "%")) ++count[line.substr(1)];
        std::string best;
        for (const auto& wc : count)
            if (best.empty() || wc.second > count[best]) best = wc.first;
        return best;
    }
    std::string answer;
    auto add = [&answer](const std::string& part) { answer += (answer.empty() ? "" : "; ") + part; };
    for (const std::string& key : split(asked, " ")) {
        const std::vector<std::string> own = lines_starting(context, "@" + key + ": ");
        if (own.empty()) { // multivalue: key#1, key#2, ... in context order
            for (const std::string& line : lines_starting(context, "@" + key + "#")) add(line.substr(1));
            continue;
        }
        std::string line = own.at(0);
        add(line.substr(1));
        for (;;) { // vartrack: follow a value that names another key
            const std::string ref = line.substr(line.find(": ") + 2);
            if (is_value(ref)) break;
            line = lines_starting(context, "@" + ref + ": ").at(0);
            add(line.substr(1));
        }
    }
    return answer;
}

} // namespace

TEST(RulerTasks, AnswerIsFoundInThePromptByStringSearch) {
    const std::string text = filler_text();
    const std::map<ruler::task, std::size_t> records = {
        {ruler::task::single, 1},     {ruler::task::multikey, 8}, {ruler::task::multivalue, 8},
        {ruler::task::multiquery, 8}, {ruler::task::vartrack, 8}, {ruler::task::aggregate, 0}};
    for (std::uint64_t seed = 1; seed <= 6; ++seed) {
        ruler::generator gen(text, seed);
        for (ruler::task t : ruler::all_tasks)
            for (std::size_t length : {256u, 2048u}) {
                SCOPED_TRACE(std::string(ruler::task_name(t)) + " length " + std::to_string(length) + " seed " +
                             std::to_string(seed));
                const ruler::sample s = gen.make(t, length);
                EXPECT_EQ(s.kind, t);
                EXPECT_EQ(s.text().size(), length);
                ASSERT_FALSE(s.context.empty());
                EXPECT_EQ(s.context.back(), '\n');
                ASSERT_GE(s.question.size(), 3u);
                EXPECT_EQ(s.question.front(), '?');
                EXPECT_EQ(s.question.back(), '=');
                EXPECT_EQ(s.answer.find('\n'), std::string::npos);
                EXPECT_EQ(lines_starting(s.context, "@").size(), records.at(t));
                EXPECT_EQ(solve(s.context, s.question), s.answer);
            }
    }
}

TEST(RulerTasks, AnswersHaveTheSpecifiedShape) {
    ruler::generator gen(filler_text(), 7);
    const ruler::sample multivalue = gen.make(ruler::task::multivalue, 1024);
    const std::string key = multivalue.question.substr(1, 6);
    const std::vector<std::string> parts = split(multivalue.answer, "; ");
    ASSERT_EQ(parts.size(), 4u);
    for (std::size_t i = 0; i < 4; ++i) {
        EXPECT_EQ(parts[i].substr(0, 10), key + "#" + std::to_string(i + 1) + ": ");
        EXPECT_TRUE(is_value(parts[i].substr(10)));
    }
    const ruler::sample vartrack = gen.make(ruler::task::vartrack, 1024);
    const std::vector<std::string> hops = split(vartrack.answer, "; ");
    ASSERT_EQ(hops.size(), 4u);
    EXPECT_EQ(hops[0].substr(0, 6), vartrack.question.substr(1, 6));
    for (std::size_t i = 0; i + 1 < 4; ++i) {
        EXPECT_EQ(hops[i].substr(8), hops[i + 1].substr(0, 6)); // each assignment names the next one asked
        // An assignment comes after the one it reads.
        EXPECT_GT(vartrack.context.find("@" + hops[i] + "\n"), vartrack.context.find("@" + hops[i + 1] + "\n"));
    }
    EXPECT_TRUE(is_value(hops[3].substr(8)));
    const ruler::sample multiquery = gen.make(ruler::task::multiquery, 1024);
    const std::vector<std::string> asked = split(multiquery.question.substr(1, multiquery.question.size() - 2), " ");
    const std::vector<std::string> answered = split(multiquery.answer, "; ");
    ASSERT_EQ(asked.size(), 4u);
    ASSERT_EQ(answered.size(), 4u);
    for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(answered[i].substr(0, 8), asked[i] + ": ");
    const ruler::sample aggregate = gen.make(ruler::task::aggregate, 1024);
    std::map<std::string, int> count;
    for (const std::string& line : lines_starting(aggregate.context, "%")) ++count[line.substr(1)];
    EXPECT_EQ(count.size(), 9u);
    for (const auto& wc : count) EXPECT_EQ(wc.second == 6, wc.first == aggregate.answer) << wc.first;
}

TEST(RulerTasks, TheSeedDeterminesTheSamples) {
    const std::string text = filler_text();
    ruler::generator a(text, 42), b(text, 42), c(text, 43);
    for (ruler::task t : ruler::all_tasks) {
        const std::string sa = a.make(t, 512).text();
        EXPECT_EQ(sa, b.make(t, 512).text()) << ruler::task_name(t);
        EXPECT_NE(sa, c.make(t, 512).text()) << ruler::task_name(t);
    }
}

TEST(RulerTasks, NeedleDepthCoversTheContext) {
    const std::string text = filler_text();
    bool early = false, late = false;
    for (std::uint64_t seed = 0; seed < 40; ++seed) {
        const ruler::sample s = ruler::generator(text, seed).make(ruler::task::single, 2048);
        const double depth = static_cast<double>(s.context.find('@')) / static_cast<double>(s.context.size());
        early = early || depth < 0.25;
        late = late || depth > 0.75;
    }
    EXPECT_TRUE(early);
    EXPECT_TRUE(late);
}

TEST(RulerTasks, BadRequestsAreErrors) {
    ruler::generator gen(filler_text(), 1);
    try {
        gen.make(ruler::task::multiquery, 100);
        FAIL() << "a length shorter than the records was accepted";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("needs at least"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("length 100"), std::string::npos) << e.what();
    }
    EXPECT_THROW(gen.make(ruler::task::single, 1 << 20), std::invalid_argument); // more filler than the text has
    EXPECT_THROW(ruler::generator("no line break", 1), std::invalid_argument);
    for (ruler::task t : ruler::all_tasks) EXPECT_EQ(ruler::task_from_name(ruler::task_name(t)), t);
    try {
        ruler::task_from_name("needle");
        FAIL() << "an unknown task name was accepted";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("'needle'"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("vartrack"), std::string::npos) << e.what();
    }
}
