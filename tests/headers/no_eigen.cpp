// <kvc/kvc.hpp> is the header an engine includes; it must not pull in Eigen,
// which costs seconds and hundreds of MB of compiler memory per translation
// unit (issue 18). The control build (KVC_EXPECT_EIGEN, with <kvc/all.hpp>)
// must see Eigen, so that a changed macro name or a missing include path
// cannot make the check pass without checking anything.
#ifdef KVC_EXPECT_EIGEN
#include <kvc/all.hpp>
#ifndef EIGEN_WORLD_VERSION
#error "control: <kvc/all.hpp> should include Eigen (EIGEN_WORLD_VERSION undefined): the check below proves nothing"
#endif
#else
#include <kvc/kvc.hpp>
#ifdef EIGEN_WORLD_VERSION
#error "<kvc/kvc.hpp> includes Eigen; move the header that needs it to <kvc/all.hpp>"
#endif
#endif

int main() { return 0; }
