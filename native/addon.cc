// Node-API surface of the addon: NativeDevice over any DeviceBackend. Every
// operation that may block runs on the device's control or data worker
// thread and returns a promise; the JS thread never makes a blocking syscall.
#include <fcntl.h>
#include <napi.h>
#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>
#include <set>
#include <string>

#include "../mock-device/mock_device.h"
#include "../mock-device/mtty_mock.h"
#include "backend.h"
#include "crc32c.h"
#include "kernel_backend.h"
#include "uapi.h"
#include "worker.h"

namespace vfio {

namespace {

const char* ErrnoName(int e) {
  switch (e) {
#define E(x) case x: return #x;
    E(EPERM) E(ENOENT) E(EINTR) E(EIO) E(ENXIO) E(E2BIG) E(EBADF) E(EAGAIN) E(ENOMEM) E(EACCES)
    E(EFAULT) E(EBUSY) E(EEXIST) E(ENODEV) E(EINVAL) E(ENFILE) E(EMFILE) E(ENOTTY) E(ENOSPC)
    E(EPIPE) E(ERANGE) E(ENOSYS) E(ENOMSG) E(ENODATA) E(EOPNOTSUPP) E(ETIMEDOUT) E(ECANCELED)
    E(EOVERFLOW) E(EPROTO) E(EBADMSG) E(ENOTSOCK) E(ENOTSUP == EOPNOTSUPP ? 0 : ENOTSUP)
#undef E
    default: return "EUNKNOWN";
  }
}

Napi::Error MakeError(Napi::Env env, int err, const std::string& op) {
  std::string msg = std::string(ErrnoName(err)) + ": " + strerror(err) + " (" + op + ")";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("operation", Napi::String::New(env, op));
  return e;
}

uint64_t U64(const Napi::Value& v, const char* field) {
  if (v.IsBigInt()) {
    bool lossless;
    return v.As<Napi::BigInt>().Uint64Value(&lossless);
  }
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (d < 0) throw Napi::TypeError::New(v.Env(), std::string(field) + " must be >= 0");
    return uint64_t(d);
  }
  throw Napi::TypeError::New(v.Env(), std::string(field) + " must be a number or bigint");
}

double Num(const Napi::Object& o, const char* field, double dflt = 0) {
  Napi::Value v = o.Get(field);
  if (v.IsUndefined()) return dflt;
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string(field) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

bool Bool(const Napi::Object& o, const char* field) {
  Napi::Value v = o.Get(field);
  return v.IsBoolean() && v.As<Napi::Boolean>().Value();
}

// The TypeScript layer validates profiles (src/vfio/mock-profile.ts) and
// hands over a normalised object; this only converts it.
MockProfile ParseProfile(const Napi::Object& o) {
  MockProfile p;
  p.name = o.Get("name").ToString().Utf8Value();
  p.flags = U64(o.Get("flags"), "flags");
  p.state_bytes = U64(o.Get("stateBytes"), "stateBytes");
  p.chunk_bytes = uint32_t(Num(o, "chunkBytes", 4096));
  p.setup_bytes = uint64_t(Num(o, "setupBytes"));
  p.stop_copy_only_bytes = uint64_t(Num(o, "stopCopyOnlyBytes"));
  p.dirty_bytes_per_sec = Num(o, "dirtyBytesPerSec");
  p.dirty_working_set_bytes = uint64_t(Num(o, "dirtyWorkingSetBytes"));
  p.default_arc_latency_ms = Num(o, "defaultArcLatencyMs");
  for (auto& row : p.arc_latency_ms)
    for (double& v : row) v = -1;
  Napi::Value arcs = o.Get("arcLatencies");
  if (arcs.IsArray()) {
    Napi::Array a = arcs.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Object e = a.Get(i).As<Napi::Object>();
      uint32_t from = uint32_t(Num(e, "from")), to = uint32_t(Num(e, "to"));
      if (from < 8 && to < 8) p.arc_latency_ms[from][to] = Num(e, "ms");
    }
  }
  p.load_initial_ms = Num(o, "loadInitialMs");
  p.load_ms_per_mib = Num(o, "loadMsPerMiB");
  p.max_bytes_per_sec = Num(o, "maxBytesPerSec");
  p.resume_failure_into_error = Bool(o, "resumeFailureIntoError");
  p.dma_logging = Bool(o, "dmaLogging");
  Napi::Value faults = o.Get("faults");
  if (faults.IsArray()) {
    Napi::Array a = faults.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Object f = a.Get(i).As<Napi::Object>();
      p.faults.push_back({uint32_t(Num(f, "from")), uint32_t(Num(f, "to")), int(Num(f, "errno")),
                          Bool(f, "intoError"), int64_t(Num(f, "times", -1))});
    }
  }
  p.corrupt_save_at_byte = int64_t(Num(o, "corruptSaveAtByte", -1));
  if (!o.Get("bogusInitialBytes").IsUndefined()) {
    p.bogus_initial = true;
    p.bogus_initial_bytes = U64(o.Get("bogusInitialBytes"), "bogusInitialBytes");
  }
  if (!o.Get("bogusDirtyBytes").IsUndefined()) {
    p.bogus_dirty = true;
    p.bogus_dirty_bytes = U64(o.Get("bogusDirtyBytes"), "bogusDirtyBytes");
  }
  if (!o.Get("bogusStopCopyBytes").IsUndefined()) {
    p.bogus_stop_copy = true;
    p.bogus_stop_copy_bytes = U64(o.Get("bogusStopCopyBytes"), "bogusStopCopyBytes");
  }
  p.profile_hash = U64(o.Get("profileHash"), "profileHash");
  if (o.Get("driver").IsString()) p.driver = o.Get("driver").ToString().Utf8Value();
  p.ports = uint32_t(Num(o, "ports", 2));
  return p;
}

// Read buffers come from free lists by size (the migration layer reads in
// powers of two from 256 KiB to 4 MiB): a fresh malloc per read is an mmap
// plus a page fault per 4 KiB, a measurable share of a GB/s stream. Buffers
// return here from their JS finalizer.
class ReadBufferPool {
 public:
  static constexpr size_t kMaxFreePerSize = 8;
  static uint8_t* Get(size_t n) {
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        uint8_t* p = it->second.back();
        it->second.pop_back();
        return p;
      }
    }
    return static_cast<uint8_t*>(malloc(n));
  }
  static void Put(uint8_t* p, size_t n) {
    if (Pooled(n)) {
      std::lock_guard<std::mutex> l(mu_);
      auto& list = free_[n];
      if (list.size() < kMaxFreePerSize) {
        list.push_back(p);
        return;
      }
    }
    free(p);
  }

 private:
  static bool Pooled(size_t n) { return n >= (256u << 10) && n <= (4u << 20) && (n & (n - 1)) == 0; }
  static inline std::mutex mu_;
  static inline std::map<size_t, std::vector<uint8_t*>> free_;
};

}  // namespace

class NativeDevice : public Napi::ObjectWrap<NativeDevice> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeDevice",
                       {
                           InstanceMethod<&NativeDevice::OpenKernel>("openKernel"),
                           InstanceMethod<&NativeDevice::OpenMock>("openMock"),
                           InstanceMethod<&NativeDevice::Info>("info"),
                           InstanceMethod<&NativeDevice::MigrationFlags>("migrationFlags"),
                           InstanceMethod<&NativeDevice::GetState>("getState"),
                           InstanceMethod<&NativeDevice::SetState>("setState"),
                           InstanceMethod<&NativeDevice::PrecopyInfo>("precopyInfo"),
                           InstanceMethod<&NativeDevice::StopCopySize>("stopCopySize"),
                           InstanceMethod<&NativeDevice::Reset>("reset"),
                           InstanceMethod<&NativeDevice::DmaLoggingStart>("dmaLoggingStart"),
                           InstanceMethod<&NativeDevice::DmaLoggingStop>("dmaLoggingStop"),
                           InstanceMethod<&NativeDevice::DmaLoggingReport>("dmaLoggingReport"),
                           InstanceMethod<&NativeDevice::ReadData>("readData"),
                           InstanceMethod<&NativeDevice::WriteData>("writeData"),
                           InstanceMethod<&NativeDevice::CloseDataFd>("closeDataFd"),
                           InstanceMethod<&NativeDevice::MockInfoJs>("mockInfo"),
                           InstanceMethod<&NativeDevice::OpenDataFds>("openDataFds"),
                           InstanceMethod<&NativeDevice::Close>("close"),
                       });
  }

  explicit NativeDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeDevice>(info) {}

  ~NativeDevice() override {
    // Collected without close(): release on a helper thread so nothing blocks
    // here. At environment teardown the process is exiting: the workers stay
    // parked (they must not touch Node-API any more) and the OS reclaims fds.
    if (control_ && !closing_ && !EnvTearingDown()) {
      auto backend = backend_;
      auto fds = open_fds_;
      control_->Shutdown(Env(), nullptr);
      data_->Shutdown(Env(), nullptr);
      std::thread([backend, fds] {
        if (!backend) return;
        for (int fd : fds) backend->CloseDataFd(fd);
        backend->Close();
      }).detach();
    }
  }

  static bool EnvTearingDown();

 private:
  using Exec = Worker::Exec;

  // Runs `exec` on a worker; `resolve` builds the value on the JS thread.
  // The shared `err` carries the errno and the failing step across.
  struct Result {
    int err = 0;
    std::string op;
  };

  template <typename ResolveFn>
  Napi::Value Run(Napi::Env env, bool on_data, std::function<void(Result&)> exec, ResolveFn resolve) {
    auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
    if (!backend_ || closing_) {
      deferred->Reject(MakeError(env, EBADF, closing_ ? "device is closed" : "device is not open").Value());
      return deferred->Promise();
    }
    auto res = std::make_shared<Result>();
    Napi::Reference<Napi::Value>* self_ref = new Napi::Reference<Napi::Value>(Napi::Persistent(Value().As<Napi::Value>()));
    (on_data ? data_ : control_)->Submit(
        env, [exec, res] { exec(*res); },
        [deferred, res, resolve, self_ref](Napi::Env env) {
          Napi::HandleScope scope(env);
          if (res->err) deferred->Reject(MakeError(env, res->err, res->op).Value());
          else {
            try {
              deferred->Resolve(resolve(env));
            } catch (const Napi::Error& e) {
              deferred->Reject(e.Value());
            }
          }
          delete self_ref;
        });
    return deferred->Promise();
  }

  void StartWorkers(Napi::Env env) {
    control_ = Worker::Start(env, "vfio-control");
    data_ = Worker::Start(env, "vfio-data");
  }

  Napi::Value OpenMock(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (backend_) throw Napi::Error::New(env, "device already open");
    if (!info[0].IsObject()) throw Napi::TypeError::New(env, "openMock(profile, seed): profile must be an object");
    MockProfile p = ParseProfile(info[0].As<Napi::Object>());
    uint64_t seed = U64(info[1], "seed");
    if (p.driver == "mtty") {
      auto mtty = std::make_shared<MttyMockDevice>(p.ports, seed);
      mtty_ = mtty;
      backend_ = mtty;
    } else {
      auto mock = std::make_shared<MockDevice>(std::move(p), seed);
      mock_ = mock;
      backend_ = mock;
    }
    StartWorkers(env);
    return env.Undefined();
  }

  Napi::Value OpenKernel(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (backend_ || control_) throw Napi::Error::New(env, "device already open");
    if (!info[0].IsString()) throw Napi::TypeError::New(env, "openKernel(path, via): path must be a string");
    KernelOpenOptions opts{info[0].As<Napi::String>().Utf8Value(),
                           info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "auto"};
    StartWorkers(env);
    auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
    auto out = std::make_shared<std::shared_ptr<DeviceBackend>>();
    auto res = std::make_shared<Result>();
    auto* self_ref = new Napi::Reference<Napi::Value>(Napi::Persistent(Value().As<Napi::Value>()));
    control_->Submit(
        env,
        [opts, out, res] {
          DeviceBackend* b = OpenKernelDevice(opts, &res->err, &res->op);
          if (b) out->reset(b);
        },
        [this, deferred, out, res, self_ref](Napi::Env env) {
          if (res->err) deferred->Reject(MakeError(env, res->err, res->op).Value());
          else {
            backend_ = *out;
            deferred->Resolve(Napi::String::New(env, backend_->OpenPath()));
          }
          delete self_ref;
        });
    return deferred->Promise();
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("kind", backend_ ? Napi::Value(Napi::String::New(env, backend_->Kind())) : env.Null());
    o.Set("openPath", backend_ ? Napi::Value(Napi::String::New(env, backend_->OpenPath())) : env.Null());
    o.Set("closed", Napi::Boolean::New(env, closing_));
    return o;
  }

  Napi::Value MigrationFlags(const Napi::CallbackInfo& info) {
    auto b = backend_;
    auto flags = std::make_shared<uint64_t>(0);
    return Run(info.Env(), false,
               [b, flags](Result& r) {
                 r.err = b->GetMigrationFlags(flags.get());
                 r.op = "VFIO_DEVICE_FEATURE(GET MIGRATION)";
               },
               [flags](Napi::Env env) { return Napi::Number::New(env, double(*flags)); });
  }

  Napi::Value GetState(const Napi::CallbackInfo& info) {
    auto b = backend_;
    auto st = std::make_shared<uint32_t>(0);
    return Run(info.Env(), false,
               [b, st](Result& r) {
                 r.err = b->GetState(st.get());
                 r.op = "VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE)";
               },
               [st](Napi::Env env) { return Napi::Number::New(env, *st); });
  }

  Napi::Value SetState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "setState(state): state must be a number");
    uint32_t target = info[0].As<Napi::Number>().Uint32Value();
    auto b = backend_;
    auto fd = std::make_shared<int>(-1);
    return Run(env, false,
               [b, target, fd](Result& r) {
                 r.err = b->SetState(target, fd.get());
                 r.op = "VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE)";
               },
               [this, fd](Napi::Env env) {
                 if (*fd >= 0) open_fds_.insert(*fd);
                 return Napi::Number::New(env, *fd);
               });
  }

  int FdArg(const Napi::CallbackInfo& info) {
    if (!info[0].IsNumber()) throw Napi::TypeError::New(info.Env(), "data fd must be a number");
    int fd = info[0].As<Napi::Number>().Int32Value();
    return fd;
  }

  Napi::Value PrecopyInfo(const Napi::CallbackInfo& info) {
    int fd = FdArg(info);
    auto b = backend_;
    auto v = std::make_shared<std::pair<uint64_t, uint64_t>>();
    return Run(info.Env(), false,
               [b, fd, v](Result& r) {
                 r.err = b->GetPrecopyInfo(fd, &v->first, &v->second);
                 r.op = "VFIO_MIG_GET_PRECOPY_INFO";
               },
               [v](Napi::Env env) {
                 Napi::Object o = Napi::Object::New(env);
                 o.Set("initialBytes", Napi::BigInt::New(env, v->first));
                 o.Set("dirtyBytes", Napi::BigInt::New(env, v->second));
                 return o;
               });
  }

  Napi::Value StopCopySize(const Napi::CallbackInfo& info) {
    auto b = backend_;
    auto v = std::make_shared<uint64_t>(0);
    return Run(info.Env(), false,
               [b, v](Result& r) {
                 r.err = b->GetStopCopySize(v.get());
                 r.op = "VFIO_DEVICE_FEATURE(GET MIG_DATA_SIZE)";
               },
               [v](Napi::Env env) { return Napi::BigInt::New(env, *v); });
  }

  Napi::Value Reset(const Napi::CallbackInfo& info) {
    auto b = backend_;
    return Run(info.Env(), false,
               [b](Result& r) {
                 r.err = b->Reset();
                 r.op = "VFIO_DEVICE_RESET";
               },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value DmaLoggingStart(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t page = U64(info[0], "pageSize");
    if (!info[1].IsArray()) throw Napi::TypeError::New(env, "ranges must be an array");
    std::vector<DmaRange> ranges;
    Napi::Array a = info[1].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Object r = a.Get(i).As<Napi::Object>();
      ranges.push_back({U64(r.Get("iova"), "iova"), U64(r.Get("length"), "length")});
    }
    auto b = backend_;
    return Run(env, false,
               [b, page, ranges](Result& r) {
                 r.err = b->DmaLoggingStart(page, ranges);
                 r.op = "VFIO_DEVICE_FEATURE(SET DMA_LOGGING_START)";
               },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value DmaLoggingStop(const Napi::CallbackInfo& info) {
    auto b = backend_;
    return Run(info.Env(), false,
               [b](Result& r) {
                 r.err = b->DmaLoggingStop();
                 r.op = "VFIO_DEVICE_FEATURE(SET DMA_LOGGING_STOP)";
               },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value DmaLoggingReport(const Napi::CallbackInfo& info) {
    uint64_t iova = U64(info[0], "iova"), len = U64(info[1], "length"), page = U64(info[2], "pageSize");
    auto b = backend_;
    auto bm = std::make_shared<std::vector<uint64_t>>();
    return Run(info.Env(), false,
               [b, iova, len, page, bm](Result& r) {
                 r.err = b->DmaLoggingReport(iova, len, page, bm.get());
                 r.op = "VFIO_DEVICE_FEATURE(GET DMA_LOGGING_REPORT)";
               },
               [bm](Napi::Env env) {
                 return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<uint8_t*>(bm->data()), bm->size() * 8);
               });
  }

  // readData(fd, maxBytes) -> { bytes, crc32c }, or null at the end of a
  // STOP_COPY stream. ENOMSG rejects: the temporary end of a PRE_COPY stream.
  // The CRC32C is taken on the data thread while the bytes are still in its
  // cache, so a sender's checksum costs the event loop nothing.
  Napi::Value ReadData(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int fd = FdArg(info);
    if (!info[1].IsNumber()) throw Napi::TypeError::New(env, "readData(fd, maxBytes): maxBytes must be a number");
    size_t max = size_t(std::max(1.0, std::min(info[1].As<Napi::Number>().DoubleValue(), double(16 << 20))));
    auto b = backend_;
    struct Out { uint8_t* data = nullptr; ssize_t n = 0; uint32_t crc = 0; };
    auto out = std::make_shared<Out>();
    return Run(env, true,
               [b, fd, max, out](Result& r) {
                 out->data = ReadBufferPool::Get(max);
                 if (!out->data) { r.err = ENOMEM; r.op = "read(data_fd)"; return; }
                 ssize_t n = b->ReadData(fd, out->data, max);
                 if (n < 0) {
                   ReadBufferPool::Put(out->data, max);
                   out->data = nullptr;
                   r.err = int(-n);
                   r.op = "read(data_fd)";
                   return;
                 }
                 out->n = n;
                 out->crc = Crc32c(out->data, size_t(n));
               },
               [out, max](Napi::Env env) -> Napi::Value {
                 uint8_t* d = out->data;
                 out->data = nullptr;
                 if (out->n == 0) {
                   ReadBufferPool::Put(d, max);
                   return env.Null();
                 }
                 // The JS Buffer views the first n bytes of a max-byte block.
                 Napi::Object result = Napi::Object::New(env);
                 result.Set("bytes", Napi::Buffer<uint8_t>::New(env, d, size_t(out->n), [max](Napi::Env, uint8_t* p) { ReadBufferPool::Put(p, max); }));
                 result.Set("crc32c", Napi::Number::New(env, out->crc));
                 return result;
               });
  }

  // writeData(fd, buffer | buffer[], checks?) -> bytes written (all of them, unless an
  // error). An array is written in order, as one write job.
  Napi::Value WriteData(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int fd = FdArg(info);
    std::vector<Napi::Buffer<uint8_t>> bufs;
    if (info[1].IsBuffer()) bufs.push_back(info[1].As<Napi::Buffer<uint8_t>>());
    else if (info[1].IsArray()) {
      Napi::Array a = info[1].As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); i++) {
        Napi::Value v = a.Get(i);
        if (!v.IsBuffer()) throw Napi::TypeError::New(env, "writeData(fd, buffers): every element must be a Buffer");
        bufs.push_back(v.As<Napi::Buffer<uint8_t>>());
      }
    } else throw Napi::TypeError::New(env, "writeData(fd, data): data must be a Buffer or an array of Buffers");
    struct Part { const uint8_t* data; size_t len; };
    auto parts = std::make_shared<std::vector<Part>>();
    auto keep = std::make_shared<std::vector<Napi::Reference<Napi::Buffer<uint8_t>>>>();
    for (auto& b : bufs) {
      parts->push_back({b.Data(), b.Length()});
      keep->push_back(Napi::Persistent(b));
    }
    // Optional checks: [parts0, crc0, parts1, crc1, ...]: each run of parts
    // must have that CRC32C, verified here on the data thread right before
    // the run is written (the device then reads bytes still in cache); a
    // mismatch is EBADMSG and nothing of that run reaches the device.
    struct CheckedRun { size_t parts; uint32_t crc; };
    auto runs = std::make_shared<std::vector<CheckedRun>>();
    if (info.Length() > 2 && !info[2].IsUndefined()) {
      if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
        throw Napi::TypeError::New(env, "writeData(fd, data, checks): checks must be a Uint32Array of [parts, crc32c] pairs");
      Napi::Uint32Array c = info[2].As<Napi::Uint32Array>();
      size_t covered = 0;
      for (size_t i = 0; i + 1 < c.ElementLength(); i += 2) {
        if (c[i] == 0) throw Napi::RangeError::New(env, "writeData(fd, data, checks): a run must have at least one part");
        runs->push_back({c[i], c[i + 1]});
        covered += c[i];
      }
      if (c.ElementLength() % 2 != 0 || covered != bufs.size())
        throw Napi::RangeError::New(env, "writeData(fd, data, checks): the runs must cover every buffer exactly once");
    }
    auto b = backend_;
    auto written = std::make_shared<size_t>(0);
    return Run(env, true,
               [b, fd, parts, runs, written](Result& r) {
                 size_t next = 0;  // first part of the next checked run
                 for (size_t i = 0, k = 0; i < parts->size(); i++) {
                   if (i == next && k < runs->size()) {
                     const CheckedRun& run = (*runs)[k++];
                     uint32_t crc = 0;
                     for (size_t j = i; j < i + run.parts; j++) crc = Crc32c((*parts)[j].data, (*parts)[j].len, crc);
                     if (crc != run.crc) {
                       r.err = EBADMSG;
                       r.op = "crc32c check of data run " + std::to_string(k - 1) + " before write(data_fd)";
                       return;
                     }
                     next = i + run.parts;
                   }
                   const Part& p = (*parts)[i];
                   size_t done = 0;
                   while (done < p.len) {
                     ssize_t n = b->WriteData(fd, p.data + done, p.len - done);
                     if (n < 0) { r.err = int(-n); r.op = "write(data_fd)"; return; }
                     if (n == 0) { r.err = EIO; r.op = "write(data_fd) made no progress"; return; }
                     done += size_t(n);
                     *written += size_t(n);
                   }
                 }
               },
               [written, keep](Napi::Env env) { return Napi::Number::New(env, double(*written)); });
  }

  Napi::Value CloseDataFd(const Napi::CallbackInfo& info) {
    int fd = FdArg(info);
    Napi::Env env = info.Env();
    if (!open_fds_.count(fd)) {
      auto d = Napi::Promise::Deferred::New(env);
      d.Reject(MakeError(env, EBADF, "close(data_fd): not a data fd of this device").Value());
      return d.Promise();
    }
    open_fds_.erase(fd);
    auto b = backend_;
    return Run(env, true, [b, fd](Result&) { b->CloseDataFd(fd); },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value OpenDataFds(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Array a = Napi::Array::New(env);
    uint32_t i = 0;
    for (int fd : open_fds_) a.Set(i++, Napi::Number::New(env, fd));
    return a;
  }

  Napi::Value MockInfoJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!mock_ && !mtty_) throw Napi::Error::New(env, "mockInfo() is only available on mock devices");
    MockInfo m = mtty_ ? mtty_->Info() : mock_->Info();
    Napi::Object o = Napi::Object::New(env);
    o.Set("seed", Napi::BigInt::New(env, m.seed));
    o.Set("digest", m.digest);
    o.Set("savedDigest", m.saved_digest);
    o.Set("loadedDigest", m.loaded_digest);
    o.Set("bytesRead", Napi::Number::New(env, double(m.bytes_read)));
    o.Set("bytesWritten", Napi::Number::New(env, double(m.bytes_written)));
    o.Set("dirtiedChunks", Napi::Number::New(env, double(m.dirtied_chunks)));
    o.Set("arcsTaken", Napi::Number::New(env, double(m.arcs_taken)));
    o.Set("loadBusyMs", Napi::Number::New(env, m.load_busy_ms));
    return o;
  }

  // close(): after pending I/O, closes every data fd this device handed out,
  // then the device. Idempotent.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
    if (closing_ || !control_) {
      closing_ = true;
      deferred->Resolve(env.Undefined());
      return deferred->Promise();
    }
    closing_ = true;
    auto b = backend_;
    std::set<int> fds = open_fds_;
    open_fds_.clear();
    auto control = control_;
    auto data = data_;
    auto* self_ref = new Napi::Reference<Napi::Value>(Napi::Persistent(Value().As<Napi::Value>()));
    data->Submit(
        env, [b, fds] { if (b) for (int fd : fds) b->CloseDataFd(fd); },
        [b, control, data, deferred, self_ref](Napi::Env env) {
          control->Submit(
              env, [b] { if (b) b->Close(); },
              [control, data, deferred, self_ref](Napi::Env env) {
                // Resolve once both threads have let go of Node-API.
                auto remaining = std::make_shared<int>(2);
                auto finalized = [remaining, deferred, self_ref](Napi::Env env) {
                  if (--*remaining) return;
                  if (!EnvTearingDown()) {
                    Napi::HandleScope scope(env);
                    deferred->Resolve(env.Undefined());
                    delete self_ref;
                  }
                };
                control->Shutdown(env, finalized);
                data->Shutdown(env, finalized);
              });
        });
    return deferred->Promise();
  }

  std::shared_ptr<DeviceBackend> backend_;
  std::shared_ptr<MockDevice> mock_;
  std::shared_ptr<MttyMockDevice> mtty_;
  std::shared_ptr<Worker> control_, data_;
  std::set<int> open_fds_;  // data fds handed to JS and not yet closed
  bool closing_ = false;
};

static std::atomic<bool> g_env_tearing_down{false};
bool NativeDevice::EnvTearingDown() { return g_env_tearing_down.load(); }

Napi::Value NextStateJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t cur = info[0].As<Napi::Number>().Uint32Value();
  uint32_t target = info[1].As<Napi::Number>().Uint32Value();
  uint64_t flags = U64(info[2], "flags");
  uint32_t next = 0;
  int err = vfio_uapi::NextState(cur, target, flags, &next);
  if (err) return env.Null();
  return Napi::Number::New(env, next);
}

Napi::Object UapiNumbers(Napi::Env env) {
  using namespace vfio_uapi;
  Napi::Object o = Napi::Object::New(env);
  auto set = [&](const char* k, double v) { o.Set(k, Napi::Number::New(env, v)); };
  set("VFIO_DEVICE_FEATURE", double(kVfioDeviceFeature));
  set("VFIO_DEVICE_BIND_IOMMUFD", double(kVfioDeviceBindIommufd));
  set("VFIO_DEVICE_ATTACH_IOMMUFD_PT", double(kVfioDeviceAttachIommufdPt));
  set("VFIO_DEVICE_DETACH_IOMMUFD_PT", double(kVfioDeviceDetachIommufdPt));
  set("VFIO_MIG_GET_PRECOPY_INFO", double(kVfioMigGetPrecopyInfo));
  set("VFIO_DEVICE_RESET", double(kVfioDeviceReset));
  set("VFIO_GROUP_GET_DEVICE_FD", double(kVfioGroupGetDeviceFd));
  set("VFIO_GROUP_SET_CONTAINER", double(kVfioGroupSetContainer));
  set("VFIO_SET_IOMMU", double(kVfioSetIommu));
  set("IOMMU_IOAS_ALLOC", double(kIommuIoasAlloc));
  set("VFIO_DEVICE_FEATURE_GET", kFeatureGet);
  set("VFIO_DEVICE_FEATURE_SET", kFeatureSet);
  set("VFIO_DEVICE_FEATURE_PROBE", kFeatureProbe);
  set("VFIO_DEVICE_FEATURE_MIGRATION", kFeatureMigration);
  set("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE", kFeatureMigDeviceState);
  set("VFIO_DEVICE_FEATURE_DMA_LOGGING_START", kFeatureDmaLoggingStart);
  set("VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP", kFeatureDmaLoggingStop);
  set("VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT", kFeatureDmaLoggingReport);
  set("VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", kFeatureMigDataSize);
  set("VFIO_MIGRATION_STOP_COPY", double(kMigrationStopCopy));
  set("VFIO_MIGRATION_P2P", double(kMigrationP2P));
  set("VFIO_MIGRATION_PRE_COPY", double(kMigrationPreCopy));
  set("sizeof(struct vfio_precopy_info)", sizeof(vfio_precopy_info));
  set("sizeof(struct vfio_device_feature_mig_state)", sizeof(vfio_device_feature_mig_state));
  set("sizeof(struct vfio_device_feature_dma_logging_control)", sizeof(vfio_device_feature_dma_logging_control));
  set("sizeof(struct vfio_device_feature_dma_logging_report)", sizeof(vfio_device_feature_dma_logging_report));
  set("sizeof(struct vfio_device_bind_iommufd)", sizeof(vfio_device_bind_iommufd));
  set("sizeof(struct vfio_device_attach_iommufd_pt)", sizeof(vfio_device_attach_iommufd_pt));
  return o;
}

Napi::Value Crc32cJs(const Napi::CallbackInfo& info);
void InitCrc32c();

// dupSocketFd(fd) -> a close-on-exec duplicate of a socket fd: lets the
// migration layer re-wrap an accepted connection in a net.Socket that reads
// into its own large buffers (net.Server cannot). fcntl does not block.
Napi::Value DupSocketFdJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "dupSocketFd(fd): fd must be a number");
  int fd = info[0].As<Napi::Number>().Int32Value();
  int type = 0;
  socklen_t len = sizeof type;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) throw MakeError(env, errno, "getsockopt(SO_TYPE) in dupSocketFd");
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw MakeError(env, errno, "fcntl(F_DUPFD_CLOEXEC) in dupSocketFd");
  return Napi::Number::New(env, copy);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InitCrc32c();
  exports.Set("crc32c", Napi::Function::New(env, Crc32cJs));
  env.AddCleanupHook([] { g_env_tearing_down = true; });
  exports.Set("NativeDevice", NativeDevice::Init(env));
  exports.Set("nextState", Napi::Function::New(env, NextStateJs));
  exports.Set("dupSocketFd", Napi::Function::New(env, DupSocketFdJs));
  exports.Set("uapi", UapiNumbers(env));
#if defined(__linux__)
  exports.Set("kernelBackend", Napi::Boolean::New(env, true));
#else
  exports.Set("kernelBackend", Napi::Boolean::New(env, false));
#endif
  return exports;
}

}  // namespace vfio

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return vfio::Init(env, exports); }

NODE_API_MODULE(vfio_migration, InitAddon)
