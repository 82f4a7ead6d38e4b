#include "kernel_backend.h"

#if defined(__linux__)

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "uapi.h"

namespace vfio {

using namespace vfio_uapi;

namespace {

int Ioctl(int fd, unsigned long req, void* arg) {
  int r;
  do r = ioctl(fd, req, arg);
  while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

int IoctlValue(int fd, unsigned long req, unsigned long arg) {
  int r;
  do r = ioctl(fd, req, arg);
  while (r < 0 && errno == EINTR);
  return r;
}

std::string Basename(const std::string& p) {
  auto s = p.find_last_of('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

bool Exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

// A device name ("0000:03:00.1", an mdev UUID) or a sysfs path -> its sysfs dir.
std::string SysfsDir(const std::string& path) {
  if (path.rfind("/sys/", 0) == 0) return path;
  for (const char* bus : {"/sys/bus/pci/devices/", "/sys/bus/mdev/devices/", "/sys/bus/platform/devices/"}) {
    std::string d = bus + path;
    if (Exists(d)) return d;
  }
  return "";
}

// The cdev node of a device from its sysfs dir: the one vfioN entry of
// <dev>/vfio-dev (listed, not probed: N is not bounded by a small number).
std::string CdevOf(const std::string& sysfs) {
  DIR* d = opendir((sysfs + "/vfio-dev").c_str());
  if (!d) return "";
  std::string found;
  while (struct dirent* e = readdir(d)) {
    if (strncmp(e->d_name, "vfio", 4) == 0 && e->d_name[4] >= '0' && e->d_name[4] <= '9') {
      found = std::string("/dev/vfio/devices/") + e->d_name;
      break;
    }
  }
  closedir(d);
  return found;
}

class KernelDevice : public DeviceBackend {
 public:
  KernelDevice(int device_fd, int iommufd, int group_fd, int container_fd, const char* path)
      : device_fd_(device_fd), iommufd_(iommufd), group_fd_(group_fd), container_fd_(container_fd), path_(path) {}
  ~KernelDevice() override { Close(); }

  const char* Kind() const override { return "kernel"; }
  const char* OpenPath() const override { return path_; }

  int Feature(uint32_t flags, void* data, size_t len) {
    std::vector<uint8_t> buf(sizeof(vfio_device_feature) + len);
    auto* f = reinterpret_cast<vfio_device_feature*>(buf.data());
    f->argsz = uint32_t(buf.size());
    f->flags = flags;
    if (len) memcpy(f->data, data, len);
    int err = Ioctl(device_fd_, kVfioDeviceFeature, f);
    if (!err && len) memcpy(data, f->data, len);
    return err;
  }

  int GetMigrationFlags(uint64_t* flags) override {
    vfio_device_feature_migration m{};
    int err = Feature(kFeatureGet | kFeatureMigration, &m, sizeof m);
    if (!err) *flags = m.flags;
    return err;
  }
  int GetState(uint32_t* state) override {
    vfio_device_feature_mig_state s{};
    s.data_fd = -1;
    int err = Feature(kFeatureGet | kFeatureMigDeviceState, &s, sizeof s);
    if (!err) *state = s.device_state;
    return err;
  }
  int SetState(uint32_t state, int* data_fd) override {
    vfio_device_feature_mig_state s{};
    s.device_state = state;
    s.data_fd = -1;
    int err = Feature(kFeatureSet | kFeatureMigDeviceState, &s, sizeof s);
    *data_fd = err ? -1 : s.data_fd;
    return err;
  }
  int GetPrecopyInfo(int data_fd, uint64_t* initial, uint64_t* dirty) override {
    vfio_precopy_info info{};
    info.argsz = sizeof info;
    int err = Ioctl(data_fd, kVfioMigGetPrecopyInfo, &info);
    if (!err) {
      *initial = info.initial_bytes;
      *dirty = info.dirty_bytes;
    }
    return err;
  }
  int EnablePrecopyInfoV2() override {
    int err = Feature(kFeatureSet | kFeatureMigPrecopyInfoV2, nullptr, 0);
    if (!err) precopy_info_v2_ = true;
    return err;
  }
  int GetPrecopyInfoV2(int data_fd, uint64_t* initial, uint64_t* dirty, bool* reinit) override {
    vfio_precopy_info info{};
    info.argsz = sizeof info;
    info.flags = 0;  // in: none; out (opted in only): zeroed by the driver, then REINIT or not
    *reinit = false;
    int err = Ioctl(data_fd, kVfioMigGetPrecopyInfo, &info);
    if (!err) {
      *initial = info.initial_bytes;
      *dirty = info.dirty_bytes;
      // Without the opt-in the field is reserved: an old driver echoes it.
      *reinit = precopy_info_v2_ && (info.flags & kPrecopyInfoReinit) != 0;
    }
    return err;
  }
  int GetStopCopySize(uint64_t* bytes) override {
    vfio_device_feature_mig_data_size d{};
    int err = Feature(kFeatureGet | kFeatureMigDataSize, &d, sizeof d);
    if (!err) *bytes = d.stop_copy_length;
    return err;
  }
  int Reset() override { return IoctlValue(device_fd_, kVfioDeviceReset, 0) < 0 ? errno : 0; }
  int DmaLoggingStart(uint64_t page_size, const std::vector<DmaRange>& ranges) override {
    std::vector<vfio_device_feature_dma_logging_range> r(ranges.size());
    for (size_t i = 0; i < ranges.size(); i++) r[i] = {ranges[i].iova, ranges[i].length};
    vfio_device_feature_dma_logging_control c{};
    c.page_size = page_size;
    c.num_ranges = uint32_t(r.size());
    c.ranges = reinterpret_cast<uint64_t>(r.data());
    return Feature(kFeatureSet | kFeatureDmaLoggingStart, &c, sizeof c);
  }
  int DmaLoggingStop() override { return Feature(kFeatureSet | kFeatureDmaLoggingStop, nullptr, 0); }
  int DmaLoggingReport(uint64_t iova, uint64_t length, uint64_t page_size, std::vector<uint64_t>* bitmap) override {
    if (page_size == 0) return EINVAL;
    // No wrap near 2^64; the addon caps the size before calling.
    uint64_t pages = length / page_size + (length % page_size != 0);
    bitmap->assign(pages / 64 + (pages % 64 != 0), 0);
    vfio_device_feature_dma_logging_report rep{iova, length, page_size, reinterpret_cast<uint64_t>(bitmap->data())};
    return Feature(kFeatureGet | kFeatureDmaLoggingReport, &rep, sizeof rep);
  }
  ssize_t ReadData(int data_fd, void* buf, size_t len) override {
    ssize_t r;
    do r = read(data_fd, buf, len);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
  }
  ssize_t WriteData(int data_fd, const void* buf, size_t len) override {
    ssize_t r;
    do r = write(data_fd, buf, len);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
  }
  void CloseDataFd(int data_fd) override { close(data_fd); }
  void Close() override {
    for (int* fd : {&device_fd_, &group_fd_, &container_fd_, &iommufd_}) {
      if (*fd >= 0) close(*fd);
      *fd = -1;
    }
  }

 private:
  int device_fd_, iommufd_, group_fd_, container_fd_;
  const char* path_;
  bool precopy_info_v2_ = false;  // this fd opted in to vfio_precopy_info.flags
};

DeviceBackend* OpenCdev(const std::string& cdev, int* err, std::string* what) {
  int dev = open(cdev.c_str(), O_RDWR | O_CLOEXEC);
  if (dev < 0) { *err = errno; *what = "open(" + cdev + ")"; return nullptr; }
  int iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
  if (iommufd < 0) { *err = errno; *what = "open(/dev/iommu)"; close(dev); return nullptr; }
  vfio_device_bind_iommufd bind{sizeof bind, 0, iommufd, 0};
  iommu_ioas_alloc ioas{sizeof ioas, 0, 0};
  vfio_device_attach_iommufd_pt attach{sizeof attach, 0, 0};
  if ((*err = Ioctl(dev, kVfioDeviceBindIommufd, &bind))) *what = "VFIO_DEVICE_BIND_IOMMUFD";
  else if ((*err = Ioctl(iommufd, kIommuIoasAlloc, &ioas))) *what = "IOMMU_IOAS_ALLOC";
  else {
    attach.pt_id = ioas.out_ioas_id;
    if ((*err = Ioctl(dev, kVfioDeviceAttachIommufdPt, &attach))) *what = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
  }
  if (*err) { close(dev); close(iommufd); return nullptr; }
  return new KernelDevice(dev, iommufd, -1, -1, "cdev");
}

DeviceBackend* OpenGroup(const std::string& sysfs, int* err, std::string* what) {
  char link[PATH_MAX];
  ssize_t n = readlink((sysfs + "/iommu_group").c_str(), link, sizeof link - 1);
  if (n < 0) { *err = errno; *what = "readlink(" + sysfs + "/iommu_group)"; return nullptr; }
  link[n] = 0;
  std::string group_path = "/dev/vfio/" + Basename(link);
  int group = open(group_path.c_str(), O_RDWR | O_CLOEXEC);
  if (group < 0) { *err = errno; *what = "open(" + group_path + ")"; return nullptr; }
  int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
  if (container < 0) { *err = errno; *what = "open(/dev/vfio/vfio)"; close(group); return nullptr; }
  auto fail = [&](int e, const char* step) -> DeviceBackend* {
    *err = e; *what = step; close(group); close(container); return nullptr;
  };
  vfio_group_status status{sizeof status, 0};
  if (int e = Ioctl(group, kVfioGroupGetStatus, &status)) return fail(e, "VFIO_GROUP_GET_STATUS");
  if (!(status.flags & kVfioGroupFlagsViable)) return fail(EBUSY, "VFIO_GROUP_GET_STATUS (group not viable)");
  if (IoctlValue(container, kVfioGetApiVersion, 0) != kVfioApiVersion) return fail(EINVAL, "VFIO_GET_API_VERSION");
  if (int e = Ioctl(group, kVfioGroupSetContainer, &container)) return fail(e, "VFIO_GROUP_SET_CONTAINER");
  unsigned long type = IoctlValue(container, kVfioCheckExtension, kVfioType1v2Iommu) > 0 ? kVfioType1v2Iommu : kVfioType1Iommu;
  if (IoctlValue(container, kVfioSetIommu, type) < 0) return fail(errno, "VFIO_SET_IOMMU");
  std::string name = Basename(sysfs);
  int dev = IoctlValue(group, kVfioGroupGetDeviceFd, reinterpret_cast<unsigned long>(name.c_str()));
  if (dev < 0) return fail(errno, "VFIO_GROUP_GET_DEVICE_FD");
  fcntl(dev, F_SETFD, FD_CLOEXEC);
  return new KernelDevice(dev, -1, group, container, "group");
}

}  // namespace

DeviceBackend* OpenKernelDevice(const KernelOpenOptions& opts, int* err, std::string* what) {
  *err = 0;
  bool is_cdev = opts.path.rfind("/dev/vfio/devices/", 0) == 0;
  if (is_cdev) {
    if (opts.via == "group") { *err = EINVAL; *what = "the group path needs a sysfs device path or name, not a cdev node"; return nullptr; }
    return OpenCdev(opts.path, err, what);
  }
  std::string sysfs = SysfsDir(opts.path);
  if (sysfs.empty()) { *err = ENOENT; *what = "no such VFIO device: " + opts.path; return nullptr; }
  if (opts.via == "group") return OpenGroup(sysfs, err, what);
  std::string cdev = CdevOf(sysfs);
  if (opts.via == "cdev") {
    if (cdev.empty()) { *err = ENOENT; *what = "no vfio-dev cdev under " + sysfs; return nullptr; }
    return OpenCdev(cdev, err, what);
  }
  if (cdev.empty()) return OpenGroup(sysfs, err, what);
  DeviceBackend* dev = OpenCdev(cdev, err, what);
  // auto: a kernel with VFIO_DEVICE_CDEV but without a usable iommufd
  // (/dev/iommu missing or not permitted) can still offer the group path.
  if (!dev && *what == "open(/dev/iommu)") {
    int cdev_err = *err;
    std::string cdev_what = *what;
    dev = OpenGroup(sysfs, err, what);
    if (!dev) { *err = cdev_err; *what = cdev_what + ", and the group path failed too: " + *what; }
  }
  return dev;
}

}  // namespace vfio

#else  // !__linux__

#include <cerrno>

namespace vfio {
DeviceBackend* OpenKernelDevice(const KernelOpenOptions&, int* err, std::string* what) {
  *err = ENOSYS;
  *what = "this build has the mock backend only: the kernel VFIO backend needs Linux";
  return nullptr;
}
}  // namespace vfio

#endif
