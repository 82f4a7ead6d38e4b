// One interface for every device backend: the kernel (real VFIO device fds)
// and the mock device (mock-device/). Everything above it, the addon's worker
// threads, the data streams and the TypeScript API, is backend-agnostic.
//
// Every method may block (ioctls on real drivers take milliseconds to seconds)
// and is only ever called from the device's worker threads, never from the JS
// main thread. Methods return 0 or a positive errno, like the kernel does.
#pragma once

#include <sys/types.h>

#include <cerrno>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vfio {

struct DmaRange {
  uint64_t iova;
  uint64_t length;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  // "kernel" or "mock".
  virtual const char* Kind() const = 0;
  // How the device was opened: "cdev", "group" or "mock".
  virtual const char* OpenPath() const = 0;

  // VFIO_DEVICE_FEATURE(MIGRATION): the migration flags. ENOTTY when the
  // device does not support migration.
  virtual int GetMigrationFlags(uint64_t* flags) = 0;
  // VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE) GET.
  virtual int GetState(uint32_t* state) = 0;
  // VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE) SET. A state that opens a data
  // session stores its new fd in *data_fd, otherwise -1. The caller owns it.
  virtual int SetState(uint32_t state, int* data_fd) = 0;
  // VFIO_MIG_GET_PRECOPY_INFO on a data fd.
  virtual int GetPrecopyInfo(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes) = 0;
  // VFIO_DEVICE_FEATURE(SET MIG_PRECOPY_INFOv2), no data: opts this device fd
  // in to vfio_precopy_info.flags. ENOTTY or EINVAL where the kernel or the
  // driver lacks it (a backend that does not override it never has it).
  virtual int EnablePrecopyInfoV2() { return ENOTTY; }
  // VFIO_MIG_GET_PRECOPY_INFO with the output flags: *reinit is true only
  // after a successful EnablePrecopyInfoV2() and a REINIT from the device.
  virtual int GetPrecopyInfoV2(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes, bool* reinit) {
    *reinit = false;
    return GetPrecopyInfo(data_fd, initial_bytes, dirty_bytes);
  }
  // VFIO_DEVICE_FEATURE(MIG_DATA_SIZE).
  virtual int GetStopCopySize(uint64_t* stop_copy_bytes) = 0;
  // VFIO_DEVICE_RESET.
  virtual int Reset() = 0;
  // DMA dirty logging; ENOTTY where the device lacks it.
  virtual int DmaLoggingStart(uint64_t page_size, const std::vector<DmaRange>& ranges) = 0;
  virtual int DmaLoggingStop() = 0;
  virtual int DmaLoggingReport(uint64_t iova, uint64_t length, uint64_t page_size,
                               std::vector<uint64_t>* bitmap) = 0;

  // read(2)/write(2) on a data fd: bytes moved, or -errno. Reads follow the
  // uAPI: -ENOMSG at the temporary end of a PRE_COPY stream, 0 at the end of
  // a STOP_COPY stream.
  virtual ssize_t ReadData(int data_fd, void* buf, size_t len) = 0;
  virtual ssize_t WriteData(int data_fd, const void* buf, size_t len) = 0;
  // close(2) on a data fd that this device returned.
  virtual void CloseDataFd(int data_fd) = 0;

  // Releases the device (and, for the kernel, the iommufd / group / container).
  virtual void Close() = 0;

  // Any thread, never blocks: wakes calls sleeping in the device (a mock's
  // arc latency, load time or rate cap; they fail with ECANCELED) and makes
  // later ones not sleep, so that close() never waits on them. A kernel
  // ioctl cannot be interrupted: a no-op there.
  virtual void Interrupt() {}
};

// A backend built by another addon and opened by this one: the mock device
// lives in its own addon (mock-device/mock_addon.cc), so the production
// addon carries no mock code, and hands NativeDevice.openBackend() a
// "carrier": a JS object type-tagged with kBackendCarrierTag whose
// read-only `factory` property is an External holding a
// std::shared_ptr<BackendFactory>*. Both addons are built from this header
// together; the tag's version changes whenever this interface does, so a
// carrier from another build is refused instead of misread.
class BackendFactory {
 public:
  virtual ~BackendFactory() = default;
  // On the device's control thread: the backend, or null with *err (an
  // errno) and *op set. Called at most once per factory.
  virtual std::shared_ptr<DeviceBackend> Make(int* err, std::string* op) = 0;
};
constexpr uint64_t kBackendCarrierTagLower = 0x7666696f2d6d6967ull;  // "vfio-mig"
constexpr uint64_t kBackendCarrierTagUpper = 0x6261636b656e6401ull;  // "backend" + interface version 1

}  // namespace vfio
