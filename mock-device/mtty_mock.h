// The mock's "mtty" driver personality: behaves as the kernel's sample VFIO
// migration driver samples/vfio-mdev/mtty.c (Linux 6.12) does, byte for byte
// and errno for errno (see scripts/kernel-lab/mtty-facts.md). Selected by a
// profile with "driver": "mtty"; the generic MockDevice is not involved.
//
// What it copies from the real driver:
//  - flags STOP_COPY | P2P | PRE_COPY; initial state RUNNING; never ERROR;
//  - the stream: a 24-byte header (magic, version 1.0, nr_ports, flags 0)
//    and 36 bytes of `struct serial_port` per port (60 / 96 bytes); PRE_COPY
//    exposes only the header, STOP_COPY appends the ports to the same file;
//  - PRECOPY_INFO: initial = header bytes not yet read, dirty always 0;
//  - read() returns 0 at the end, in PRE_COPY too (never ENOMSG);
//  - MIG_DATA_SIZE is constant (24 + 36 x ports);
//  - resume: ENOMEM for a write past the stream size, EFAULT for a bad
//    header in the write that completes it (bytes still consumed), EINVAL at
//    RESUMING -> STOP for a short stream (device stays RESUMING, retry works);
//  - reset: back to RUNNING, every migration file disabled, ports kept;
//  - DMA logging: start/stop accepted after the core's checks (mtty's log
//    ops are no-ops); the report fails with EOPNOTSUPP, as in a kernel built
//    without CONFIG_IOMMUFD_DRIVER (the lab's; see docs/kernel-lab.md).
// Data fds are real pipes, as with the generic mock.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../native/backend.h"
#include "mock_device.h"

namespace vfio {

class MttyMockDevice : public DeviceBackend {
 public:
  static constexpr size_t kHeaderBytes = 24;
  static constexpr size_t kPortBytes = 36;

  // ports: 1 (mtty-1) or 2 (mtty-2). seed 0 gives a freshly created device
  // (ports as mtty_init_dev leaves them); another seed gives ports that have
  // seen traffic (seeded FIFO bytes), so digests tell devices apart.
  MttyMockDevice(uint32_t ports, uint64_t seed);
  ~MttyMockDevice() override;

  const char* Kind() const override { return "mock"; }
  const char* OpenPath() const override { return "mock"; }
  int GetMigrationFlags(uint64_t* flags) override;
  int GetState(uint32_t* state) override;
  int SetState(uint32_t state, int* data_fd) override;
  int GetPrecopyInfo(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes) override;
  int GetStopCopySize(uint64_t* stop_copy_bytes) override;
  int Reset() override;
  int DmaLoggingStart(uint64_t page_size, const std::vector<DmaRange>& ranges) override;
  int DmaLoggingStop() override;
  int DmaLoggingReport(uint64_t iova, uint64_t length, uint64_t page_size,
                       std::vector<uint64_t>* bitmap) override;
  ssize_t ReadData(int data_fd, void* buf, size_t len) override;
  ssize_t WriteData(int data_fd, const void* buf, size_t len) override;
  void CloseDataFd(int data_fd) override;
  void Close() override;

  // digest: the ports now; savedDigest: the ports a save stream captured
  // (STOP_COPY); loadedDigest: the ports the last successful resume loaded.
  MockInfo Info();

 private:
  // struct mtty_migration_file
  struct File {
    bool save = false;       // saving (O_RDONLY) or resuming (O_WRONLY) file
    bool disabled = false;
    int user_fd = -1;        // the caller's end of the pipe
    int dev_fd = -1;         // ours
    uint8_t data[kHeaderBytes + 2 * kPortBytes] = {};  // struct mtty_data
    size_t filled = 0;       // filled_size
    size_t pos = 0;          // f_pos
  };

  size_t DataSize() const { return kHeaderBytes + kPortBytes * ports_; }
  int StepLocked(uint32_t next, int* data_fd);
  int NewFileLocked(bool save, std::shared_ptr<File>* out);
  void DisableFilesLocked();
  static void Disable(File& f);
  std::shared_ptr<File> FileOf(int fd);
  std::string DigestLocked(const uint8_t* ports) const;

  uint32_t ports_;
  uint64_t seed_;
  std::mutex mu_;
  uint32_t state_;
  std::vector<uint8_t> port_state_;        // mdev_state->s[0..ports)
  std::shared_ptr<File> saving_, resuming_;
  std::map<int, std::shared_ptr<File>> files_;  // by user fd, until closed
  MockInfo info_{};
  bool closed_ = false;
};

}  // namespace vfio
