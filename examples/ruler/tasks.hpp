// examples/ruler/tasks.hpp -- kvc-ruler's long-range tasks: byte-level prompts
// in the spirit of RULER (single needle, multiple keys, multiple values,
// multiple queries, variable tracking, aggregation) whose answers are only
// found by looking far back in the context.
//
// The formats are specified once, in models/kvret/README.md ("Task formats"),
// and followed both here and by models/kvret/tasks.py, which trained kvret on
// them. A sample is context + question + answer + "\n": filler lines with
// record lines inserted at line starts, then a question line starting with
// '?' and ending with '=', then the answer that greedy decoding must produce
// exactly (the newline closes it).
//
// Generation is deterministic per seed on every platform: the random numbers
// come from std::mt19937_64 (whose sequence the standard fixes) through our
// own bounded draw, not through std::uniform_int_distribution, whose
// algorithm is left to the library.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ruler {

enum class task { single, multikey, multivalue, multiquery, vartrack, aggregate };

inline constexpr std::array<task, 6> all_tasks = {task::single,     task::multikey, task::multivalue,
                                                  task::multiquery, task::vartrack, task::aggregate};

inline const char* task_name(task t) {
    switch (t) {
    case task::single: return "single";
    case task::multikey: return "multikey";
    case task::multivalue: return "multivalue";
    case task::multiquery: return "multiquery";
    case task::vartrack: return "vartrack";
    case task::aggregate: return "aggregate";
    }
    return "?";
}

inline task task_from_name(const std::string& name) {
    std::string known;
    for (task t : all_tasks) {
        if (name == task_name(t)) return t;
        known += known.empty() ? "" : ", ";
        known += task_name(t);
    }
    throw std::invalid_argument("ruler: unknown task '" + name + "', expected one of " + known);
}

struct sample {
    task kind = task::single;
    std::string context;  // filler and record lines; ends with a newline
    std::string question; // "?...=" (no newline)
    std::string answer;   // what greedy decoding must write before the closing newline

    std::string text() const { return context + question + answer + "\n"; }
};

// Makes samples from a filler text (e.g. models/kvret/eval.txt) and a seed.
class generator {
public:
    generator(std::string filler_text, std::uint64_t seed) : text_(std::move(filler_text)), rng_(seed) {
        if (text_.find('\n') == std::string::npos)
            throw std::invalid_argument("ruler: filler text of " + std::to_string(text_.size()) +
                                        " bytes has no line break; expected lines of text");
    }

    // A sample of exactly `length` bytes, answer and closing newline included.
    sample make(task kind, std::size_t length) {
        parts p = records(kind);
        std::size_t fixed = p.question.size() + p.answer.size() + 1;
        for (const std::string& r : p.lines) fixed += r.size() + 1;
        if (length < fixed)
            throw std::invalid_argument(std::string("ruler: task ") + task_name(kind) + " needs at least " +
                                        std::to_string(fixed) + " bytes, length " + std::to_string(length) +
                                        " was asked");
        const std::string fill = filler(length - fixed);
        std::vector<std::size_t> starts = {0}; // line starts of the filler
        for (std::size_t i = 0; i + 1 < fill.size(); ++i)
            if (fill[i] == '\n') starts.push_back(i + 1);
        std::vector<std::size_t> at(p.lines.size()); // insertion points, drawn with replacement, in record order
        for (std::size_t& a : at) a = starts[below(starts.size())];
        std::sort(at.begin(), at.end());
        sample s;
        s.kind = kind;
        std::size_t prev = 0;
        for (std::size_t i = 0; i < at.size(); ++i) {
            s.context.append(fill, prev, at[i] - prev);
            s.context += p.lines[i];
            s.context += '\n';
            prev = at[i];
        }
        s.context.append(fill, prev, std::string::npos);
        s.question = std::move(p.question);
        s.answer = std::move(p.answer);
        return s;
    }

private:
    struct parts {
        std::vector<std::string> lines; // record lines without their newline, in context order
        std::string question, answer;
    };

    // Uniform in [0, n), n > 0: rejection keeps it unbiased.
    std::uint64_t below(std::uint64_t n) {
        const std::uint64_t limit = ~std::uint64_t{0} - (~std::uint64_t{0} % n);
        for (;;) {
            const std::uint64_t r = rng_();
            if (r < limit) return r % n;
        }
    }

    template <class T>
    void shuffle(std::vector<T>& v) { // Fisher-Yates with our own draw
        for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
    }

    // n random lowercase letters not already in `taken` (keys and words are distinct within a sample).
    std::string letters(std::size_t n, std::vector<std::string>& taken) {
        for (;;) {
            std::string s(n, 'a');
            for (char& c : s) c = static_cast<char>('a' + below(26));
            if (std::find(taken.begin(), taken.end(), s) == taken.end()) {
                taken.push_back(s);
                return s;
            }
        }
    }

    std::string value() { return std::to_string(1000000 + below(9000000)); } // 7 digits, no leading zero

    // n bytes of whole lines from a random line start; the last byte becomes a newline.
    std::string filler(std::size_t n) {
        if (n == 0) return {};
        if (text_.size() < n + 2)
            throw std::invalid_argument("ruler: filler text of " + std::to_string(text_.size()) +
                                        " bytes is too short for " + std::to_string(n) + " bytes of filler");
        for (;;) {
            const std::size_t j = text_.find('\n', below(text_.size() - n - 1));
            if (j == std::string::npos || j + 1 + n > text_.size()) continue;
            std::string chunk = text_.substr(j + 1, n);
            chunk.back() = '\n';
            return chunk;
        }
    }

    parts records(task kind) {
        std::vector<std::string> keys;
        auto key = [&] { return letters(6, keys); };
        parts p;
        switch (kind) {
        case task::single: {
            const std::string k = key(), v = value();
            p.lines = {"@" + k + ": " + v};
            p.question = "?" + k + "=";
            p.answer = k + ": " + v;
            break;
        }
        case task::multikey:
        case task::multiquery: {
            std::vector<std::pair<std::string, std::string>> pairs;
            for (int i = 0; i < 8; ++i) {
                std::string k = key();
                pairs.emplace_back(k, value());
            }
            for (const auto& kv : pairs) p.lines.push_back("@" + kv.first + ": " + kv.second);
            std::vector<std::size_t> order = {0, 1, 2, 3, 4, 5, 6, 7};
            shuffle(order);
            const std::size_t asked = kind == task::multikey ? 1 : 4;
            p.question = "?";
            for (std::size_t i = 0; i < asked; ++i) {
                const auto& kv = pairs[order[i]];
                p.question += (i ? " " : "") + kv.first;
                p.answer += (i ? "; " : "") + kv.first + ": " + kv.second;
            }
            p.question += "=";
            break;
        }
        case task::multivalue: {
            const std::string k = key();
            std::vector<std::string> mine;
            for (int i = 1; i <= 4; ++i) {
                const std::string part = k + "#" + std::to_string(i) + ": " + value();
                mine.push_back("@" + part);
                p.answer += (i > 1 ? "; " : "") + part;
            }
            std::vector<int> slot = {1, 1, 1, 1, 0, 0, 0, 0}; // 1: the key's own record, in order #1..#4
            shuffle(slot);
            std::size_t next = 0;
            for (int s : slot) p.lines.push_back(s ? mine[next++] : "@" + key() + ": " + value());
            p.question = "?" + k + "=";
            break;
        }
        case task::vartrack: {
            std::array<std::vector<std::string>, 2> chain; // the asked chain and a distractor chain
            std::array<std::vector<std::string>, 2> names;
            for (int c = 0; c < 2; ++c) {
                for (int i = 0; i < 4; ++i) names[c].push_back(key());
                chain[c].push_back(names[c][0] + ": " + value());
                for (int i = 1; i < 4; ++i) chain[c].push_back(names[c][i] + ": " + names[c][i - 1]);
            }
            std::vector<int> order = {0, 0, 0, 0, 1, 1, 1, 1};
            shuffle(order);
            std::array<std::size_t, 2> next = {0, 0};
            for (int c : order) p.lines.push_back("@" + chain[c][next[c]++]);
            p.question = "?" + names[0][3] + "=";
            for (int i = 3; i >= 0; --i) p.answer += (i < 3 ? "; " : "") + chain[0][i];
            break;
        }
        case task::aggregate: {
            const std::string target = letters(5, keys);
            p.lines.assign(6, "%" + target);
            for (int i = 0; i < 8; ++i) {
                const std::string w = "%" + letters(5, keys);
                p.lines.insert(p.lines.end(), 1 + below(2), w);
            }
            shuffle(p.lines);
            p.question = "?%=";
            p.answer = target;
            break;
        }
        }
        return p;
    }

    std::string text_;
    std::mt19937_64 rng_;
};

} // namespace ruler
