// kvc/registry.hpp -- every method by name, and caches built from a spec.
//
//   for (const kvc::method_info& m : kvc::methods()) std::cout << m.name << '\t' << m.summary << '\n';
//   kvc::dynamic_cache cache = kvc::make_cache(config, "kivi:2 + snapkv:0.25");
//
// A spec names at most one method per family, joined by '+': a codec
// (quantization), an eviction policy, a merging policy and a projection, in
// any order, each `name` or `name:value`. What the value means is the method's parameter
// (method_info::parameter: "keep_ratio" for the scorers, the bits of KIVI, the
// pruned share of ThinK); a method whose parameter has a default may be
// written without it. Codecs are spelled as docs/METHODS.md and the tools
// spell them ("none:f16", "q4_0", "int8:g64", "q4_0+sinks", ...).
// Without a codec the rows are kept as they are, in config.storage.
//
// A bad spec throws kvc::error naming the bad term, the form expected and the
// closest names. Methods learnt from the model (cq, kvquant, qfilter,
// head_roles: method_info::calibrated) take their calibration artifact from
// cache_options::artifacts, under the method's name.
//
// The registry is compiled once, in kvc's library (src/registry.cpp): every
// codec's store and every scorer is instantiated there once, and a program
// that includes this header pays for none of them.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "kvc/cache/dynamic_cache.hpp"
#include "kvc/calibration/artifact.hpp"
#include "kvc/kernels/rope.hpp"

namespace kvc {

enum class method_family { quantization, eviction, merging, projection };

// The family's name as the docs write it ("quantization", ...).
const char* name_of(method_family family) noexcept;

struct method_info {
    std::string name;          // as a spec writes it before ':' ("snapkv", "kivi", "none:f16")
    method_family family;
    std::string id;            // docs/METHODS.md ("E5", "Q2", "B3"); empty for the identities
    std::string parameter;     // what follows "name:" ("keep_ratio"); empty: none
    std::string default_value; // the value when the spec gives none; empty: the spec must give one
    std::string summary;       // one line
    bool calibrated = false;   // needs cache_options::artifacts[name]
};

// Every method, family by family, in docs/METHODS.md's order.
const std::vector<method_info>& methods();

// What a spec does not say.
struct cache_options {
    // Calibration artifacts by method name: "cq", "kvquant", "qfilter",
    // "head_roles" (calibration/*.hpp make them; calibration::load reads them).
    std::map<std::string, calibration::artifact> artifacts;
    // The model's RoPE, for KVQuant (it rotates keys given before RoPE).
    rope_config rope{};
    // B9: eviction during decode, whenever a head is this many tokens over its
    // budget (0: only after the prompt and on compress()).
    std::size_t evict_every = 0;
};

// One parsed term of a spec: the method and the value given (or its default).
struct spec_term {
    const method_info* method = nullptr;
    std::string value;
};
// The terms of a spec, checked: known names, at most one per family, values
// present where required. Throws kvc::error otherwise.
std::vector<spec_term> parse_spec(std::string_view spec);

// The cache a spec describes, for the model shape `config`.
dynamic_cache make_cache(const cache_config& config, std::string_view spec, const cache_options& options = {});

// The same spec as a struct: each family's method as a spec writes it
// ("kivi:2", "snapkv:0.25"), empty for none. A field naming a method of
// another family throws kvc::error naming the field and the method's family.
//   kvc::cache_spec spec;
//   spec.quantization = "kivi:2";
//   spec.eviction = "snapkv:0.25";
//   kvc::dynamic_cache cache = kvc::make_cache(config, spec);
struct cache_spec {
    std::string quantization, eviction, merging, projection;
};
dynamic_cache make_cache(const cache_config& config, const cache_spec& spec, const cache_options& options = {});

} // namespace kvc
