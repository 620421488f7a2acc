// libFuzzer target: the example engine's llama2.c checkpoint loader.
//
// transformer::load reads a path (it checks the file's size before reading
// the weights), so each input is written to a scratch file first. Property:
// load() throws std::runtime_error (not the stream library's
// std::ios_base::failure) or returns a model whose shape describes itself.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <ios>
#include <stdexcept>
#include <string>

#include "engine/model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const std::string path = "/tmp/kvc_fuzz_model_" + std::to_string(::getpid()) + ".bin";
    kvc::detail::write_file(path, data, size, "fuzz_model");
    try {
        const engine::transformer model = engine::transformer::load(path);
        if (engine::transformer::describe(model.shape()).empty()) __builtin_trap();
    } catch (const std::ios_base::failure&) {
        __builtin_trap(); // the loader let a stream exception through
    } catch (const std::runtime_error&) {
    }
    return 0;
}
