# A policy in the wrong slot of compressed_cache must not compile, and the
# compiler's message must name the family the slot expects. Each case runs the
# compiler on tests/compile_fail/wrong_family.cpp; slot 4 is the control that
# must compile, so a broken include path cannot pass as "failed as expected".
# xsimd and the standard library come from the compiler's default include path (Debian packages).
set(kvc_compile_fail_flags -std=c++${CMAKE_CXX_STANDARD} -fsyntax-only -I${PROJECT_SOURCE_DIR}/include)
set(kvc_slot_family eviction merging quantization projection)
foreach(slot RANGE 0 3)
  list(GET kvc_slot_family ${slot} family)
  add_test(NAME compile_fail.wrong_family_${family}
           COMMAND ${CMAKE_CXX_COMPILER} ${kvc_compile_fail_flags} -DKVC_SLOT=${slot}
                   ${CMAKE_CURRENT_SOURCE_DIR}/compile_fail/wrong_family.cpp)
  set_tests_properties(compile_fail.wrong_family_${family} PROPERTIES
    PASS_REGULAR_EXPRESSION "must be an? ${family} policy" LABELS compile_fail)
endforeach()
add_test(NAME compile_fail.control_compiles
         COMMAND ${CMAKE_CXX_COMPILER} ${kvc_compile_fail_flags} -DKVC_SLOT=4
                 ${CMAKE_CURRENT_SOURCE_DIR}/compile_fail/wrong_family.cpp)
set_tests_properties(compile_fail.control_compiles PROPERTIES LABELS compile_fail)

# The protocols (storage/protocol.hpp, policy/*/protocol.hpp, token_columns.hpp):
# a policy or store missing a required member fails with a message naming
# the family and the member. Case 9 is the control that must compile.
set(kvc_protocol_messages
    "kvc head store protocol: missing `void keep"
    "protocol: missing `head_storage make_head"
    "kvc eviction scorer protocol: missing `void score"
    "kvc eviction scorer protocol: needs_attention_stats without `void observe"
    "kvc eviction selector protocol: missing"
    "this column is not declared by any policy of the cache"
    "kvc merging protocol: a policy with `merges = true` needs `template <class Layer> void fold"
    "this merging policy rewrites rows, and the codec's head store cannot re-encode a row"
    "kvc projection protocol: a policy with `projects = true` needs `template <class Layer> std::optional<S> project")
foreach(case RANGE 0 8)
  list(GET kvc_protocol_messages ${case} message)
  add_test(NAME compile_fail.protocol_${case}
           COMMAND ${CMAKE_CXX_COMPILER} ${kvc_compile_fail_flags} -DKVC_CASE=${case}
                   ${CMAKE_CURRENT_SOURCE_DIR}/compile_fail/protocol.cpp)
  set_tests_properties(compile_fail.protocol_${case} PROPERTIES PASS_REGULAR_EXPRESSION "${message}" LABELS compile_fail)
endforeach()
add_test(NAME compile_fail.protocol_control_compiles
         COMMAND ${CMAKE_CXX_COMPILER} ${kvc_compile_fail_flags} -DKVC_CASE=9 ${CMAKE_CURRENT_SOURCE_DIR}/compile_fail/protocol.cpp)
set_tests_properties(compile_fail.protocol_control_compiles PROPERTIES LABELS compile_fail)
