// The "mtty" driver personality of the mock device; line references are to
// samples/vfio-mdev/mtty.c in Linux 6.12 (see mtty_mock.h and
// scripts/kernel-lab/mtty-facts.md).
#include "mtty_mock.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "../native/uapi.h"

namespace vfio {

using namespace vfio_uapi;

namespace {

constexpr uint64_t kMttyMagic = 0x7e9d09898c3e2c4eull;  // mtty.c:131
constexpr uint32_t kMajor = 1, kMinor = 0;
constexpr size_t kMaxFifo = 16;
// struct serial_port offsets (x86-64, mtty.c:118-126).
constexpr size_t kFifoAt = 8, kHeadAt = 24, kTailAt = 25, kMaxFifoAt = 33;
constexpr uint32_t kLogMaxRanges = 256;  // LOG_MAX_RANGES, vfio_main.c

inline uint64_t Mix(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint32_t Le32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

}  // namespace

MttyMockDevice::MttyMockDevice(uint32_t ports, uint64_t seed)
    : ports_(ports == 1 ? 1 : 2), seed_(seed), state_(kStateRunning) {
  // mtty_init_dev: the state is zeroed (vfio_alloc_device) and each port's
  // max_fifo_size is MAX_FIFO_SIZE (mtty.c:1331-1332).
  port_state_.assign(kPortBytes * ports_, 0);
  for (uint32_t i = 0; i < ports_; i++) {
    uint8_t* p = &port_state_[i * kPortBytes];
    p[kMaxFifoAt] = kMaxFifo;
    if (seed != 0) {
      // A port that has seen loopback traffic: old bytes left in its FIFO,
      // head == tail (empty), as the UART emulation leaves them.
      uint64_t r = Mix(seed ^ (0x6d747479ull + i));
      for (size_t b = 0; b < kMaxFifo; b++) {
        if (b % 8 == 0) r = Mix(r);
        p[kFifoAt + b] = uint8_t(r >> (8 * (b % 8)));
      }
      p[kHeadAt] = p[kTailAt] = uint8_t(r % kMaxFifo);
    }
  }
  info_.seed = seed;
}

MttyMockDevice::~MttyMockDevice() { Close(); }

std::string MttyMockDevice::DigestLocked(const uint8_t* ports) const {
  uint64_t h = 0xcbf29ce484222325ull ^ ports_;
  for (size_t i = 0; i < kPortBytes * ports_; i++) h = (h ^ ports[i]) * 0x100000001b3ull;
  char b[17];
  snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(Mix(h)));
  return b;
}

int MttyMockDevice::GetMigrationFlags(uint64_t* flags) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  *flags = kMigrationStopCopy | kMigrationP2P | kMigrationPreCopy;  // mtty.c:1347-1349
  return 0;
}

int MttyMockDevice::GetState(uint32_t* state) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  *state = state_;
  return 0;
}

void MttyMockDevice::Disable(File& f) {  // mtty_disable_file, mtty.c:783-790
  f.disabled = true;
  f.filled = 0;
  f.pos = 0;
}

void MttyMockDevice::DisableFilesLocked() {  // mtty_disable_files, mtty.c:792-805
  if (saving_) Disable(*saving_);
  if (resuming_) Disable(*resuming_);
  saving_.reset();
  resuming_.reset();
}

int MttyMockDevice::NewFileLocked(bool save, std::shared_ptr<File>* out) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return errno;
  auto f = std::make_shared<File>();
  f->save = save;
  f->user_fd = save ? fds[0] : fds[1];
  f->dev_fd = save ? fds[1] : fds[0];
  files_[f->user_fd] = f;
  *out = f;
  return 0;
}

// mtty_step_state, mtty.c:1113-1222.
int MttyMockDevice::StepLocked(uint32_t next, int* data_fd) {
  uint32_t cur = state_;
  auto is = [&](uint32_t a, uint32_t b) { return cur == a && next == b; };
  if (is(kStateRunning, kStateRunningP2P) || is(kStateRunningP2P, kStateRunning) ||
      is(kStateRunningP2P, kStateStop) || is(kStatePreCopy, kStatePreCopyP2P) ||
      is(kStatePreCopyP2P, kStatePreCopy) || is(kStateStop, kStateRunningP2P))
    return 0;
  if (is(kStateResuming, kStateStop)) {
    // mtty_load_state: only the size is checked (the header was checked at write time).
    if (!resuming_ || resuming_->filled < DataSize()) return EINVAL;
    memcpy(port_state_.data(), resuming_->data + kHeaderBytes, kPortBytes * ports_);
    info_.loaded_digest = DigestLocked(port_state_.data());
    DisableFilesLocked();
    return 0;
  }
  if (is(kStatePreCopy, kStateRunning) || is(kStatePreCopyP2P, kStateRunningP2P) || is(kStateStopCopy, kStateStop)) {
    DisableFilesLocked();
    return 0;
  }
  if (is(kStateRunning, kStatePreCopy) || is(kStateRunningP2P, kStatePreCopyP2P) || is(kStateStop, kStateStopCopy) ||
      is(kStatePreCopyP2P, kStateStopCopy)) {
    // mtty_save_device_data, mtty.c:971-1018: an existing saving file is
    // reused (no new fd) and only gets the ports appended for STOP_COPY.
    bool fresh = !saving_;
    if (fresh) {
      std::shared_ptr<File> f;
      if (int err = NewFileLocked(true, &f)) return err;
      uint8_t* d = f->data;
      memcpy(d, &kMttyMagic, 8);
      memcpy(d + 8, &kMajor, 4);
      memcpy(d + 12, &kMinor, 4);
      memcpy(d + 16, &ports_, 4);
      f->filled = kHeaderBytes;
      saving_ = f;
    }
    if (next == kStateStopCopy) {  // mtty_save_state, mtty.c:932-946
      memcpy(saving_->data + kHeaderBytes, port_state_.data(), kPortBytes * ports_);
      saving_->filled += kPortBytes * ports_;
      info_.saved_digest = DigestLocked(port_state_.data());
    }
    if (fresh) *data_fd = saving_->user_fd;
    return 0;
  }
  if (is(kStateStop, kStateResuming)) {
    std::shared_ptr<File> f;
    if (int err = NewFileLocked(false, &f)) return err;
    resuming_ = f;
    *data_fd = f->user_fd;
    return 0;
  }
  return EINVAL;  // the WARN_ON path; the core never asks for another arc
}

// mtty_set_state, mtty.c:1224-1257: a failing step leaves the device in the
// last state it reached; nothing ever sets ERROR.
int MttyMockDevice::SetState(uint32_t target, int* data_fd) {
  *data_fd = -1;
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  const uint64_t flags = kMigrationStopCopy | kMigrationP2P | kMigrationPreCopy;
  while (state_ != target) {
    uint32_t next;
    if (NextState(state_, target, flags, &next) != 0) return EINVAL;
    int fd = -1;
    if (int err = StepLocked(next, &fd)) return err;
    state_ = next;
    info_.arcs_taken++;
    if (fd >= 0) *data_fd = fd;
  }
  return 0;
}

std::shared_ptr<MttyMockDevice::File> MttyMockDevice::FileOf(int fd) {
  auto it = files_.find(fd);
  return it == files_.end() ? nullptr : it->second;
}

// mtty_precopy_ioctl, mtty.c:833-882; a resuming file has no ioctl (ENOTTY).
int MttyMockDevice::GetPrecopyInfo(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  auto f = FileOf(data_fd);
  if (!f) return EBADF;
  if (!f->save) return ENOTTY;
  if (state_ != kStatePreCopy && state_ != kStatePreCopyP2P) return EINVAL;
  if (f->disabled) return ENODEV;
  if (f->pos > f->filled) return EINVAL;
  *initial_bytes = f->filled - f->pos;
  *dirty_bytes = 0;
  return 0;
}

int MttyMockDevice::GetStopCopySize(uint64_t* bytes) {  // mtty.c:1271-1279
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  *bytes = DataSize();
  return 0;
}

int MttyMockDevice::Reset() {  // mtty_reset + mtty_state_mutex_unlock, mtty.c:807-820,1401-1413
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  state_ = kStateRunning;
  DisableFilesLocked();
  return 0;  // the ports are untouched
}

// The core's checks (vfio_ioctl_device_feature_logging_*); mtty's log ops
// are no-ops (mtty.c:1287-1309).
int MttyMockDevice::DmaLoggingStart(uint64_t page_size, const std::vector<DmaRange>& ranges) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  if (ranges.empty()) return EINVAL;
  if (ranges.size() > kLogMaxRanges) return E2BIG;
  std::vector<std::pair<uint64_t, uint64_t>> seen;
  for (auto& r : ranges) {
    if ((r.iova & (page_size - 1)) || (r.length & (page_size - 1))) return EINVAL;
    uint64_t end;
    if (__builtin_add_overflow(r.iova, r.length, &end)) return EOVERFLOW;
    uint64_t last = r.iova + r.length - 1;
    for (auto& s : seen)
      if (r.iova <= s.second && s.first <= last) return EINVAL;
    seen.push_back({r.iova, last});
  }
  return 0;
}

int MttyMockDevice::DmaLoggingStop() {
  std::lock_guard<std::mutex> l(mu_);
  return closed_ ? EBADF : 0;
}

int MttyMockDevice::DmaLoggingReport(uint64_t iova, uint64_t length, uint64_t page_size,
                                     std::vector<uint64_t>* bitmap) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  if (page_size < 4096 || (page_size & (page_size - 1))) return EINVAL;
  uint64_t end;
  if (__builtin_add_overflow(iova, length, &end)) return EOVERFLOW;
  // The core then walks the user bitmap with iova_bitmap_alloc(), which is a
  // stub returning -EOPNOTSUPP in kernels built without CONFIG_IOMMUFD_DRIVER
  // (the lab's, like any kernel without an IOMMU driver that selects it).
  // With it, mtty's no-op read_and_clear would leave the bitmap all zero.
  (void)bitmap;
  return EOPNOTSUPP;
}

// mtty_save_read, mtty.c:884-922. The bytes go through the pipe the caller
// holds, so the data fd is a real fd.
ssize_t MttyMockDevice::ReadData(int data_fd, void* buf, size_t len) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return -EBADF;
  auto f = FileOf(data_fd);
  if (!f || !f->save) return -EBADF;  // a resuming file is O_WRONLY
  if (f->disabled) return -ENODEV;
  if (f->pos > f->filled) return -EINVAL;
  size_t n = std::min(len, f->filled - f->pos);
  if (n == 0) return 0;  // the end, in PRE_COPY as in STOP_COPY
  ssize_t w = write(f->dev_fd, f->data + f->pos, n);
  if (w < 0) return -errno;
  ssize_t r = read(data_fd, buf, size_t(w));
  if (r < 0) return -errno;
  f->pos += size_t(r);
  info_.bytes_read += uint64_t(r);
  return r;
}

// mtty_resume_write, mtty.c:1020-1078.
ssize_t MttyMockDevice::WriteData(int data_fd, const void* buf, size_t len) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return -EBADF;
  auto f = FileOf(data_fd);
  if (!f || f->save) return -EBADF;  // a saving file is O_RDONLY
  if (f->pos + len > DataSize()) return -ENOMEM;  // checked before "disabled"
  if (f->disabled) return -ENODEV;
  ssize_t w = write(data_fd, buf, len);
  if (w < 0) return -errno;
  ssize_t r = read(f->dev_fd, f->data + f->pos, size_t(w));
  if (r != w) return r < 0 ? -errno : -EIO;
  f->pos += len;
  info_.bytes_written += len;
  ssize_t ret = ssize_t(len);
  if (f->filled < kHeaderBytes && f->filled + len >= kHeaderBytes) {
    uint64_t magic;
    memcpy(&magic, f->data, 8);
    if (magic != kMttyMagic || Le32(f->data + 20) != 0 || Le32(f->data + 8) != kMajor ||
        Le32(f->data + 12) != kMinor || Le32(f->data + 16) != ports_)
      ret = -EFAULT;  // but the bytes are stored and counted
  }
  f->filled += len;
  return ret;
}

void MttyMockDevice::CloseDataFd(int data_fd) {
  std::lock_guard<std::mutex> l(mu_);
  auto f = FileOf(data_fd);
  if (!f) return;
  files_.erase(data_fd);
  close(f->user_fd);
  close(f->dev_fd);
  f->user_fd = f->dev_fd = -1;
  // The driver keeps its own reference to a current migration file, so the
  // file is released (and disabled) only when the driver drops it too.
  if (f != saving_ && f != resuming_) Disable(*f);
}

void MttyMockDevice::Close() {  // mtty_close, mtty.c:1935-1943: files disabled, state kept
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return;
  DisableFilesLocked();
  for (auto& kv : files_) {
    close(kv.second->user_fd);
    close(kv.second->dev_fd);
  }
  files_.clear();
  closed_ = true;
}

MockInfo MttyMockDevice::Info() {
  std::lock_guard<std::mutex> l(mu_);
  MockInfo i = info_;
  i.seed = seed_;
  i.digest = DigestLocked(port_state_.data());
  return i;
}

}  // namespace vfio
