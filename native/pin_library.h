// Keeps the addon that includes this mapped for the life of the process.
#pragma once

#include <dlfcn.h>

namespace vfio {

// Node unloads an addon with the last environment that loaded it (a worker
// thread exiting), but our data threads are detached and may still be
// finishing a job, and devices the mock addon made may still be owned by
// the production addon's threads: code unmapped under them is a segfault in
// the host. So each addon takes one reference to itself that it never
// releases (one per environment that loads it: harmless, it stays loaded
// anyway). `anchor` is any function of the calling library. Internal
// linkage: each addon must run its own copy, not resolve to the other's.
static inline void PinThisLibrary(const void* anchor) {
  Dl_info self{};
  if (dladdr(anchor, &self) && self.dli_fname) dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

}  // namespace vfio
