// Built with kvc's source tree added as a subdirectory, linked to kvc::kvc.
#include "../consumer_checks.hpp"

#if !defined(KVC_USE_DISPATCH_LIBRARY)
#error "kvc::kvc should define KVC_USE_DISPATCH_LIBRARY for its consumers"
#endif

int main() { return consumer::run_all("add_subdirectory"); }
