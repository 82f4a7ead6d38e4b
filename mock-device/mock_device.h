// The kernel-free mock VFIO migration device. It sits behind the same
// DeviceBackend interface as the kernel backend and obeys the uAPI as the
// kernel does: the states a flag combination allows, the kernel's arc walk
// (vfio_mig_get_next_state), the errnos, real pipe fds as data fds with the
// uAPI's read semantics, ERROR and reset. Its behaviour (sizes, dirty rate,
// arc latencies, destination load cost, rate cap, faults) comes from a
// profile; see mock-device/README.md.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <type_traits>
#include <string>
#include <vector>

#include "../native/backend.h"

namespace vfio {

// Limits of a mock profile, so that any valid profile opens in bounded memory
// and time and no call sleeps for long. Enforced by the addon (profile_napi.cc),
// for src/vfio/mock-profile.ts and raw callers alike.
constexpr uint32_t kMockMinChunkBytes = 64;
constexpr uint32_t kMockMaxChunkBytes = 1u << 20;
constexpr uint64_t kMockMaxStateBytes = 64ull << 30;
// Chunk tables: 4 bytes of version and 1 of dirty flag per chunk, again per
// resume session: about 40 MiB at the cap.
constexpr uint64_t kMockMaxChunks = 1ull << 22;
constexpr double kMockMaxDelayMs = 60000;        // an arc latency, the initial load time
constexpr double kMockMaxLoadMsPerMiB = 1000;    // a 4 MiB write loads in at most 4 s
constexpr double kMockMinBytesPerSec = 65536;    // a rate cap: a 4 MiB read in at most 64 s
constexpr double kMockMaxSafeInteger = 9007199254740991.0;  // 2^53 - 1: exact in a JS number
constexpr uint32_t kMockMaxListEntries = 64;     // arc latencies, faults

template <typename T>
constexpr T MockFieldDefault(double d) {
  if constexpr (std::is_same_v<T, std::optional<uint64_t>>) return std::nullopt;
  else return T(d);
}

struct MockArcFault {
  uint32_t from;
  uint32_t to;
  int err;              // errno the arc fails with
  bool into_error;      // the device is left in ERROR
  int64_t remaining;    // how many more times it fires; -1 = always
};

// A FIFO of bytes that reuses its storage (no zero-fill, no reallocation in
// the steady state): the save stream's staging area.
class ByteQueue {
 public:
  size_t size() const { return end_ - begin_; }
  const uint8_t* data() const { return buf_.data() + begin_; }
  // Space for n more bytes at the back; valid until the next call.
  uint8_t* Append(size_t n) {
    if (begin_ == end_) begin_ = end_ = 0;
    if (end_ + n > buf_.size()) {
      if (begin_ > 0) {
        std::copy(buf_.begin() + begin_, buf_.begin() + end_, buf_.begin());
        end_ -= begin_;
        begin_ = 0;
      }
      if (end_ + n > buf_.size()) buf_.resize(end_ + n);
    }
    uint8_t* p = buf_.data() + end_;
    end_ += n;
    return p;
  }
  void Consume(size_t n) { begin_ += std::min(n, size()); }

 private:
  std::vector<uint8_t> buf_;
  size_t begin_ = 0, end_ = 0;
};

// The profile's scalar fields, defined once: this list declares the members
// of MockProfile, drives the addon's parsing and range checks, and is
// exported to TypeScript (mockProfileFields), whose validation and types
// follow it. Adding a field is a row here plus its behaviour.
//   X(member, C++ type, native name, JSON input path ("" = not an input;
//     "group.key" = inside an object), kind, required, default, min, max)
// Kinds: bytes (an exact count; JSON "64KiB" or a number), rate (bytes per
// second, JSON as bytes), ms, bool, offset (integer, -1 = none), u64 (any
// unsigned 64-bit integer; JSON a number or decimal string). `required` in
// a group: required when the group is given. A negative default of an ms
// field means "off" (inputs are >= 0).
#define VFIO_MOCK_PROFILE_FIELDS(X)                                                                                          \
  X(state_bytes, uint64_t, "stateBytes", "stateBytes", kBytes, true, 0, 0, kMockMaxStateBytes)                               \
  X(chunk_bytes, uint32_t, "chunkBytes", "chunkBytes", kBytes, false, 4096, kMockMinChunkBytes, kMockMaxChunkBytes)          \
  X(setup_bytes, uint64_t, "setupBytes", "setupBytes", kBytes, false, 0, 0, kMockMaxStateBytes)                              \
  X(stop_copy_only_bytes, uint64_t, "stopCopyOnlyBytes", "stopCopyOnlyBytes", kBytes, false, 0, 0, kMockMaxStateBytes)       \
  X(dirty_bytes_per_sec, double, "dirtyBytesPerSec", "dirtyBytesPerSec", kRate, false, 0, 0, kMockMaxSafeInteger)            \
  X(dirty_working_set_bytes, uint64_t, "dirtyWorkingSetBytes", "dirtyWorkingSetBytes", kBytes, false, 0, 0,                  \
    kMockMaxStateBytes) /* 0 = the whole state */                                                                            \
  X(default_arc_latency_ms, double, "defaultArcLatencyMs", "arcLatencyMs.default", kMs, false, 0, 0, kMockMaxDelayMs)        \
  X(load_initial_ms, double, "loadInitialMs", "loadInitialMs", kMs, false, 0, 0, kMockMaxDelayMs)                            \
  X(load_ms_per_mib, double, "loadMsPerMiB", "loadMsPerMiB", kMs, false, 0, 0, kMockMaxLoadMsPerMiB)                         \
  X(max_bytes_per_sec, double, "maxBytesPerSec", "maxBytesPerSec", kRate, false, 0, 0, kMockMaxSafeInteger) /* 0 = none */   \
  X(resume_failure_into_error, bool, "resumeFailureIntoError", "resumeFailureIntoError", kBool, false, 0, 0, 1)              \
  X(dma_logging, bool, "dmaLogging", "dmaLogging", kBool, false, 0, 0, 1)                                                    \
  X(corrupt_save_at_byte, int64_t, "corruptSaveAtByte", "corruptSaveAtByte", kOffset, false, -1, -1, kMockMaxSafeInteger)    \
  X(bogus_initial_bytes, std::optional<uint64_t>, "bogusInitialBytes", "bogusPrecopyInfo.initialBytes", kU64, false, 0, 0,   \
    0) /* reported instead of the truth */                                                                                   \
  X(bogus_dirty_bytes, std::optional<uint64_t>, "bogusDirtyBytes", "bogusPrecopyInfo.dirtyBytes", kU64, false, 0, 0, 0)      \
  X(bogus_stop_copy_bytes, std::optional<uint64_t>, "bogusStopCopyBytes", "bogusStopCopyBytes", kU64, false, 0, 0, 0)        \
  X(precopy_info_v2, bool, "precopyInfoV2", "precopyInfoV2", kBool, false, 1, 0, 1) /* accepts the opt-in */                 \
  X(reinit_after_precopy_ms, double, "reinitAfterPrecopyMs", "reinit.afterPrecopyMs", kMs, true, -1, -1, kMockMaxDelayMs)    \
  X(reinit_initial_bytes, uint64_t, "reinitInitialBytes", "reinit.initialBytes", kBytes, true, 0, 0, kMockMaxStateBytes)     \
  X(profile_hash, uint64_t, "profileHash", "", kU64, true, 0, 0, 0) /* identity of the state layout, checked on resume */

enum class MockFieldKind { kBytes, kRate, kMs, kBool, kOffset, kU64 };

struct MockFieldSpec {
  const char* name;   // native (normalised) name
  const char* input;  // JSON input path; "" = computed, not an input
  MockFieldKind kind;
  bool required;
  double dflt, min, max;  // u64 fields: any 64-bit value, no default
};

constexpr MockFieldSpec kMockProfileFields[] = {
#define VFIO_MOCK_FIELD_SPEC(member, type, name, input, kind, required, dflt, lo, hi) \
  {name, input, MockFieldKind::kind, required, double(dflt), double(lo), double(hi)},
    VFIO_MOCK_PROFILE_FIELDS(VFIO_MOCK_FIELD_SPEC)
#undef VFIO_MOCK_FIELD_SPEC
};

struct MockProfile {
  std::string name;
  uint64_t flags = 0;                 // VFIO_MIGRATION_* flags
#define VFIO_MOCK_FIELD_MEMBER(member, type, name, input, kind, required, dflt, lo, hi) type member = MockFieldDefault<type>(dflt);
  VFIO_MOCK_PROFILE_FIELDS(VFIO_MOCK_FIELD_MEMBER)
#undef VFIO_MOCK_FIELD_MEMBER
  double arc_latency_ms[8][8] = {};   // per single arc; < 0 = use default
  std::vector<MockArcFault> faults;
  // Driver personality: "generic" (this MockDevice) or "mtty" (MttyMockDevice,
  // mtty_mock.h, which uses only `ports` from this profile).
  std::string driver = "generic";
  uint32_t ports = 2;
};

// What a test can observe that the uAPI does not expose.
struct MockInfo {
  uint64_t seed;
  std::string digest;          // digest of the content now
  std::string saved_digest;    // content when the last save stream ended
  std::string loaded_digest;   // content when the last resume completed
  uint64_t bytes_read;         // over all sessions
  uint64_t bytes_written;
  uint64_t dirtied_chunks;
  uint64_t arcs_taken;
  double load_busy_ms;         // destination time spent loading
};

class MockDevice : public DeviceBackend {
 public:
  MockDevice(MockProfile profile, uint64_t seed);
  ~MockDevice() override;

  const char* Kind() const override { return "mock"; }
  const char* OpenPath() const override { return "mock"; }
  int GetMigrationFlags(uint64_t* flags) override;
  int GetState(uint32_t* state) override;
  int SetState(uint32_t state, int* data_fd) override;
  int GetPrecopyInfo(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes) override;
  int EnablePrecopyInfoV2() override;
  int GetPrecopyInfoV2(int data_fd, uint64_t* initial_bytes, uint64_t* dirty_bytes, bool* reinit) override;
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
  void Interrupt() override;

  MockInfo Info();

 private:
  enum class SessionKind { kNone, kSave, kResume };
  struct Session {
    SessionKind kind = SessionKind::kNone;
    int user_fd = -1;      // the fd handed to the caller
    int device_fd = -1;    // our end of the pipe
    bool active = false;   // false once the device left the session's states
    // Save side: what is left to produce.
    bool header_sent = false;
    uint64_t setup_sent = 0;
    uint32_t next_first_pass_chunk = 0;
    bool initial_done_sent = false;
    uint64_t stop_only_sent = 0;
    bool end_sent = false;
    uint64_t produced = 0;  // bytes produced so far (for corrupt_save_at_byte)
    ByteQueue staging;      // produced but not yet written into the pipe
    // Resume side: a streaming parser. Every byte is read once, where the
    // caller wrote it; only a header (and the small stream-header payload)
    // is kept when a write cuts it.
    uint8_t rec_header[40];          // sizeof(RecordHeader)
    size_t rec_header_have = 0;
    bool in_payload = false;         // rec_header is whole; its payload is arriving
    uint32_t payload_seen = 0;
    uint64_t check_a = 0, check_b = 0;  // PayloadCheck sums so far
    uint8_t check_word[8];           // a word cut by a write
    size_t check_word_have = 0;
    std::string small_payload;       // the stream header's payload
    bool MidRecord() const { return rec_header_have != 0 || in_payload; }
    bool header_ok = false;
    uint64_t src_seed = 0;
    uint64_t setup_loaded = 0;
    uint64_t stop_only_loaded = 0;
    bool initial_done = false;
    bool end_ok = false;
    uint64_t chunks_received = 0;
    std::vector<uint32_t> versions;
    std::vector<uint8_t> received;
    // REINIT (save side): when PRE_COPY began, whether the REINIT fired, how
    // much of its new initial data is produced, whether its REINIT_DONE
    // record is, and whether PRECOPY_INFO still owes the flag.
    std::chrono::steady_clock::time_point precopy_start;
    bool reinit_fired = false;
    uint64_t reinit_sent = 0;
    bool reinit_done_sent = false;
    bool reinit_flag_owed = false;
    // REINIT (resume side): the new initial data's announced size and progress.
    uint64_t reinit_total = 0;
    uint64_t reinit_loaded = 0;
    bool reinit_started = false;
    bool reinit_done = false;
    // Rate cap bookkeeping.
    std::chrono::steady_clock::time_point rate_due;  // when the bytes moved so far are due at the cap
  };

  void AdvanceLocked();  // apply dirtying for the time elapsed while running
  bool RunningLocked() const;
  int StepLocked(uint32_t next, int* data_fd);
  void EndSessionLocked();
  int OpenSessionLocked(SessionKind kind, int* data_fd);
  uint64_t RemainingInitialLocked() const;
  uint64_t DirtyBytesLocked() const;
  uint64_t RecordBytes(uint64_t payload) const;
  // Produces about max bytes of the save stream: straight into out (up to
  // cap, whole records) while nothing is staged, the rest into s.staging.
  // Returns the bytes written to out.
  size_t ProduceLocked(Session& s, size_t max, uint8_t* out = nullptr, size_t cap = 0);
  // Feeds resume stream bytes to the parser; returns 0 or EINVAL.
  int ParseLocked(Session& s, const uint8_t* data, size_t size);
  // Applies a whole, checked record; returns 0 or EINVAL.
  int ApplyRecordLocked(Session& s, const void* header, const uint8_t* payload);
  void ThrottleLocked(std::unique_lock<std::mutex>& lock, Session& s, size_t bytes);
  // Sleeps with mu_ released; false when Interrupt() cut it short.
  bool SleepLocked(std::unique_lock<std::mutex>& lock, double ms);
  std::string DigestOf(uint64_t seed, const std::vector<uint32_t>& versions) const;

  MockProfile p_;
  uint64_t seed_;
  uint32_t chunk_count_;
  uint32_t working_set_chunks_;
  std::mutex mu_;
  uint32_t state_;
  std::vector<uint32_t> versions_;
  std::vector<uint8_t> dirty_;      // chunk needs (re)sending in this save session
  uint64_t dirty_count_ = 0;
  uint32_t dirty_cursor_ = 0;       // where the search for the next dirty chunk starts
  std::chrono::steady_clock::time_point last_tick_;
  double dirty_carry_ = 0;          // fractional chunks not yet dirtied
  uint64_t rng_;
  Session session_;
  std::map<int, bool> stale_fds_;   // user fds of ended sessions still open
  bool dma_logging_on_ = false;
  bool precopy_info_v2_on_ = false;  // this open opted in (the kernel keeps it per device fd)
  uint64_t dma_dirty_since_report_ = 0;
  MockInfo info_{};
  bool closed_ = false;
  bool interrupted_ = false;
  std::condition_variable wake_;    // Interrupt() -> sleepers
};

}  // namespace vfio
