# Finds xsimd 8 for kvc and its consumers.
#
# Debian 12's xsimd 8.1 exports INTERFACE_LINK_LIBRARIES "xtl" although kvc
# (and xsimd's own headers, without XSIMD_ENABLE_XTL_COMPLEX) need nothing
# from xtl. When no xtl target exists, an empty one stands in for it so the
# link line does not ask for a -lxtl that is not installed.
find_package(xsimd 8 REQUIRED)
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
