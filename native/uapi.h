// Our own copy of the VFIO migration uAPI (Linux 6.12 include/uapi/linux/vfio.h
// and include/uapi/linux/iommufd.h). The build machines' <linux/vfio.h> is 6.1
// and lacks PRE_COPY, VFIO_MIG_GET_PRECOPY_INFO and MIG_DATA_SIZE, so nothing
// here includes it; the layouts are pinned with static_asserts and a test
// compares the numbers with the 6.12 header when it is installed.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/ioctl.h>
#else
// Only the numbers matter off Linux (the kernel backend is not built there).
#define _IOC_NRSHIFT 0
#define _IOC_TYPESHIFT 8
#define _IO(type, nr) (((type) << _IOC_TYPESHIFT) | ((nr) << _IOC_NRSHIFT))
#endif

namespace vfio_uapi {

constexpr unsigned kVfioType = ';';  // 0x3b
constexpr unsigned kVfioBase = 100;

constexpr unsigned long kVfioGetApiVersion = _IO(kVfioType, kVfioBase + 0);
constexpr unsigned long kVfioCheckExtension = _IO(kVfioType, kVfioBase + 1);
constexpr unsigned long kVfioSetIommu = _IO(kVfioType, kVfioBase + 2);
constexpr unsigned long kVfioGroupGetStatus = _IO(kVfioType, kVfioBase + 3);
constexpr unsigned long kVfioGroupSetContainer = _IO(kVfioType, kVfioBase + 4);
constexpr unsigned long kVfioGroupGetDeviceFd = _IO(kVfioType, kVfioBase + 6);
constexpr unsigned long kVfioDeviceReset = _IO(kVfioType, kVfioBase + 11);
constexpr unsigned long kVfioDeviceFeature = _IO(kVfioType, kVfioBase + 17);
constexpr unsigned long kVfioDeviceBindIommufd = _IO(kVfioType, kVfioBase + 18);
constexpr unsigned long kVfioDeviceAttachIommufdPt = _IO(kVfioType, kVfioBase + 19);
constexpr unsigned long kVfioDeviceDetachIommufdPt = _IO(kVfioType, kVfioBase + 20);
constexpr unsigned long kVfioMigGetPrecopyInfo = _IO(kVfioType, kVfioBase + 21);

constexpr int kVfioApiVersion = 0;
constexpr unsigned long kVfioType1Iommu = 1;
constexpr unsigned long kVfioType1v2Iommu = 3;
constexpr uint32_t kVfioGroupFlagsViable = 1u << 0;

// struct vfio_device_feature.flags
constexpr uint32_t kFeatureMask = 0xffff;
constexpr uint32_t kFeatureGet = 1u << 16;
constexpr uint32_t kFeatureSet = 1u << 17;
constexpr uint32_t kFeatureProbe = 1u << 18;

// Feature indexes.
constexpr uint32_t kFeatureMigration = 1;
constexpr uint32_t kFeatureMigDeviceState = 2;
constexpr uint32_t kFeatureDmaLoggingStart = 6;
constexpr uint32_t kFeatureDmaLoggingStop = 7;
constexpr uint32_t kFeatureDmaLoggingReport = 8;
constexpr uint32_t kFeatureMigDataSize = 9;
// Not in Linux 6.12 (the header the uAPI test compiles against), so these are
// our own definitions with nothing to static_assert them against: the values
// come from the PRECOPY_INFOv2 series (../shared/uapi.md, "PRECOPY_INFOv2 and
// REINIT"). A SET of this feature with no data opts the device fd in; after
// that the driver zeroes vfio_precopy_info.flags on each GET_PRECOPY_INFO and
// may set kPrecopyInfoReinit. Before it the flags field is reserved (old
// drivers echo what the caller passed), so it is never read.
constexpr uint32_t kFeatureMigPrecopyInfoV2 = 12;
// struct vfio_precopy_info.flags (output, only after the opt-in): the device
// has entirely new initial data; initial_bytes is a new value and
// dirty_bytes restarts at 0.
constexpr uint32_t kPrecopyInfoReinit = 1u << 0;

// struct vfio_device_feature_migration.flags
constexpr uint64_t kMigrationStopCopy = 1ull << 0;
constexpr uint64_t kMigrationP2P = 1ull << 1;
constexpr uint64_t kMigrationPreCopy = 1ull << 2;

// enum vfio_device_mig_state
enum MigState : uint32_t {
  kStateError = 0,
  kStateStop = 1,
  kStateRunning = 2,
  kStateStopCopy = 3,
  kStateResuming = 4,
  kStateRunningP2P = 5,
  kStatePreCopy = 6,
  kStatePreCopyP2P = 7,
  kNumStates = 8,
};

struct vfio_device_feature {
  uint32_t argsz;
  uint32_t flags;
  uint8_t data[];
};
static_assert(sizeof(vfio_device_feature) == 8, "vfio_device_feature");
static_assert(offsetof(vfio_device_feature, data) == 8, "vfio_device_feature.data");

struct vfio_device_feature_migration {
  alignas(8) uint64_t flags;
};
static_assert(sizeof(vfio_device_feature_migration) == 8, "feature_migration");

struct vfio_device_feature_mig_state {
  uint32_t device_state;
  int32_t data_fd;
};
static_assert(sizeof(vfio_device_feature_mig_state) == 8, "feature_mig_state");
static_assert(offsetof(vfio_device_feature_mig_state, data_fd) == 4, "mig_state.data_fd");

struct vfio_device_feature_mig_data_size {
  alignas(8) uint64_t stop_copy_length;
};
static_assert(sizeof(vfio_device_feature_mig_data_size) == 8, "mig_data_size");

struct vfio_precopy_info {
  uint32_t argsz;
  uint32_t flags;
  alignas(8) uint64_t initial_bytes;
  alignas(8) uint64_t dirty_bytes;
};
static_assert(sizeof(vfio_precopy_info) == 24, "vfio_precopy_info");
static_assert(offsetof(vfio_precopy_info, initial_bytes) == 8, "precopy_info.initial_bytes");
static_assert(offsetof(vfio_precopy_info, dirty_bytes) == 16, "precopy_info.dirty_bytes");

struct vfio_device_feature_dma_logging_control {
  alignas(8) uint64_t page_size;
  uint32_t num_ranges;
  uint32_t __reserved;
  alignas(8) uint64_t ranges;
};
static_assert(sizeof(vfio_device_feature_dma_logging_control) == 24, "dma_logging_control");
static_assert(offsetof(vfio_device_feature_dma_logging_control, ranges) == 16, "control.ranges");

struct vfio_device_feature_dma_logging_range {
  alignas(8) uint64_t iova;
  alignas(8) uint64_t length;
};
static_assert(sizeof(vfio_device_feature_dma_logging_range) == 16, "dma_logging_range");

struct vfio_device_feature_dma_logging_report {
  alignas(8) uint64_t iova;
  alignas(8) uint64_t length;
  alignas(8) uint64_t page_size;
  alignas(8) uint64_t bitmap;
};
static_assert(sizeof(vfio_device_feature_dma_logging_report) == 32, "dma_logging_report");
static_assert(offsetof(vfio_device_feature_dma_logging_report, bitmap) == 24, "report.bitmap");

struct vfio_group_status {
  uint32_t argsz;
  uint32_t flags;
};
static_assert(sizeof(vfio_group_status) == 8, "vfio_group_status");

struct vfio_device_bind_iommufd {
  uint32_t argsz;
  uint32_t flags;
  int32_t iommufd;
  uint32_t out_devid;
};
static_assert(sizeof(vfio_device_bind_iommufd) == 16, "vfio_device_bind_iommufd");

struct vfio_device_attach_iommufd_pt {
  uint32_t argsz;
  uint32_t flags;
  uint32_t pt_id;
};
static_assert(sizeof(vfio_device_attach_iommufd_pt) == 12, "vfio_device_attach_iommufd_pt");

// include/uapi/linux/iommufd.h
constexpr unsigned kIommufdType = ';';
constexpr unsigned kIommufdCmdIoasAlloc = 0x81;
constexpr unsigned long kIommuIoasAlloc = _IO(kIommufdType, kIommufdCmdIoasAlloc);
struct iommu_ioas_alloc {
  uint32_t size;
  uint32_t flags;
  uint32_t out_ioas_id;
};
static_assert(sizeof(iommu_ioas_alloc) == 12, "iommu_ioas_alloc");

// One row per state: every fact the code uses about a state, in one place
// (the addon exports this table as `stateFacts`; src/vfio/states.ts derives
// its helpers from it, the mock and the kernel backend use it here).
struct StateFact {
  MigState state;
  const char* name;    // QEMU's QAPI name (QapiVfioMigrationState)
  // drivers/vfio/vfio_main.c: the migration flags the state needs to exist
  // (ERROR needs all bits: it can never be requested).
  uint64_t needs;
  // Exists on every device that answers MIGRATION GET, whatever its flags
  // (uapi.md "Which states exist": RUNNING and ERROR).
  bool always;
  // Saving group: the device hands out its state through a data fd; moving
  // inside the group keeps the same fd, leaving it ends the session.
  bool saving;
  // VFIO_MIG_GET_PRECOPY_INFO is valid (the PRE_COPY states).
  bool precopy;
  // P2P-quiesced: no new peer-to-peer DMA, not fully running.
  bool p2p_quiesced;
};

constexpr StateFact kStateFacts[kNumStates] = {
    {kStateError, "error", ~0ull, true, false, false, false},
    {kStateStop, "stop", kMigrationStopCopy, false, false, false, false},
    {kStateRunning, "running", kMigrationStopCopy, true, false, false, false},
    {kStateStopCopy, "stop-copy", kMigrationStopCopy, false, true, false, false},
    {kStateResuming, "resuming", kMigrationStopCopy, false, false, false, false},
    {kStateRunningP2P, "running-p2p", kMigrationStopCopy | kMigrationP2P, false, false, false, true},
    {kStatePreCopy, "pre-copy", kMigrationStopCopy | kMigrationPreCopy, false, true, true, false},
    {kStatePreCopyP2P, "pre-copy-p2p", kMigrationStopCopy | kMigrationP2P | kMigrationPreCopy, false, true, true, true},
};
static_assert(kStateFacts[kStatePreCopyP2P].state == kStatePreCopyP2P, "kStateFacts is indexed by state");

// The migration flags by name (struct vfio_device_feature_migration.flags).
struct FlagFact {
  const char* key;   // the TypeScript MigrationFlags property
  const char* name;  // the profile / CLI name
  uint64_t bit;
};
constexpr FlagFact kFlagFacts[] = {
    {"stopCopy", "stop-copy", kMigrationStopCopy},
    {"p2p", "p2p", kMigrationP2P},
    {"preCopy", "pre-copy", kMigrationPreCopy},
};

// The single arcs that return a new data fd (uapi.md "The single arcs").
struct DataFdArc {
  MigState from;
  MigState to;
  bool save;  // a save stream (read it) or a resume stream (write it)
};
constexpr DataFdArc kDataFdArcs[] = {
    {kStateRunning, kStatePreCopy, true},
    {kStateRunningP2P, kStatePreCopyP2P, true},
    {kStateStop, kStateStopCopy, true},
    {kStateStop, kStateResuming, false},
};

// Indexed [from][to]: the first single arc from `from` toward `to` (the
// kernel's vfio_from_fsm_table); ERROR = refused. NextState skips states the
// device lacks.
extern const uint8_t kNextStateTable[kNumStates][kNumStates];

inline bool StateSupported(uint32_t state, uint64_t flags) {
  return state < kNumStates && (kStateFacts[state].needs & flags) == kStateFacts[state].needs;
}

// drivers/vfio/vfio_main.c vfio_mig_get_next_state(): the next single arc on the
// shortest path from cur to target, skipping states the device lacks. Returns 0
// or EINVAL (unsupported state, or a blocked path such as STOP_COPY -> PRE_COPY).
int NextState(uint32_t cur, uint32_t target, uint64_t flags, uint32_t* next);

// True when the arc cur -> next opens a new data session (returns a data fd).
inline bool ArcOpensDataFd(uint32_t cur, uint32_t next) {
  for (const DataFdArc& a : kDataFdArcs)
    if (a.from == cur && a.to == next) return true;
  return false;
}

inline bool InSavingGroup(uint32_t s) { return s < kNumStates && kStateFacts[s].saving; }

}  // namespace vfio_uapi
