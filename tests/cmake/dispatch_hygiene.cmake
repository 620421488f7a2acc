# Dispatch hygiene: the instruction-set units of libkvc_dispatch.a export no
# symbol the linker could merge with a copy compiled under other flags.
#
# Why (docs/ARCHITECTURE.md, "Kernels and dispatch"): src/dispatch/avx2.cpp and avx512.cpp
# are compiled with -mavx2/-mavx512*. Any inline or template function they emit
# as a weak (COMDAT) symbol is deduplicated at link time with same-named copies
# from every other object of the program; if the linker keeps the AVX-512 copy
# of, say, an xsimd constant helper or std::numeric_limits<float>::infinity(),
# code running on a CPU without AVX-512 calls it and dies with SIGILL. The only
# weak symbols such a unit may define are those whose name carries its own
# xsimd Arch type (no other unit can define the same symbol under other flags)
# and the exception-personality reference every C++ object has.
#
# Usage: cmake -DARCHIVE=<libkvc_dispatch.a> -DNM=<nm> -P dispatch_hygiene.cmake
cmake_minimum_required(VERSION 3.20)

foreach(var ARCHIVE NM)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "dispatch_hygiene: expected -D${var}=...")
  endif()
endforeach()
if(NOT EXISTS "${ARCHIVE}")
  message(FATAL_ERROR "dispatch_hygiene: archive ${ARCHIVE} does not exist; build kvc_dispatch first")
endif()

# Unit object (file name) -> the xsimd Arch type its kernels are instantiated on.
set(units avx2.cpp.o avx512.cpp.o)
set(arch_of_avx2.cpp.o "xsimd::fma3<xsimd::avx2>")
set(arch_of_avx512.cpp.o "xsimd::avx512bw")
list(JOIN units ", " unit_names)
set(always_allowed "DW.ref.__gxx_personality_v0")

execute_process(COMMAND "${NM}" -C --defined-only "${ARCHIVE}"
                OUTPUT_VARIABLE listing ERROR_VARIABLE nm_errors RESULT_VARIABLE nm_result)
if(NOT nm_result EQUAL 0)
  message(FATAL_ERROR "dispatch_hygiene: '${NM} -C --defined-only ${ARCHIVE}' failed (${nm_result}): ${nm_errors}")
endif()

# CMake lists split on ';' and treat '[' ']' specially; demangled names may
# contain all three (arrays, lambdas), so mask them before splitting lines.
string(REPLACE ";" "<semicolon>" listing "${listing}")
string(REPLACE "[" "<lbracket>" listing "${listing}")
string(REPLACE "]" "<rbracket>" listing "${listing}")
string(REPLACE "\n" ";" lines "${listing}")

set(member "")
set(seen_units "")
set(violations "")
foreach(line IN LISTS lines)
  if(line MATCHES "^(.+):$")
    get_filename_component(member "${CMAKE_MATCH_1}" NAME)
    if(member IN_LIST units)
      list(APPEND seen_units ${member})
      set(symbols_in_${member} 0)
    endif()
    continue()
  endif()
  if(NOT member IN_LIST units)
    continue()
  endif()
  # "<address> <type> <name>"; weak (W/w), weak object (V/v), unique global (u).
  if(NOT line MATCHES "^[0-9a-fA-F]* *([A-Za-z?-]) (.+)$")
    continue()
  endif()
  set(type "${CMAKE_MATCH_1}")
  set(name "${CMAKE_MATCH_2}")
  math(EXPR symbols_in_${member} "${symbols_in_${member}} + 1")
  if(NOT type MATCHES "^[WwVvu]$")
    continue()
  endif()
  if(name IN_LIST always_allowed)
    continue()
  endif()
  string(FIND "${name}" "${arch_of_${member}}" own_arch)
  if(own_arch GREATER_EQUAL 0)
    continue()
  endif()
  # Constructors and destructors (C1/C2, D1/D2) demangle alike: count each name once.
  list(APPEND violations "${member}: ${type} ${name}")
endforeach()
list(REMOVE_DUPLICATES violations)
list(LENGTH violations violation_count)

foreach(unit IN LISTS units)
  if(NOT unit IN_LIST seen_units)
    message(FATAL_ERROR "dispatch_hygiene: ${ARCHIVE} has no member ${unit}; expected the units ${unit_names} "
                        "(was src/dispatch renamed? update this test)")
  endif()
  if(symbols_in_${unit} EQUAL 0)
    message(FATAL_ERROR "dispatch_hygiene: ${unit} defines no symbols; expected at least its dispatch table")
  endif()
  message(STATUS "${unit}: ${symbols_in_${unit}} defined symbols checked against ${arch_of_${unit}}")
endforeach()

if(violation_count GREATER 0)
  list(JOIN violations "\n  " report)
  string(REPLACE "<semicolon>" ";" report "${report}")
  string(REPLACE "<lbracket>" "[" report "${report}")
  string(REPLACE "<rbracket>" "]" report "${report}")
  message(FATAL_ERROR
    "dispatch_hygiene: ${violation_count} weak symbol(s) in instruction-set units do not carry the unit's own "
    "xsimd Arch type, so the linker may merge them with copies compiled for another instruction set "
    "(docs/ARCHITECTURE.md, Kernels and dispatch):\n  ${report}\n"
    "Expected only symbols naming the unit's Arch and ${always_allowed}.")
endif()
message(STATUS "dispatch_hygiene: no mergeable foreign symbols in ${unit_names}")
