# Configures, builds and runs one consumer project from scratch, the way a
# user of kvc would: cmake -S/-B, cmake --build, run the program. Any failing
# step fails the test with its output shown.
#
# cmake -DSOURCE_DIR=... -DBINARY_DIR=... -DGENERATOR=... [-DMAKE_PROGRAM=...]
#       -DCXX_COMPILER=... [-DBUILD_TYPE=...] [-DCXX_STANDARD=...] [-DCXX_FLAGS=...]
#       [-DPREFIX_PATH=...] [-DKVC_SOURCE_DIR=...] [-DKVC_SANITIZE=...] -P run_consumer.cmake
cmake_minimum_required(VERSION 3.20)

foreach(var SOURCE_DIR BINARY_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer: expected -D${var}=...")
  endif()
endforeach()

set(configure_args -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
                   "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(BUILD_TYPE)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}")
endif()
if(CXX_STANDARD)
  list(APPEND configure_args "-DCMAKE_CXX_STANDARD=${CXX_STANDARD}")
endif()
if(CXX_FLAGS)
  list(APPEND configure_args "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${CXX_FLAGS}")
endif()
if(PREFIX_PATH)
  # Only the prefix under test: a kvc installed elsewhere on the machine must not be found.
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}" "-DKVC_EXPECTED_PREFIX=${PREFIX_PATH}")
endif()
if(KVC_SOURCE_DIR)
  list(APPEND configure_args "-DKVC_SOURCE_DIR=${KVC_SOURCE_DIR}")
endif()
if(KVC_SANITIZE)
  list(APPEND configure_args "-DKVC_SANITIZE=${KVC_SANITIZE}")
endif()

file(REMOVE_RECURSE "${BINARY_DIR}")
message(STATUS "run_consumer: configuring ${SOURCE_DIR}")
execute_process(COMMAND "${CMAKE_COMMAND}" ${configure_args} COMMAND_ERROR_IS_FATAL ANY)
message(STATUS "run_consumer: building")
set(build_args "")
if(BUILD_TYPE)
  set(build_args --config "${BUILD_TYPE}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}" --parallel 2 ${build_args}
                COMMAND_ERROR_IS_FATAL ANY)
set(program "${BINARY_DIR}/consumer")
if(NOT EXISTS "${program}" AND BUILD_TYPE)
  set(program "${BINARY_DIR}/${BUILD_TYPE}/consumer") # multi-config generators
endif()
message(STATUS "run_consumer: running ${program}")
execute_process(COMMAND "${program}" COMMAND_ERROR_IS_FATAL ANY)
