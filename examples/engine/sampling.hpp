// examples/engine/sampling.hpp -- choosing the next token from logits.
//
// Greedy (temperature 0) or sampling from softmax(logits / temperature) with
// a seeded generator. The uniform draw is built from the raw 64-bit output of
// std::mt19937_64 (whose sequence the standard fixes) rather than
// std::uniform_real_distribution (whose algorithm it does not), so a seed
// gives the same text with every standard library.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace engine {

// Index of the largest logit (the first one on ties).
inline std::size_t argmax(const float* logits, std::size_t n) noexcept {
    std::size_t best = 0;
    for (std::size_t i = 1; i < n; ++i)
        if (logits[i] > logits[best]) best = i;
    return best;
}

class sampler {
public:
    // temperature <= 0 means greedy.
    sampler(double temperature, std::uint64_t seed) : temperature_(temperature), generator_(seed) {}

    int next(const float* logits, std::size_t vocab) {
        if (temperature_ <= 0.0) return static_cast<int>(argmax(logits, vocab));
        probabilities_.resize(vocab);
        const double largest = logits[argmax(logits, vocab)];
        double total = 0.0;
        for (std::size_t i = 0; i < vocab; ++i) {
            probabilities_[i] = std::exp((logits[i] - largest) / temperature_);
            total += probabilities_[i];
        }
        // Uniform in [0, total): the top 53 bits of one draw, as a double.
        const double draw = static_cast<double>(generator_() >> 11) * 0x1.0p-53 * total;
        double cumulative = 0.0;
        std::size_t last_possible = 0;
        for (std::size_t i = 0; i < vocab; ++i) {
            cumulative += probabilities_[i];
            if (draw < cumulative) return static_cast<int>(i);
            if (probabilities_[i] > 0.0) last_possible = i;
        }
        return static_cast<int>(last_possible); // the draw fell past the sum's rounding
    }

private:
    double temperature_;
    std::mt19937_64 generator_;
    std::vector<double> probabilities_;
};

} // namespace engine
