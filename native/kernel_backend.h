// The kernel backend: a real VFIO device fd, opened through the iommufd cdev
// path or the legacy group/container path. Linux only.
#pragma once

#include <string>

#include "backend.h"

namespace vfio {

struct KernelOpenOptions {
  std::string path;  // /dev/vfio/devices/vfioN, a sysfs device path, or a device name
  std::string via;   // "cdev", "group" or "auto"
};

// Opens the device; on failure returns nullptr and sets *err (errno) and
// *what (the step that failed, e.g. "VFIO_DEVICE_BIND_IOMMUFD").
DeviceBackend* OpenKernelDevice(const KernelOpenOptions& opts, int* err, std::string* what);

}  // namespace vfio
