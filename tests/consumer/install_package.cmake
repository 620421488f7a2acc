# ctest fixture: installs the kvc build under test into a fresh prefix and
# checks that the package has what find_package(kvc) consumers need.
#
# cmake -DBUILD_DIR=<kvc build> -DPREFIX=<prefix> -DLIBDIR=<lib dir name>
#       -DARCHIVE_NAME=<libkvc_dispatch.a> [-DCONFIG=<config>] -P install_package.cmake
cmake_minimum_required(VERSION 3.20)

foreach(var BUILD_DIR PREFIX LIBDIR ARCHIVE_NAME)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "install_package: expected -D${var}=...")
  endif()
endforeach()

# A fresh prefix each time: files left over from an earlier install must not
# hide a file the install rules stopped providing.
file(REMOVE_RECURSE "${PREFIX}")
set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
                COMMAND_ERROR_IS_FATAL ANY)

set(package_dir "${PREFIX}/${LIBDIR}/cmake/kvc")
set(expected
  "${PREFIX}/include/kvc/kvc.hpp"
  "${PREFIX}/include/kvc/all.hpp"
  "${PREFIX}/include/kvc/kernels/dispatch.hpp"
  "${PREFIX}/include/kvc/kernels/simd/kernels.hpp"
  "${PREFIX}/${LIBDIR}/${ARCHIVE_NAME}"
  "${package_dir}/kvcConfig.cmake"
  "${package_dir}/kvcConfigVersion.cmake"
  "${package_dir}/kvcTargets.cmake")
set(missing "")
foreach(file IN LISTS expected)
  if(NOT EXISTS "${file}")
    list(APPEND missing "${file}")
  endif()
endforeach()
if(missing)
  list(JOIN missing "\n  " missing)
  message(FATAL_ERROR "install_package: the install lacks:\n  ${missing}")
endif()

# Both targets exported, and their include directory is the installed
# include/ (an empty CMAKE_INSTALL_INCLUDEDIR at target definition leaves the
# prefix itself, and consumers find no <kvc/...> headers).
file(READ "${package_dir}/kvcTargets.cmake" targets)
foreach(target kvc::kvc kvc::kvc-header-only)
  string(FIND "${targets}" "add_library(${target} " found)
  if(found LESS 0)
    message(FATAL_ERROR "install_package: kvcTargets.cmake does not define ${target}")
  endif()
endforeach()
if(NOT targets MATCHES "INTERFACE_INCLUDE_DIRECTORIES \"\\\${_IMPORT_PREFIX}/include\"")
  string(REGEX MATCH "INTERFACE_INCLUDE_DIRECTORIES [^\n]*" got "${targets}")
  if(NOT got)
    set(got "no INTERFACE_INCLUDE_DIRECTORIES at all")
  endif()
  message(FATAL_ERROR "install_package: expected kvc::kvc-header-only's include directory to be "
                      "\${_IMPORT_PREFIX}/include, got: ${got}")
endif()
message(STATUS "install_package: kvc installed and checked in ${PREFIX}")
