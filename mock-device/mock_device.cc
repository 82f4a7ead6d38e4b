#include "mock_device.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "../native/uapi.h"

namespace vfio {

using namespace vfio_uapi;

namespace {

// Stream record header; every record of the mock's migration stream starts
// with one. `check` covers the header so a corrupted header is caught even
// before its payload is.
struct RecordHeader {
  uint32_t magic;
  uint16_t type;
  uint16_t reserved;
  uint32_t payload_len;
  uint32_t check;        // covers the header fields below and payload_crc
  uint64_t arg0;
  uint64_t arg1;
  uint32_t payload_crc;  // PayloadCheck of the payload: the destination validates every byte
  uint32_t reserved2;
};
static_assert(sizeof(RecordHeader) == 40, "RecordHeader");

constexpr uint32_t kRecordMagic = 0x4b434d56;  // "VMCK"
constexpr uint32_t kStreamVersion = 1;
enum RecordType : uint16_t {
  kRecHeader = 1,     // arg0 = seed, arg1 = profile hash; payload = HeaderPayload
  kRecSetup = 2,      // arg0 = offset; setup data
  kRecChunk = 3,      // arg0 = chunk index, arg1 = version; chunk content
  kRecInitialDone = 4,
  kRecStopOnly = 5,   // arg0 = offset; stop-copy-only state
  kRecEnd = 6,        // arg0 = chunk count, arg1 = digest of the content
  kRecReinit = 7,     // arg0 = offset, arg1 = total; new initial data after a REINIT
  kRecReinitDone = 8, // arg0 = total: the REINIT's initial data is complete (loads like kRecInitialDone)
};
struct HeaderPayload {
  uint64_t state_bytes;
  uint64_t setup_bytes;
  uint64_t stop_copy_only_bytes;
  uint32_t chunk_bytes;
  uint32_t version;
};
static_assert(sizeof(HeaderPayload) == 32, "HeaderPayload");
constexpr size_t kPipeBytes = 1 << 20;
// Most one read(2) or write(2) moves, as a driver's own buffering limits it.
constexpr size_t kMaxIoBytes = 4 << 20;

inline uint64_t Mix(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint32_t HeaderCheck(const RecordHeader& h) {
  uint64_t v = Mix(h.magic ^ (uint64_t(h.type) << 32) ^ (uint64_t(h.payload_len) << 48));
  v = Mix(v ^ h.arg0);
  v = Mix(v ^ h.arg1);
  v = Mix(v ^ h.payload_crc);
  return uint32_t(v);
}

// Checksum of a record's payload: two 64-bit lanes of word sums, cheap
// enough (it vectorises) that validation does not dominate the data path,
// and any changed byte changes it. Sums, so that a sender that knows its
// content can compute it without reading the bytes (below).
struct CheckSums {
  uint64_t a = 0, b = 0;
};
inline uint64_t LaneB(uint64_t w) { return w ^ (w >> 29); }
uint32_t FinishCheck(CheckSums s, size_t n) { return uint32_t(Mix((0x9e3779b97f4a7c15ull + s.a) ^ Mix(n + s.b))); }

// Sums over the bytes [at, at + n) of a payload whose word grid starts at `at`.
void AddTail(CheckSums& s, const uint8_t* p, size_t n, size_t at) {
  for (size_t i = 0; i < n; i++) s.a += uint64_t(p[i]) << (8 * ((at + i) % 8));
}

uint32_t PayloadCheck(const uint8_t* p, size_t n) {
  CheckSums s;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    s.a += w;
    s.b += LaneB(w);
  }
  AddTail(s, p + i, n - i, i);
  return FinishCheck(s, n);
}

// Deterministic content of a record's payload: what the device "holds".
// Windows into a fixed pseudo-random pool, chosen by the record's identity
// (seed, type, index, version): a memcpy from a pool that stays in cache, so
// the mock's content does not dominate a GB/s data path. Windows start on
// 8-byte boundaries, so the payload checksum comes from prefix sums over the
// pool's words instead of a second pass over the bytes (a driver knows its
// own data; the destination still checks every byte it receives).
// Integrity is checked with the payload checksum, and completeness with the
// digest of versions in the END record.
constexpr size_t kPoolBytes = 512 << 10;
constexpr size_t kWindowBytes = kPoolBytes / 2;  // longest window; a multiple of 8
struct ContentPool {
  std::vector<uint8_t> bytes;
  std::vector<CheckSums> prefix;  // prefix[k]: sums over the pool's first k words
  ContentPool() : bytes(kPoolBytes + 8), prefix(kPoolBytes / 8 + 1) {
    uint64_t s = 0x243f6a8885a308d3ull;
    for (size_t i = 0; i + 8 <= bytes.size(); i += 8) {
      s = Mix(s);
      memcpy(&bytes[i], &s, 8);
    }
    for (size_t k = 0; k < kPoolBytes / 8; k++) {
      uint64_t w;
      memcpy(&w, &bytes[k * 8], 8);
      prefix[k + 1].a = prefix[k].a + w;
      prefix[k + 1].b = prefix[k].b + LaneB(w);
    }
  }
};
const ContentPool& Pool() {
  static const ContentPool pool;
  return pool;
}

// Fills `out` with the payload's content and returns its PayloadCheck.
uint32_t FillPayload(uint8_t* out, size_t len, uint64_t seed, uint16_t type, uint64_t a0, uint64_t a1) {
  uint64_t key = Mix(seed ^ Mix(type ^ Mix(a0 ^ Mix(a1))));
  const ContentPool& pool = Pool();
  CheckSums sums;
  size_t at = 0;
  while (at < len) {
    size_t n = std::min(len - at, kWindowBytes);
    size_t from = (key % kWindowBytes) & ~size_t(7);
    memcpy(out + at, &pool.bytes[from], n);
    size_t words = n / 8;
    sums.a += pool.prefix[from / 8 + words].a - pool.prefix[from / 8].a;
    sums.b += pool.prefix[from / 8 + words].b - pool.prefix[from / 8].b;
    AddTail(sums, &pool.bytes[from + words * 8], n % 8, at + words * 8);
    key = Mix(key);
    at += n;
  }
  return FinishCheck(sums, len);
}

uint64_t Digest64(uint64_t seed, const std::vector<uint32_t>& versions) {
  uint64_t h = 0xcbf29ce484222325ull ^ Mix(seed);
  for (uint32_t v : versions) {
    h ^= v;
    h *= 0x100000001b3ull;
  }
  return Mix(h ^ versions.size());
}

std::string Hex(uint64_t v) {
  char b[17];
  snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace

MockDevice::MockDevice(MockProfile profile, uint64_t seed)
    : p_(std::move(profile)), seed_(seed), state_(kStateRunning), rng_(Mix(seed ^ 0x5eed)) {
  if (p_.chunk_bytes == 0) p_.chunk_bytes = 4096;
  chunk_count_ = uint32_t((p_.state_bytes + p_.chunk_bytes - 1) / p_.chunk_bytes);
  uint64_t ws = p_.dirty_working_set_bytes ? p_.dirty_working_set_bytes : p_.state_bytes;
  working_set_chunks_ = uint32_t(std::min<uint64_t>(chunk_count_, (ws + p_.chunk_bytes - 1) / p_.chunk_bytes));
  // The device starts with content of its own (a reset loses it).
  versions_.resize(chunk_count_);
  for (uint32_t i = 0; i < chunk_count_; i++) versions_[i] = uint32_t(Mix(seed ^ i) & 0xffff) + 1;
  dirty_.assign(chunk_count_, 0);
  last_tick_ = std::chrono::steady_clock::now();
  info_.seed = seed;
}

MockDevice::~MockDevice() { Close(); }

void MockDevice::Interrupt() {
  std::lock_guard<std::mutex> l(mu_);
  interrupted_ = true;
  wake_.notify_all();
}

bool MockDevice::SleepLocked(std::unique_lock<std::mutex>& lock, double ms) {
  if (!(ms > 0)) return !interrupted_;
  // Profiles bound every delay (kMockMaxDelayMs); the clamp keeps the
  // conversion defined whatever reaches here.
  auto d = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double, std::milli>(std::min(ms, 10 * kMockMaxDelayMs)));
  return !wake_.wait_for(lock, d, [&] { return interrupted_; });
}

bool MockDevice::RunningLocked() const {
  return state_ == kStateRunning || state_ == kStateRunningP2P || state_ == kStatePreCopy ||
         state_ == kStatePreCopyP2P;
}

void MockDevice::AdvanceLocked() {
  auto now = std::chrono::steady_clock::now();
  double dt = std::chrono::duration<double>(now - last_tick_).count();
  last_tick_ = now;
  // The profile's REINIT: once per save session, that long into PRE_COPY.
  Session& rs = session_;
  if (p_.reinit_after_precopy_ms >= 0 && rs.kind == SessionKind::kSave && rs.active && !rs.reinit_fired &&
      (state_ == kStatePreCopy || state_ == kStatePreCopyP2P) &&
      std::chrono::duration<double, std::milli>(now - rs.precopy_start).count() >= p_.reinit_after_precopy_ms) {
    rs.reinit_fired = true;
    rs.reinit_flag_owed = true;
  }
  if (!RunningLocked() || p_.dirty_bytes_per_sec <= 0 || working_set_chunks_ == 0) return;
  dirty_carry_ += p_.dirty_bytes_per_sec * dt / p_.chunk_bytes;
  // Past a few passes over the working set more dirtying changes nothing the
  // stream can see; the cap keeps a long idle gap from costing seconds here.
  double cap = 4.0 * working_set_chunks_;
  if (dirty_carry_ > cap) dirty_carry_ = cap;
  uint64_t n = uint64_t(dirty_carry_);
  dirty_carry_ -= double(n);
  bool tracking = session_.kind == SessionKind::kSave && session_.active;
  for (uint64_t i = 0; i < n; i++) {
    rng_ = Mix(rng_);
    uint32_t c = uint32_t(rng_ % working_set_chunks_);
    versions_[c]++;
    if (tracking && c < session_.next_first_pass_chunk && !dirty_[c]) {
      dirty_[c] = 1;
      dirty_count_++;
    }
  }
  info_.dirtied_chunks += n;
  dma_dirty_since_report_ += n;
}

uint64_t MockDevice::RecordBytes(uint64_t payload) const { return sizeof(RecordHeader) + payload; }

static uint64_t SplitRecordsBytes(uint64_t total, uint64_t piece) {
  if (total == 0) return 0;
  uint64_t records = (total + piece - 1) / piece;
  return records * sizeof(RecordHeader) + total;
}

uint64_t MockDevice::RemainingInitialLocked() const {
  const Session& s = session_;
  uint64_t b = 0;
  if (!s.header_sent) b += RecordBytes(sizeof(HeaderPayload));
  b += SplitRecordsBytes(p_.setup_bytes - s.setup_sent, p_.chunk_bytes);
  b += uint64_t(chunk_count_ - s.next_first_pass_chunk) * RecordBytes(p_.chunk_bytes);
  if (!s.initial_done_sent) b += RecordBytes(0);
  if (s.reinit_fired) {
    b += SplitRecordsBytes(p_.reinit_initial_bytes - s.reinit_sent, p_.chunk_bytes);
    if (!s.reinit_done_sent) b += RecordBytes(0);
  }
  return b;
}

uint64_t MockDevice::DirtyBytesLocked() const { return dirty_count_ * RecordBytes(p_.chunk_bytes); }

int MockDevice::GetMigrationFlags(uint64_t* flags) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  *flags = p_.flags;
  return 0;
}

int MockDevice::GetState(uint32_t* state) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  *state = state_;
  return 0;
}

int MockDevice::OpenSessionLocked(SessionKind kind, int* data_fd) {
  EndSessionLocked();
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return errno;
  fcntl(fds[0], F_SETPIPE_SZ, int(kPipeBytes));
  Session s;
  s.kind = kind;
  s.active = true;
  s.precopy_start = std::chrono::steady_clock::now();  // a save session opens on entering PRE_COPY(_P2P) or STOP_COPY
  s.rate_due = std::chrono::steady_clock::now();
  if (kind == SessionKind::kSave) {
    s.user_fd = fds[0];
    s.device_fd = fds[1];
    std::fill(dirty_.begin(), dirty_.end(), 0);
    dirty_count_ = 0;
  } else {
    s.user_fd = fds[1];
    s.device_fd = fds[0];
    s.versions.assign(chunk_count_, 0);
    s.received.assign(chunk_count_, 0);
  }
  session_ = std::move(s);
  *data_fd = session_.user_fd;
  return 0;
}

void MockDevice::EndSessionLocked() {
  if (session_.kind == SessionKind::kNone) return;
  if (session_.device_fd >= 0) close(session_.device_fd);
  if (session_.user_fd >= 0) stale_fds_[session_.user_fd] = true;
  session_ = Session{};
  std::fill(dirty_.begin(), dirty_.end(), 0);
  dirty_count_ = 0;
}

int MockDevice::StepLocked(uint32_t next, int* data_fd) {
  AdvanceLocked();
  uint32_t cur = state_;
  if (ArcOpensDataFd(cur, next)) {
    int err = OpenSessionLocked(next == kStateResuming ? SessionKind::kResume : SessionKind::kSave, data_fd);
    if (err) return err;
  } else if (cur == kStateResuming && next == kStateStop) {
    Session& s = session_;
    bool complete = s.header_ok && s.end_ok && s.initial_done && !s.MidRecord() &&
                    s.setup_loaded == p_.setup_bytes && s.stop_only_loaded == p_.stop_copy_only_bytes &&
                    s.chunks_received == chunk_count_ && s.reinit_started == s.reinit_done;
    if (!complete) {
      EndSessionLocked();
      if (p_.resume_failure_into_error) state_ = kStateError;
      return EINVAL;
    }
    seed_ = s.src_seed;
    versions_ = s.versions;
    info_.loaded_digest = DigestOf(seed_, versions_);
    EndSessionLocked();
  } else if (InSavingGroup(cur) && !InSavingGroup(next)) {
    EndSessionLocked();
  }
  state_ = next;
  info_.arcs_taken++;
  return 0;
}

int MockDevice::SetState(uint32_t target, int* data_fd) {
  *data_fd = -1;
  std::unique_lock<std::mutex> l(mu_);
  if (closed_) return EBADF;
  // ERROR cannot be requested and only a reset leaves it: the kernel's
  // state_flags_table makes both EINVAL.
  if (!StateSupported(target, p_.flags) || !StateSupported(state_, p_.flags)) return EINVAL;
  while (state_ != target) {
    uint32_t next;
    if (NextState(state_, target, p_.flags, &next) != 0) return EINVAL;
    double latency = p_.arc_latency_ms[state_][next];
    if (latency < 0) latency = p_.default_arc_latency_ms;
    if (latency > 0) {
      if (!SleepLocked(l, latency)) return ECANCELED;
      if (closed_) return EBADF;
    }
    for (auto& f : p_.faults) {
      if (f.from == state_ && f.to == next && f.remaining != 0) {
        if (f.remaining > 0) f.remaining--;
        if (f.into_error) {
          EndSessionLocked();
          state_ = kStateError;
        }
        return f.err;
      }
    }
    int fd = -1;
    int err = StepLocked(next, &fd);
    if (err) return err;
    if (fd >= 0) *data_fd = fd;
  }
  return 0;
}

int MockDevice::GetPrecopyInfo(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  bool current = session_.kind != SessionKind::kNone && data_fd == session_.user_fd;
  if (!current && !stale_fds_.count(data_fd)) return EBADF;
  if (current && session_.kind == SessionKind::kResume) return ENOTTY;
  if (state_ != kStatePreCopy && state_ != kStatePreCopyP2P) return EINVAL;
  if (!current) return ENODEV;
  AdvanceLocked();
  uint64_t initial = RemainingInitialLocked();
  uint64_t dirty = DirtyBytesLocked();
  // Bytes produced but not yet read are still owed; initial data precedes
  // dirty data in the stream, so a partial record at the front is initial
  // while any initial data is left.
  uint64_t staged = session_.staging.size();
  if (initial > 0 || !session_.initial_done_sent) initial += staged;
  else dirty += staged;
  *initial_bytes = p_.bogus_initial_bytes.value_or(initial);
  *dirty_bytes = p_.bogus_dirty_bytes.value_or(dirty);
  return 0;
}

int MockDevice::EnablePrecopyInfoV2() {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  // A kernel or driver without the feature: vfio_ioctl_device_feature()
  // passes an unknown feature to the driver, which answers ENOTTY.
  if (!p_.precopy_info_v2) return ENOTTY;
  precopy_info_v2_on_ = true;
  return 0;
}

int MockDevice::GetPrecopyInfoV2(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes, bool* reinit) {
  *reinit = false;
  int err = GetPrecopyInfo(data_fd, initial_bytes, dirty_bytes);
  if (err) return err;
  std::lock_guard<std::mutex> l(mu_);
  // Without the opt-in the REINIT is not reported: its new data only shows
  // as more initial bytes to read.
  if (precopy_info_v2_on_ && session_.kind == SessionKind::kSave && session_.user_fd == data_fd && session_.reinit_flag_owed) {
    session_.reinit_flag_owed = false;
    *reinit = true;
  }
  return 0;
}

int MockDevice::GetStopCopySize(uint64_t* bytes) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  AdvanceLocked();
  uint64_t total;
  uint64_t tail = SplitRecordsBytes(p_.stop_copy_only_bytes, p_.chunk_bytes) + RecordBytes(0);
  if (session_.kind == SessionKind::kSave && session_.active) {
    total = RemainingInitialLocked() + DirtyBytesLocked() + session_.staging.size();
    if (!session_.end_sent) total += tail - SplitRecordsBytes(session_.stop_only_sent, p_.chunk_bytes);
  } else {
    Session fresh;
    Session saved = std::move(session_);
    session_ = fresh;
    total = RemainingInitialLocked() + tail;
    session_ = std::move(saved);
  }
  *bytes = p_.bogus_stop_copy_bytes.value_or(total);
  return 0;
}

int MockDevice::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  EndSessionLocked();
  // A function-level reset loses the device's state, as on real hardware.
  std::fill(versions_.begin(), versions_.end(), 0);
  state_ = kStateRunning;
  last_tick_ = std::chrono::steady_clock::now();
  dma_logging_on_ = false;
  return 0;
}

int MockDevice::DmaLoggingStart(uint64_t page_size, const std::vector<DmaRange>& ranges) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  if (!p_.dma_logging) return ENOTTY;
  if (page_size < 4096 || (page_size & (page_size - 1)) || ranges.empty()) return EINVAL;
  for (auto& r : ranges)
    if (r.length == 0 || r.iova + r.length < r.iova) return EINVAL;
  if (dma_logging_on_) return EBUSY;
  AdvanceLocked();
  dma_logging_on_ = true;
  dma_dirty_since_report_ = 0;
  return 0;
}

int MockDevice::DmaLoggingStop() {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  if (!p_.dma_logging) return ENOTTY;
  dma_logging_on_ = false;
  return 0;
}

int MockDevice::DmaLoggingReport(uint64_t iova, uint64_t length, uint64_t page_size,
                                 std::vector<uint64_t>* bitmap) {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return EBADF;
  if (!p_.dma_logging) return ENOTTY;
  if (!dma_logging_on_) return EINVAL;
  if (page_size < 4096 || (page_size & (page_size - 1)) || length == 0 || iova + length < iova) return EINVAL;
  AdvanceLocked();
  uint64_t pages = length / page_size + (length % page_size != 0);  // no wrap near 2^64
  bitmap->assign(pages / 64 + (pages % 64 != 0), 0);
  uint64_t n = std::min(pages, dma_dirty_since_report_);
  for (uint64_t i = 0; i < n; i++) {
    rng_ = Mix(rng_);
    uint64_t pg = rng_ % pages;
    (*bitmap)[pg / 64] |= 1ull << (pg % 64);
  }
  dma_dirty_since_report_ = 0;
  return 0;
}

size_t MockDevice::ProduceLocked(Session& s, size_t max, uint8_t* out, size_t cap) {
  size_t direct = 0;  // bytes written straight into `out`
  auto emit = [&](uint16_t type, uint64_t a0, uint64_t a1, const void* payload, uint32_t len,
                  bool generated) {
    RecordHeader h{kRecordMagic, type, 0, len, 0, a0, a1, 0, 0};
    // Straight into the caller's buffer while whole records fit and nothing
    // is staged before them (one copy, as a driver's read does); else staged.
    uint8_t* rec;
    if (out && s.staging.size() == 0 && direct + sizeof h + len <= cap) {
      rec = out + direct;
      direct += sizeof h + len;
    } else {
      rec = s.staging.Append(sizeof h + len);
    }
    uint8_t* out = rec + sizeof h;
    if (generated) {
      h.payload_crc = FillPayload(out, len, seed_, type, a0, a1);
    } else {
      if (len) memcpy(out, payload, len);
      h.payload_crc = PayloadCheck(out, len);
    }
    h.check = HeaderCheck(h);
    memcpy(rec, &h, sizeof h);
    uint64_t total = sizeof h + len;
    if (p_.corrupt_save_at_byte >= 0 && uint64_t(p_.corrupt_save_at_byte) >= s.produced &&
        uint64_t(p_.corrupt_save_at_byte) < s.produced + total)
      rec[uint64_t(p_.corrupt_save_at_byte) - s.produced] ^= 0x5a;
    s.produced += total;
  };
  while (direct + s.staging.size() < max) {
    if (!s.header_sent) {
      HeaderPayload hp{p_.state_bytes, p_.setup_bytes, p_.stop_copy_only_bytes, p_.chunk_bytes, kStreamVersion};
      emit(kRecHeader, seed_, p_.profile_hash, &hp, sizeof hp, false);
      s.header_sent = true;
    } else if (s.setup_sent < p_.setup_bytes) {
      uint32_t len = uint32_t(std::min<uint64_t>(p_.chunk_bytes, p_.setup_bytes - s.setup_sent));
      emit(kRecSetup, s.setup_sent, 0, nullptr, len, true);
      s.setup_sent += len;
    } else if (s.next_first_pass_chunk < chunk_count_) {
      uint32_t c = s.next_first_pass_chunk++;
      emit(kRecChunk, c, versions_[c], nullptr, p_.chunk_bytes, true);
    } else if (!s.initial_done_sent) {
      emit(kRecInitialDone, 0, 0, nullptr, 0, false);
      s.initial_done_sent = true;
    } else if (s.reinit_fired && s.reinit_sent < p_.reinit_initial_bytes) {
      uint32_t len = uint32_t(std::min<uint64_t>(p_.chunk_bytes, p_.reinit_initial_bytes - s.reinit_sent));
      emit(kRecReinit, s.reinit_sent, p_.reinit_initial_bytes, nullptr, len, true);
      s.reinit_sent += len;
    } else if (s.reinit_fired && !s.reinit_done_sent) {
      emit(kRecReinitDone, p_.reinit_initial_bytes, 0, nullptr, 0, false);
      s.reinit_done_sent = true;
    } else if (dirty_count_ > 0) {
      // Round-robin from where the last one was found; dirty_count_ > 0
      // guarantees a hit.
      uint32_t c = dirty_cursor_;
      while (!dirty_[c]) c = c + 1 == chunk_count_ ? 0 : c + 1;
      dirty_cursor_ = c;
      dirty_[c] = 0;
      dirty_count_--;
      emit(kRecChunk, c, versions_[c], nullptr, p_.chunk_bytes, true);
    } else if (state_ == kStateStopCopy && s.stop_only_sent < p_.stop_copy_only_bytes) {
      uint32_t len = uint32_t(std::min<uint64_t>(p_.chunk_bytes, p_.stop_copy_only_bytes - s.stop_only_sent));
      emit(kRecStopOnly, s.stop_only_sent, 0, nullptr, len, true);
      s.stop_only_sent += len;
    } else if (state_ == kStateStopCopy && !s.end_sent) {
      emit(kRecEnd, chunk_count_, Digest64(seed_, versions_), nullptr, 0, false);
      s.end_sent = true;
      info_.saved_digest = DigestOf(seed_, versions_);
    } else {
      break;
    }
  }
  return direct;
}

void MockDevice::ThrottleLocked(std::unique_lock<std::mutex>& lock, Session& s, size_t bytes) {
  if (p_.max_bytes_per_sec <= 0) return;
  // Each read or write ends no earlier than the stream's schedule at the
  // cap allows, and idle time earns no credit: the first read after a pause
  // takes as long as its bytes do at the cap. (With up to 50 ms of credit,
  // and the read that found the window stale not charged at all, the first
  // read after a switchover pause came back at once and a reader that
  // learns the device's rate from its reads took a slow device for a fast
  // one.)
  auto now = std::chrono::steady_clock::now();
  if (s.rate_due < now) s.rate_due = now;
  s.rate_due += std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(double(bytes) / p_.max_bytes_per_sec));
  if (s.rate_due > now) wake_.wait_until(lock, s.rate_due, [&] { return interrupted_; });
}

ssize_t MockDevice::ReadData(int data_fd, void* buf, size_t len) {
  std::unique_lock<std::mutex> l(mu_);
  if (closed_) return -EBADF;
  bool current = session_.kind != SessionKind::kNone && data_fd == session_.user_fd;
  if (!current) return stale_fds_.count(data_fd) ? -ENODEV : -EBADF;
  Session& s = session_;
  if (s.kind != SessionKind::kSave) return -EINVAL;
  if (len == 0) return 0;
  AdvanceLocked();
  // Like a driver's read(), the stream is copied straight into the caller's
  // buffer; the pipe is the session's fd (its lifetime, close and staleness).
  uint8_t* out = static_cast<uint8_t*>(buf);
  size_t want = std::min(len, kMaxIoBytes);
  size_t n = std::min(want, s.staging.size());
  if (n) memcpy(out, s.staging.data(), n);
  s.staging.Consume(n);
  if (n < want) n += ProduceLocked(s, want - n, out + n, want - n);
  if (n < want && s.staging.size() > 0) {
    size_t more = std::min(want - n, s.staging.size());
    memcpy(out + n, s.staging.data(), more);
    s.staging.Consume(more);
    n += more;
  }
  if (n == 0) {
    if (state_ != kStateStopCopy) return -ENOMSG;
    // End of a STOP_COPY stream: permanent, 0 from now on.
    if (s.device_fd >= 0) {
      close(s.device_fd);
      s.device_fd = -1;
    }
    return 0;
  }
  info_.bytes_read += n;
  ThrottleLocked(l, s, n);
  return ssize_t(n);
}

ssize_t MockDevice::WriteData(int data_fd, const void* buf, size_t len) {
  std::unique_lock<std::mutex> l(mu_);
  if (closed_) return -EBADF;
  bool current = session_.kind != SessionKind::kNone && data_fd == session_.user_fd;
  if (!current) return stale_fds_.count(data_fd) ? -ENODEV : -EBADF;
  Session& s = session_;
  if (s.kind != SessionKind::kResume) return -EINVAL;
  size_t w = std::min(len, kMaxIoBytes);
  const uint8_t* in = static_cast<const uint8_t*>(buf);
  info_.bytes_written += w;
  bool was_initial_done = s.initial_done;
  bool was_reinit_done = s.reinit_done;
  int err = ParseLocked(s, in, w);
  if (err) return -err;
  double load_ms = p_.load_ms_per_mib * double(w) / double(1 << 20);
  if (!was_initial_done && s.initial_done) load_ms += p_.load_initial_ms;
  // A REINIT's new initial data costs its setup again, as the first did.
  if (!was_reinit_done && s.reinit_done) load_ms += p_.load_initial_ms;
  info_.load_busy_ms += load_ms;
  if (load_ms > 0) {
    if (!SleepLocked(l, load_ms)) return -ECANCELED;
    if (closed_) return -EBADF;
  }
  if (session_.kind == SessionKind::kResume && session_.user_fd == data_fd) ThrottleLocked(l, session_, w);
  return ssize_t(w);
}

int MockDevice::ParseLocked(Session& s, const uint8_t* data, size_t size) {
  static_assert(sizeof(s.rec_header) == sizeof(RecordHeader), "Session::rec_header holds one RecordHeader");
  size_t off = 0;
  while (off < size) {
    if (!s.in_payload) {
      size_t n = std::min(sizeof(RecordHeader) - s.rec_header_have, size - off);
      memcpy(s.rec_header + s.rec_header_have, data + off, n);
      s.rec_header_have += n;
      off += n;
      if (s.rec_header_have < sizeof(RecordHeader)) return 0;
      RecordHeader h;
      memcpy(&h, s.rec_header, sizeof h);
      // Reserved fields must be zero, as in the uAPI: a flipped bit there is corruption too.
      if (h.magic != kRecordMagic || h.check != HeaderCheck(h) || h.reserved != 0 || h.reserved2 != 0 ||
          h.payload_len > std::max<uint32_t>(p_.chunk_bytes, sizeof(HeaderPayload)))
        return EINVAL;
      if (s.end_ok || (!s.header_ok && h.type != kRecHeader)) return EINVAL;
      s.in_payload = true;
      s.payload_seen = 0;
      s.check_a = s.check_b = 0;
      s.check_word_have = 0;
      s.small_payload.clear();
    }
    RecordHeader h;
    memcpy(&h, s.rec_header, sizeof h);
    size_t n = std::min<size_t>(h.payload_len - s.payload_seen, size - off);
    const uint8_t* p = data + off;
    if (h.type == kRecHeader) s.small_payload.append(reinterpret_cast<const char*>(p), n);
    // PayloadCheck, a word at a time across writes.
    CheckSums sums{s.check_a, s.check_b};
    size_t left = n;
    while (s.check_word_have > 0 && left > 0) {
      s.check_word[s.check_word_have++ & 7] = *p++;  // have < 8 here; the mask tells the compiler
      left--;
      if (s.check_word_have == 8) {
        uint64_t w;
        memcpy(&w, s.check_word, 8);
        sums.a += w;
        sums.b += LaneB(w);
        s.check_word_have = 0;
      }
    }
    for (; left >= 8; p += 8, left -= 8) {
      uint64_t w;
      memcpy(&w, p, 8);
      sums.a += w;
      sums.b += LaneB(w);
    }
    memcpy(s.check_word + s.check_word_have, p, left);
    s.check_word_have += left;
    s.check_a = sums.a;
    s.check_b = sums.b;
    s.payload_seen += uint32_t(n);
    off += n;
    if (s.payload_seen < h.payload_len) return 0;
    AddTail(sums, s.check_word, s.check_word_have, h.payload_len - s.check_word_have);
    if (FinishCheck(sums, h.payload_len) != h.payload_crc) return EINVAL;
    s.in_payload = false;
    s.rec_header_have = 0;
    int err = ApplyRecordLocked(s, &h, reinterpret_cast<const uint8_t*>(s.small_payload.data()));
    if (err) return err;
  }
  return 0;
}

int MockDevice::ApplyRecordLocked(Session& s, const void* header, const uint8_t* payload) {
  RecordHeader h;
  memcpy(&h, header, sizeof h);
  switch (h.type) {
    case kRecHeader: {
      HeaderPayload hp;
      if (s.header_ok || h.payload_len != sizeof hp) return EINVAL;
      memcpy(&hp, payload, sizeof hp);
      if (hp.version != kStreamVersion || hp.state_bytes != p_.state_bytes || hp.chunk_bytes != p_.chunk_bytes ||
          hp.setup_bytes != p_.setup_bytes || hp.stop_copy_only_bytes != p_.stop_copy_only_bytes ||
          h.arg1 != p_.profile_hash)
        return EINVAL;
      s.header_ok = true;
      s.src_seed = h.arg0;
      return 0;
    }
    case kRecSetup:
      if (h.arg0 != s.setup_loaded || h.arg0 + h.payload_len > p_.setup_bytes) return EINVAL;
      s.setup_loaded += h.payload_len;
      return 0;
    case kRecChunk:
      if (h.arg0 >= chunk_count_ || h.payload_len != p_.chunk_bytes || h.arg1 > UINT32_MAX) return EINVAL;
      s.versions[h.arg0] = uint32_t(h.arg1);
      if (!s.received[h.arg0]) {
        s.received[h.arg0] = 1;
        s.chunks_received++;
      }
      return 0;
    case kRecInitialDone:
      if (s.initial_done || s.setup_loaded != p_.setup_bytes || s.chunks_received != chunk_count_) return EINVAL;
      s.initial_done = true;
      return 0;
    case kRecStopOnly:
      if (h.arg0 != s.stop_only_loaded || h.arg0 + h.payload_len > p_.stop_copy_only_bytes) return EINVAL;
      s.stop_only_loaded += h.payload_len;
      return 0;
    case kRecReinit:
      // Once per stream, after the first initial data, in order.
      if (!s.initial_done || s.reinit_done || h.arg0 != s.reinit_loaded || (s.reinit_started && h.arg1 != s.reinit_total) ||
          h.arg0 + h.payload_len > h.arg1)
        return EINVAL;
      s.reinit_started = true;
      s.reinit_total = h.arg1;
      s.reinit_loaded += h.payload_len;
      return 0;
    case kRecReinitDone:
      if (!s.initial_done || s.reinit_done || h.arg0 != s.reinit_loaded || (s.reinit_started && h.arg0 != s.reinit_total)) return EINVAL;
      s.reinit_started = true;
      s.reinit_done = true;
      return 0;
    case kRecEnd:
      if (!s.initial_done || s.reinit_started != s.reinit_done || h.arg0 != chunk_count_ || h.arg1 != Digest64(s.src_seed, s.versions)) return EINVAL;
      s.end_ok = true;
      return 0;
    default:
      return EINVAL;
  }
}

void MockDevice::CloseDataFd(int data_fd) {
  std::lock_guard<std::mutex> l(mu_);
  if (session_.kind != SessionKind::kNone && data_fd == session_.user_fd) {
    close(data_fd);
    session_.user_fd = -1;
  } else if (stale_fds_.erase(data_fd)) {
    close(data_fd);
  }
}

void MockDevice::Close() {
  std::lock_guard<std::mutex> l(mu_);
  if (closed_) return;
  EndSessionLocked();
  for (auto& kv : stale_fds_) close(kv.first);
  stale_fds_.clear();
  closed_ = true;
}

std::string MockDevice::DigestOf(uint64_t seed, const std::vector<uint32_t>& versions) const {
  return Hex(Digest64(seed, versions));
}

MockInfo MockDevice::Info() {
  std::lock_guard<std::mutex> l(mu_);
  AdvanceLocked();
  MockInfo i = info_;
  i.seed = seed_;
  i.digest = DigestOf(seed_, versions_);
  return i;
}

}  // namespace vfio
