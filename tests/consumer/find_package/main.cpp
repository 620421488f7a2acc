// Built against an installed kvc (find_package), linked to kvc::kvc.
#include "../consumer_checks.hpp"

#if !defined(KVC_USE_DISPATCH_LIBRARY)
#error "kvc::kvc should define KVC_USE_DISPATCH_LIBRARY for its consumers"
#endif

int main() { return consumer::run_all("find_package"); }
