# One translation unit per instruction set, each compiled with exactly the
# flags of its instruction set and nothing else (docs/ARCHITECTURE.md, "Kernels and
# dispatch"). The units contain only xsimd and kernel templates instantiated
# for their own Arch, so no inline function compiled with wide-vector flags can
# be merged into code that runs on a CPU without them.
#
# The wide units are always optimised (-O2, whatever the build type): at -O0
# the compiler emits out-of-line, weak copies of trivial helpers from std and
# xsimd (numeric_limits<float>::infinity(), xsimd constants) compiled with
# AVX flags, and the linker could pick those for baseline code. Optimised, they
# are inlined; tests/cmake/dispatch_hygiene.cmake checks that no such symbol remains.
function(kvc_add_dispatch_sources target dir)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    target_sources(${target} PRIVATE ${dir}/sse2.cpp ${dir}/avx2.cpp ${dir}/avx512.cpp)
    set_source_files_properties(${dir}/avx2.cpp PROPERTIES COMPILE_OPTIONS "-O2;-mavx2;-mfma;-mf16c")
    set_source_files_properties(${dir}/avx512.cpp PROPERTIES COMPILE_OPTIONS
      "-O2;-mavx512f;-mavx512bw;-mavx512dq;-mavx512vl;-mavx2;-mfma;-mf16c")
  elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64|ARM64)$")
    target_sources(${target} PRIVATE ${dir}/neon.cpp)
  else()
    # No SIMD unit for this processor: the scalar reference serves alone.
    target_sources(${target} PRIVATE ${dir}/none.cpp)
  endif()
endfunction()
