// Node-API surface of the addon: NativeDevice over any DeviceBackend. Every
// operation that may block runs on the device's control or data worker
// thread and returns a promise; the JS thread never makes a blocking syscall.
//
// Nothing a caller passes may abort or hang the process: every argument is
// type- and range-checked before any conversion, sizes are checked for
// overflow and capped, every C++ exception (bad_alloc included) becomes a
// typed JS error, and data fds never cross into JS (sessions.h). Per-
// environment state (instance data, a cleanup hook) lets worker_threads load
// and unload the addon freely.
#include <fcntl.h>
#include <napi.h>
#include <sys/mman.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <vector>

#include "pin_library.h"
#include "backend.h"
#include "crc32c.h"
#include "kernel_backend.h"
#include "napi_args.h"
#include "sessions.h"
#include "uapi.h"
#include "worker.h"

namespace vfio {

namespace {

// Caps that keep one call's memory bounded whatever the caller asks for.
constexpr uint64_t kMaxBitmapBytes = 128ull << 20;  // a DMA dirty bitmap: 4 TiB of 4 KiB pages
constexpr uint32_t kMaxDmaRanges = 65536;           // the kernel takes 256 (LOG_MAX_RANGES)
constexpr double kMaxReadBytes = 16 << 20;          // one readData
constexpr uint32_t kMaxWriteParts = 1 << 20;        // buffers in one writeData

// Read buffers come from a pool of spent blocks (the migration layer reads
// in powers of two from 256 KiB to 4 MiB): a fresh block per read is an mmap
// plus a page fault per 4 KiB, a measurable share of a GB/s stream. Buffers
// return here from their JS finalizer. Process-wide (plain memory, any
// environment's finalizer may return one).
//
// Blocks of 64 KiB and more are mapped and unmapped directly, never malloc'd:
// glibc raises its mmap threshold to the size of the first mmapped block
// freed, after which a malloc'd 4 MiB block comes from the calling data
// thread's own arena, and blocks freed there stay resident (fragmented, never
// trimmed): the soak's two data-thread arenas grew to ~50 MiB each and RSS by
// 27-70% over 200 migrations. An unmapped block goes back to the kernel at
// once. The pool is capped in bytes, whatever the sizes: 64 MiB, because
// blocks come back in batches, at the GCs that V8 starts every 64 MiB of
// external memory (AdjustExternalMemory below); with 32 MiB a 1 GiB read
// faulted in 140-190 MiB of fresh blocks and took ~25% more CPU. Over the
// cap the oldest blocks go first, so blocks of a size no longer read cannot
// keep the pool full.
class ReadBufferPool {
 public:
  static constexpr size_t kMaxPooledBytes = 64u << 20;
  static uint8_t* Get(size_t n) {
    {
      std::lock_guard<std::mutex> l(mu_);
      // Newest first (at most 256 entries: the cap over the smallest size).
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->n != n) continue;
        uint8_t* p = it->p;
        free_.erase(std::next(it).base());
        pooled_bytes_ -= n;
        return p;
      }
    }
    if (!Mapped(n)) return static_cast<uint8_t*>(malloc(n));
    void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
  }
  static void Put(uint8_t* p, size_t n) {
    if (!Pooled(n)) return Release({p, n});
    bool pooled = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      try {  // Put runs in finalizers and destructors: nothing may escape
        free_.push_back({p, n});
        pooled_bytes_ += n;
        pooled = true;
      } catch (const std::bad_alloc&) {
        // no room for the entry: the block is released instead
      }
    }
    if (!pooled) return Release({p, n});
    for (;;) {  // over the cap: the oldest blocks go, unmapped outside the lock
      Block victim;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (pooled_bytes_ <= kMaxPooledBytes || free_.empty()) return;
        victim = free_.front();
        free_.pop_front();
        pooled_bytes_ -= victim.n;
      }
      Release(victim);
    }
  }

 private:
  struct Block {
    uint8_t* p = nullptr;
    size_t n = 0;
  };
  static bool Pooled(size_t n) { return n >= (256u << 10) && n <= (4u << 20) && (n & (n - 1)) == 0; }
  static bool Mapped(size_t n) { return n >= (64u << 10); }
  static void Release(Block b) {
    if (!b.p) return;
    if (Mapped(b.n)) munmap(b.p, b.n);
    else free(b.p);
  }
  static inline std::mutex mu_;
  static inline std::deque<Block> free_;  // oldest first
  static inline size_t pooled_bytes_ = 0;
};

}  // namespace

class NativeDevice;

// Per environment (the main thread and each worker_thread that loads the addon).
struct EnvState {
  bool tearing_down = false;
  std::set<NativeDevice*> devices;  // alive, for the cleanup hook
};

class NativeDevice : public Napi::ObjectWrap<NativeDevice> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeDevice",
                       {
                           M<&NativeDevice::OpenKernel>("openKernel"),
                           M<&NativeDevice::OpenBackend>("openBackend"),
                           M<&NativeDevice::Info>("info"),
                           M<&NativeDevice::MigrationFlags>("migrationFlags"),
                           M<&NativeDevice::GetState>("getState"),
                           M<&NativeDevice::SetState>("setState"),
                           M<&NativeDevice::PrecopyInfo>("precopyInfo"),
                           M<&NativeDevice::EnablePrecopyInfoV2>("enablePrecopyInfoV2"),
                           M<&NativeDevice::StopCopySize>("stopCopySize"),
                           M<&NativeDevice::Reset>("reset"),
                           M<&NativeDevice::DmaLoggingStart>("dmaLoggingStart"),
                           M<&NativeDevice::DmaLoggingStop>("dmaLoggingStop"),
                           M<&NativeDevice::DmaLoggingReport>("dmaLoggingReport"),
                           M<&NativeDevice::ReadData>("readData"),
                           M<&NativeDevice::WriteData>("writeData"),
                           M<&NativeDevice::CloseSession>("closeSession"),
                           M<&NativeDevice::OpenDataFds>("openDataFds"),
                           M<&NativeDevice::Close>("close"),
                       });
  }

  explicit NativeDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeDevice>(info) {
    env_state_ = *info.Env().GetInstanceData<std::shared_ptr<EnvState>>();
    env_state_->devices.insert(this);
  }

  ~NativeDevice() override {
    env_state_->devices.erase(this);
    // Collected without close(): no job is in flight (each holds a reference
    // to this object), so the workers are idle. Release on the control
    // thread, which then exits, so nothing blocks here. At environment
    // teardown the cleanup hook has done that already.
    if (control_ && !closing_ && !env_state_->tearing_down) {
      closing_ = true;
      Abandon(false);
    }
  }

  // Environment teardown (cleanup hook): no Node-API from here on. Waits for
  // the jobs running now (interrupted where the device can be): they may use
  // Buffers the isolate is about to free. A kernel ioctl in flight holds the
  // environment's exit up until it returns.
  void Teardown() {
    if (!control_ || *closed_) return;
    Abandon(true);
  }

 private:
  template <Napi::Value (NativeDevice::*Method)(const Napi::CallbackInfo&)>
  static Napi::ClassPropertyDescriptor<NativeDevice> M(const char* name) {
    return InstanceMethod<&NativeDevice::Guarded<Method>>(name);
  }
  template <Napi::Value (NativeDevice::*Method)(const Napi::CallbackInfo&)>
  Napi::Value Guarded(const Napi::CallbackInfo& info) {
    return Guard(info.Env(), "NativeDevice", [&] { return (this->*Method)(info); });
  }

  // Lets go of the device without Node-API: wakes sleeping calls, then ends
  // every session and closes the device on the control thread, after the
  // job it is running.
  void Abandon(bool wait) {
    auto backend = backend_;
    auto sessions = sessions_;
    if (backend) backend->Interrupt();
    data_->Abandon(nullptr, wait);
    control_->Abandon(
        [backend, sessions] {
          if (sessions) sessions->CloseAll();
          if (backend) backend->Close();
        },
        wait);
  }

  // What a job reports back: an errno and the failing step, or an error code
  // of our own (an exception on the worker).
  struct Result {
    int err = 0;
    std::string op;
    std::string code;
    std::string message;
  };

  enum class On { kControl, kData };

  static void Protect(Result& r, const std::function<void(Result&)>& exec, const char* what) {
    try {
      exec(r);
    } catch (const std::bad_alloc&) {
      r.code = "ERR_VFIO_NOMEM";
      r.err = ENOMEM;
      r.op = what;
      r.message = std::string("out of memory (") + what + ")";
    } catch (const std::exception& e) {
      r.code = "ERR_VFIO_INTERNAL";
      r.message = std::string(what) + ": " + e.what();
    } catch (...) {
      r.code = "ERR_VFIO_INTERNAL";
      r.message = std::string(what) + ": unknown C++ exception";
    }
  }

  Napi::Value Rejected(Napi::Env env, const Napi::Error& e) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Reject(e.Value());
    return d.Promise();
  }

  Napi::Error ClosedError(Napi::Env env, const std::string& what) {
    return Coded(env, "ERR_VFIO_CLOSED", closing_ ? "device is closed (" + what + ")" : "device is not open (" + what + ")");
  }

  // Runs `exec` on a worker; `resolve` builds the value on the JS thread.
  template <typename ResolveFn>
  Napi::Value Run(Napi::Env env, On on, const char* what, std::function<void(Result&)> exec, ResolveFn resolve) {
    if (!backend_ || closing_) return Rejected(env, ClosedError(env, what));
    auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
    auto res = std::make_shared<Result>();
    auto self_ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(Value()));
    (on == On::kData ? data_ : control_)->Submit(
        env, [exec, res, what] { Protect(*res, exec, what); },
        [this, deferred, res, resolve, self_ref, what](Napi::Env env) {
          Napi::HandleScope scope(env);
          try {
            if (!res->code.empty())
              deferred->Reject(Coded(env, res->code.c_str(), res->message, Kind::kError, res->err, res->op).Value());
            else if (res->err && closing_)
              deferred->Reject(Coded(env, "ERR_VFIO_CLOSED", std::string("device closed while ") + what + " ran (" +
                                                                 ErrnoName(res->err) + " from " + res->op + ")").Value());
            else if (res->err)
              deferred->Reject(MakeError(env, res->err, res->op).Value());
            else
              deferred->Resolve(resolve(env));
          } catch (const Napi::Error& e) {
            deferred->Reject(e.Value());
          } catch (const std::bad_alloc&) {
            deferred->Reject(NoMem(env, what).Value());
          } catch (const std::exception& e) {
            deferred->Reject(Coded(env, "ERR_VFIO_INTERNAL", std::string(what) + ": " + e.what()).Value());
          }
        });
    return deferred->Promise();
  }

  // A session id argument: an integer; ERR_VFIO_CLOSED for a session that
  // has ended.
  uint32_t SessionArg(const Napi::CallbackInfo& info, const char* what) {
    Napi::Env env = info.Env();
    if (!info[0].IsNumber()) throw BadType(env, std::string(what) + ": the session id must be a number");
    double d = info[0].As<Napi::Number>().DoubleValue();
    if (!(d >= 1 && d <= 4294967295.0) || std::floor(d) != d) throw BadRange(env, std::string(what) + ": not a session id: " + Fmt(d));
    uint32_t id = uint32_t(d);
    if (!backend_ || closing_) throw ClosedError(env, what);
    switch (sessions_->StatusOf(id)) {
      case SessionTable::Status::kUnknown:
        throw BadRange(env, std::string(what) + ": " + std::to_string(id) + " is not a data session of this device");
      case SessionTable::Status::kClosed:
        throw Coded(env, "ERR_VFIO_CLOSED", std::string(what) + ": data session " + std::to_string(id) + " is closed");
      default:
        return id;
    }
  }

  // Holds a session's fd for one job on a worker; -1 once it has ended.
  struct SessionUse {
    SessionUse(std::shared_ptr<SessionTable> t, uint32_t id) : table(std::move(t)), id(id), fd(table->Acquire(id)) {}
    ~SessionUse() {
      if (fd >= 0) table->Release(id);
    }
    bool Closed(Result& r, const char* what) {
      if (fd >= 0) return false;
      r.code = "ERR_VFIO_CLOSED";
      r.message = std::string(what) + ": data session " + std::to_string(id) + " is closed";
      return true;
    }
    std::shared_ptr<SessionTable> table;
    uint32_t id;
    int fd;
  };

  void StartWorkers(Napi::Env env) {
    control_ = Worker::Start(env, "vfio-control");
    data_ = Worker::Start(env, "vfio-data");
  }

  // Opens a backend on the control thread (a mock's content tables can take
  // a while to build; a kernel open makes blocking syscalls).
  struct Opened {
    std::shared_ptr<DeviceBackend> backend;
  };
  Napi::Value OpenOn(Napi::Env env, std::function<void(Opened&, Result&)> open,
                     std::function<Napi::Value(Napi::Env)> resolve) {
    StartWorkers(env);
    auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
    auto out = std::make_shared<Opened>();
    auto res = std::make_shared<Result>();
    auto self_ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(Value()));
    control_->Submit(
        env, [open, out, res] { Protect(*res, [&](Result& r) { open(*out, r); }, "open"); },
        [this, deferred, out, res, resolve, self_ref](Napi::Env env) {
          Napi::HandleScope scope(env);
          if (out->backend) {
            backend_ = out->backend;
            sessions_ = std::make_shared<SessionTable>(backend_);
          }
          try {
            if (!res->code.empty()) deferred->Reject(Coded(env, res->code.c_str(), res->message, Kind::kError, res->err, res->op).Value());
            else if (res->err) deferred->Reject(MakeError(env, res->err, res->op).Value());
            else if (closing_) deferred->Reject(ClosedError(env, "closed while opening").Value());
            else deferred->Resolve(resolve(env));
          } catch (const Napi::Error& e) {
            deferred->Reject(e.Value());
          }
        });
    return deferred->Promise();
  }

  // openBackend(carrier): a device whose backend another addon builds (the
  // mock's, mock-device/mock_addon.cc; see BackendFactory in backend.h). The
  // factory runs on this device's control thread.
  Napi::Value OpenBackend(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (control_) throw Coded(env, "ERR_VFIO_BAD_ARGUMENT", "openBackend: device already open");
    const char* what = "openBackend(backend): backend must be a backend object made by this build's backend addon";
    if (!info[0].IsObject()) throw BadType(env, what);
    Napi::Object carrier = info[0].As<Napi::Object>();
    const napi_type_tag tag{kBackendCarrierTagLower, kBackendCarrierTagUpper};
    if (!carrier.CheckTypeTag(&tag)) throw BadType(env, what);
    Napi::Value f = carrier.Get("factory");
    if (!f.IsExternal()) throw BadType(env, what);
    std::shared_ptr<BackendFactory> factory = *f.As<Napi::External<std::shared_ptr<BackendFactory>>>().Data();
    if (!factory) throw BadType(env, what);
    return OpenOn(
        env,
        [factory](Opened& o, Result& r) {
          o.backend = factory->Make(&r.err, &r.op);
          if (!o.backend && !r.err) {
            r.err = EINVAL;
            r.op = "openBackend: the backend addon built no device";
          }
        },
        [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value OpenKernel(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (control_) throw Coded(env, "ERR_VFIO_BAD_ARGUMENT", "openKernel: device already open");
    if (!info[0].IsString()) throw BadType(env, "openKernel(path, via): path must be a string");
    KernelOpenOptions opts{info[0].As<Napi::String>().Utf8Value(),
                           info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "auto"};
    return OpenOn(
        env,
        [opts](Opened& o, Result& r) { o.backend.reset(OpenKernelDevice(opts, &r.err, &r.op)); },
        [this](Napi::Env env) -> Napi::Value { return Napi::String::New(env, backend_->OpenPath()); });
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
    return Run(info.Env(), On::kControl, "migrationFlags",
               [b, flags](Result& r) {
                 r.err = b->GetMigrationFlags(flags.get());
                 r.op = "VFIO_DEVICE_FEATURE(GET MIGRATION)";
               },
               // Only the low flag bits are defined; a number stays exact.
               [flags](Napi::Env env) { return Napi::Number::New(env, double(*flags & 0xffffffffu)); });
  }

  Napi::Value GetState(const Napi::CallbackInfo& info) {
    auto b = backend_;
    auto st = std::make_shared<uint32_t>(0);
    return Run(info.Env(), On::kControl, "getState",
               [b, st](Result& r) {
                 r.err = b->GetState(st.get());
                 r.op = "VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE)";
               },
               [st](Napi::Env env) { return Napi::Number::New(env, *st); });
  }

  // setState(state) -> { id, fd } for the data session the SET opened, or
  // null. The fd number is informational: no call takes one.
  Napi::Value SetState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint32_t target = uint32_t(U64(info[0], "setState(state): state", 0xffffffffu));
    auto b = backend_;
    auto sessions = sessions_;
    struct Out { int fd = -1; uint32_t id = 0; };
    auto out = std::make_shared<Out>();
    return Run(env, On::kControl, "setState",
               [b, sessions, target, out](Result& r) {
                 r.err = b->SetState(target, &out->fd);
                 r.op = "VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE)";
                 // Owned by the table from here, even if nobody ever sees the completion.
                 if (out->fd >= 0) out->id = sessions->Add(out->fd);
               },
               [out](Napi::Env env) -> Napi::Value {
                 if (out->id == 0) return env.Null();
                 Napi::Object o = Napi::Object::New(env);
                 o.Set("id", Napi::Number::New(env, out->id));
                 o.Set("fd", Napi::Number::New(env, out->fd));
                 return o;
               });
  }

  Napi::Value PrecopyInfo(const Napi::CallbackInfo& info) {
    uint32_t id = SessionArg(info, "precopyInfo");
    auto b = backend_;
    auto sessions = sessions_;
    struct Out { uint64_t initial = 0, dirty = 0; bool reinit = false; };
    auto v = std::make_shared<Out>();
    return Run(info.Env(), On::kControl, "precopyInfo",
               [b, sessions, id, v](Result& r) {
                 SessionUse use(sessions, id);
                 if (use.Closed(r, "precopyInfo")) return;
                 r.err = b->GetPrecopyInfoV2(use.fd, &v->initial, &v->dirty, &v->reinit);
                 r.op = "VFIO_MIG_GET_PRECOPY_INFO";
               },
               [v](Napi::Env env) {
                 Napi::Object o = Napi::Object::New(env);
                 o.Set("initialBytes", Napi::BigInt::New(env, v->initial));
                 o.Set("dirtyBytes", Napi::BigInt::New(env, v->dirty));
                 o.Set("reinit", Napi::Boolean::New(env, v->reinit));
                 return o;
               });
  }

  // enablePrecopyInfoV2() -> true when the device fd opted in, false when
  // the kernel or driver lacks the feature (ENOTTY, EINVAL, EOPNOTSUPP);
  // any other errno rejects.
  Napi::Value EnablePrecopyInfoV2(const Napi::CallbackInfo& info) {
    auto b = backend_;
    auto ok = std::make_shared<bool>(false);
    return Run(info.Env(), On::kControl, "enablePrecopyInfoV2",
               [b, ok](Result& r) {
                 int err = b->EnablePrecopyInfoV2();
                 r.op = "VFIO_DEVICE_FEATURE(SET MIG_PRECOPY_INFOv2)";
                 if (err == ENOTTY || err == EINVAL || err == EOPNOTSUPP) return;
                 r.err = err;
                 *ok = err == 0;
               },
               [ok](Napi::Env env) { return Napi::Boolean::New(env, *ok); });
  }

  Napi::Value StopCopySize(const Napi::CallbackInfo& info) {
    auto b = backend_;
    auto v = std::make_shared<uint64_t>(0);
    return Run(info.Env(), On::kControl, "stopCopySize",
               [b, v](Result& r) {
                 r.err = b->GetStopCopySize(v.get());
                 r.op = "VFIO_DEVICE_FEATURE(GET MIG_DATA_SIZE)";
               },
               [v](Napi::Env env) { return Napi::BigInt::New(env, *v); });
  }

  Napi::Value Reset(const Napi::CallbackInfo& info) {
    auto b = backend_;
    return Run(info.Env(), On::kControl, "reset",
               [b](Result& r) {
                 r.err = b->Reset();
                 r.op = "VFIO_DEVICE_RESET";
               },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value DmaLoggingStart(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t page = U64(info[0], "dmaLoggingStart(pageSize, ranges): pageSize");
    if (!info[1].IsArray()) throw BadType(env, "dmaLoggingStart(pageSize, ranges): ranges must be an array");
    Napi::Array a = info[1].As<Napi::Array>();
    if (a.Length() > kMaxDmaRanges) throw BadRange(env, "dmaLoggingStart: at most " + std::to_string(kMaxDmaRanges) + " ranges");
    std::vector<DmaRange> ranges;
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Object r = ObjectAt(a, i, "dmaLoggingStart: ranges");
      ranges.push_back({U64(r.Get("iova"), "dmaLoggingStart: iova"), U64(r.Get("length"), "dmaLoggingStart: length")});
    }
    auto b = backend_;
    return Run(env, On::kControl, "dmaLoggingStart",
               [b, page, ranges](Result& r) {
                 r.err = b->DmaLoggingStart(page, ranges);
                 r.op = "VFIO_DEVICE_FEATURE(SET DMA_LOGGING_START)";
               },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value DmaLoggingStop(const Napi::CallbackInfo& info) {
    auto b = backend_;
    return Run(info.Env(), On::kControl, "dmaLoggingStop",
               [b](Result& r) {
                 r.err = b->DmaLoggingStop();
                 r.op = "VFIO_DEVICE_FEATURE(SET DMA_LOGGING_STOP)";
               },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value DmaLoggingReport(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t iova = U64(info[0], "dmaLoggingReport(iova, length, pageSize): iova");
    uint64_t len = U64(info[1], "dmaLoggingReport(iova, length, pageSize): length");
    uint64_t page = U64(info[2], "dmaLoggingReport(iova, length, pageSize): pageSize");
    // The bitmap is allocated before the ioctl: its size is checked here,
    // without overflow, whatever the backend then says about the arguments
    // (a page size of 0 is the kernel's EINVAL).
    if (page != 0) {
      uint64_t pages = len / page + (len % page != 0);
      uint64_t bytes = (pages / 64 + (pages % 64 != 0)) * 8;
      if (bytes > kMaxBitmapBytes)
        throw BadRange(env, "dmaLoggingReport: " + std::to_string(pages) + " pages of " + std::to_string(page) +
                                " bytes need a " + std::to_string(bytes) + "-byte bitmap, over the limit of " +
                                std::to_string(kMaxBitmapBytes) + " bytes (report a smaller range at a time)");
    }
    auto b = backend_;
    auto bm = std::make_shared<std::vector<uint64_t>>();
    return Run(env, On::kControl, "dmaLoggingReport",
               [b, iova, len, page, bm](Result& r) {
                 r.op = "VFIO_DEVICE_FEATURE(GET DMA_LOGGING_REPORT)";
                 if (page == 0) {
                   r.err = EINVAL;
                   return;
                 }
                 r.err = b->DmaLoggingReport(iova, len, page, bm.get());
               },
               [bm](Napi::Env env) {
                 return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<uint8_t*>(bm->data()), bm->size() * 8);
               });
  }

  // readData(session, maxBytes) -> { bytes, crc32c, readMs }, or null at the
  // end of a STOP_COPY stream. readMs: how long the read(2) itself took on
  // the data thread, the device's time without the event loop's. ENOMSG rejects: the temporary end of a PRE_COPY
  // stream. The CRC32C is taken on the data thread while the bytes are still
  // in its cache, so a sender's checksum costs the event loop nothing.
  Napi::Value ReadData(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[1].IsNumber()) throw BadType(env, "readData(session, maxBytes): maxBytes must be a number");
    double want = info[1].As<Napi::Number>().DoubleValue();
    if (!(want >= 1 && want <= kMaxSafeInteger) || std::floor(want) != want)
      throw BadRange(env, "readData(session, maxBytes): maxBytes must be a positive integer, got " + Fmt(want));
    size_t max = size_t(std::min(want, kMaxReadBytes));  // one read moves at most 16 MiB
    uint32_t id = SessionArg(info, "readData");
    auto b = backend_;
    auto sessions = sessions_;
    struct Out {
      uint8_t* data = nullptr;
      size_t max = 0;
      ssize_t n = 0;
      uint32_t crc = 0;
      double read_ms = 0;
      ~Out() {
        if (data) ReadBufferPool::Put(data, max);  // never handed to JS
      }
    };
    auto out = std::make_shared<Out>();
    out->max = max;
    return Run(env, On::kData, "readData",
               [b, sessions, id, out](Result& r) {
                 SessionUse use(sessions, id);
                 if (use.Closed(r, "readData")) return;
                 r.op = "read(data_fd)";
                 out->data = ReadBufferPool::Get(out->max);
                 if (!out->data) throw std::bad_alloc();
                 auto t0 = std::chrono::steady_clock::now();
                 ssize_t n = b->ReadData(use.fd, out->data, out->max);
                 out->read_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
                 if (n < 0) {
                   r.err = int(-n);
                   return;
                 }
                 out->n = n;
                 out->crc = Crc32c(out->data, size_t(n));
               },
               [out](Napi::Env env) -> Napi::Value {
                 if (out->n == 0) return env.Null();
                 // The JS Buffer views the first n bytes of a max-byte block.
                 size_t max = out->max;
                 Napi::Object result = Napi::Object::New(env);
                 // V8 is told about the block: it then collects spent read
                 // Buffers as they pile up, and their blocks come back to the
                 // pool (already faulted in) instead of every read faulting
                 // in a fresh one while the pool waits for a GC.
                 Napi::MemoryManagement::AdjustExternalMemory(env, int64_t(max));
                 Napi::Buffer<uint8_t> bytes = Napi::Buffer<uint8_t>::New(env, out->data, size_t(out->n),
                                                                          [max](Napi::Env env, uint8_t* p) {
                                                                            ReadBufferPool::Put(p, max);
                                                                            Napi::MemoryManagement::AdjustExternalMemory(env, -int64_t(max));
                                                                          });
                 out->data = nullptr;  // owned by the Buffer now
                 result.Set("bytes", bytes);
                 result.Set("crc32c", Napi::Number::New(env, out->crc));
                 result.Set("readMs", Napi::Number::New(env, out->read_ms));
                 return result;
               });
  }

  // writeData(session, buffer | buffer[], checks?) -> bytes written (all of
  // them, unless an error). An array is written in order, as one write job.
  Napi::Value WriteData(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<Napi::Buffer<uint8_t>> bufs;
    if (info[1].IsBuffer()) bufs.push_back(info[1].As<Napi::Buffer<uint8_t>>());
    else if (info[1].IsArray()) {
      Napi::Array a = info[1].As<Napi::Array>();
      if (a.Length() > kMaxWriteParts) throw BadRange(env, "writeData(session, buffers): at most " + std::to_string(kMaxWriteParts) + " buffers");
      for (uint32_t i = 0; i < a.Length(); i++) {
        Napi::Value v = a.Get(i);
        if (!v.IsBuffer()) throw BadType(env, "writeData(session, buffers): every element must be a Buffer");
        bufs.push_back(v.As<Napi::Buffer<uint8_t>>());
      }
    } else throw BadType(env, "writeData(session, data): data must be a Buffer or an array of Buffers");
    struct Part { const uint8_t* data; size_t len; };
    auto parts = std::make_shared<std::vector<Part>>();
    auto keep = std::make_shared<std::vector<Napi::Reference<Napi::Buffer<uint8_t>>>>();
    // Optional checks: [parts0, crc0, parts1, crc1, ...]: each run of parts
    // must have that CRC32C, verified here on the data thread right before
    // the run is written (the device then reads bytes still in cache); a
    // mismatch is EBADMSG and nothing of that run reaches the device.
    struct CheckedRun { size_t parts; uint32_t crc; };
    auto runs = std::make_shared<std::vector<CheckedRun>>();
    if (info.Length() > 2 && !info[2].IsUndefined()) {
      if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
        throw BadType(env, "writeData(session, data, checks): checks must be a Uint32Array of [parts, crc32c] pairs");
      Napi::Uint32Array c = info[2].As<Napi::Uint32Array>();
      if (c.ElementLength() % 2 != 0) throw BadRange(env, "writeData(session, data, checks): checks must be [parts, crc32c] pairs");
      uint64_t covered = 0;
      for (size_t i = 0; i + 1 < c.ElementLength(); i += 2) {
        if (c[i] == 0) throw BadRange(env, "writeData(session, data, checks): a run must have at least one part");
        runs->push_back({c[i], c[i + 1]});
        covered += c[i];
      }
      if (covered != bufs.size()) throw BadRange(env, "writeData(session, data, checks): the runs must cover every buffer exactly once");
    }
    uint32_t id = SessionArg(info, "writeData");
    for (auto& b : bufs) {
      parts->push_back({b.Data(), b.Length()});
      keep->push_back(Napi::Persistent(b));
    }
    auto b = backend_;
    auto sessions = sessions_;
    auto written = std::make_shared<size_t>(0);
    return Run(env, On::kData, "writeData",
               [b, sessions, id, parts, runs, written](Result& r) {
                 SessionUse use(sessions, id);
                 if (use.Closed(r, "writeData")) return;
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
                     ssize_t n = b->WriteData(use.fd, p.data + done, p.len - done);
                     if (n < 0) { r.err = int(-n); r.op = "write(data_fd)"; return; }
                     if (n == 0) { r.err = EIO; r.op = "write(data_fd) made no progress"; return; }
                     done += size_t(n);
                     *written += size_t(n);
                   }
                 }
               },
               [written, keep](Napi::Env env) { return Napi::Number::New(env, double(*written)); });
  }

  // closeSession(session): closes its data fd on the data thread, after the
  // reads and writes queued before it. Idempotent.
  Napi::Value CloseSession(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsNumber()) throw BadType(env, "closeSession(session): the session id must be a number");
    double d = info[0].As<Napi::Number>().DoubleValue();
    if (!(d >= 1 && d <= 4294967295.0) || std::floor(d) != d) throw BadRange(env, "closeSession(session): not a session id: " + Fmt(d));
    uint32_t id = uint32_t(d);
    if (!backend_ || closing_) {  // the device's close ends every session
      auto p = Napi::Promise::Deferred::New(env);
      p.Resolve(env.Undefined());
      return p.Promise();
    }
    if (sessions_->StatusOf(id) == SessionTable::Status::kUnknown)
      throw BadRange(env, "closeSession: " + std::to_string(id) + " is not a data session of this device");
    auto sessions = sessions_;
    return Run(env, On::kData, "closeSession", [sessions, id](Result&) { sessions->End(id); },
               [](Napi::Env env) { return env.Undefined(); });
  }

  Napi::Value OpenDataFds(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Array a = Napi::Array::New(env);
    if (!sessions_) return a;
    uint32_t i = 0;
    for (int fd : sessions_->OpenFds()) a.Set(i++, Napi::Number::New(env, fd));
    return a;
  }

  // close(): wakes calls sleeping in the device (a mock's arc latency or rate
  // cap), lets the calls queued before it finish, ends every data session,
  // then closes the device. Idempotent; calls after it are ERR_VFIO_CLOSED.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
    if (closing_ || !control_) {
      closing_ = true;
      if (close_promise_) return close_promise_->Value();
      deferred->Resolve(env.Undefined());
      return deferred->Promise();
    }
    closing_ = true;
    close_promise_ = std::make_shared<Napi::Reference<Napi::Promise>>(Napi::Persistent(deferred->Promise()));
    if (backend_) backend_->Interrupt();
    auto control = control_;
    auto data = data_;
    auto self_ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(Value()));
    auto state = env_state_;
    auto closed = closed_;
    // 1. control: after every queued control call (a SET's new fd is then in the table);
    // 2. data: after every queued read/write, end every session;
    // 3. control: close the device; then both threads let go of Node-API.
    control->Submit(env, [] {}, [this, control, data, deferred, self_ref, state, closed](Napi::Env env) {
      auto sessions = sessions_;
      auto b = backend_;
      data->Submit(env, [sessions] { if (sessions) sessions->CloseAll(); }, [b, control, data, deferred, self_ref, state, closed](Napi::Env env) {
        control->Submit(env, [b] { if (b) b->Close(); }, [control, data, deferred, self_ref, state, closed](Napi::Env env) {
          auto remaining = std::make_shared<int>(2);
          auto finalized = [remaining, deferred, self_ref, state, closed](Napi::Env env) {
            if (--*remaining) return;
            *closed = true;
            if (state->tearing_down) return;
            Napi::HandleScope scope(env);
            deferred->Resolve(env.Undefined());
          };
          control->Shutdown(env, finalized);
          data->Shutdown(env, finalized);
        });
      });
    });
    return deferred->Promise();
  }

  std::shared_ptr<EnvState> env_state_;
  std::shared_ptr<DeviceBackend> backend_;
  std::shared_ptr<SessionTable> sessions_;
  std::shared_ptr<Worker> control_, data_;
  std::shared_ptr<Napi::Reference<Napi::Promise>> close_promise_;
  bool closing_ = false;
  std::shared_ptr<bool> closed_ = std::make_shared<bool>(false);  // close() finished
};

namespace {

Napi::Value NextStateJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t cur = uint32_t(U64(info[0], "nextState(current, target, flags): current", 0xffffffffu));
  uint32_t target = uint32_t(U64(info[1], "nextState(current, target, flags): target", 0xffffffffu));
  uint64_t flags = U64(info[2], "nextState(current, target, flags): flags");
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
  set("VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2", kFeatureMigPrecopyInfoV2);  // after 6.12
  set("VFIO_PRECOPY_INFO_REINIT", kPrecopyInfoReinit);                      // after 6.12
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

// The state machine as data (uapi.h's tables): what src/vfio/states.ts and
// the arc planner derive their helpers from, so nothing restates it.
Napi::Object StateFacts(Napi::Env env) {
  using namespace vfio_uapi;
  Napi::Object o = Napi::Object::New(env);
  Napi::Array states = Napi::Array::New(env, kNumStates);
  for (uint32_t i = 0; i < kNumStates; i++) {
    const StateFact& f = kStateFacts[i];
    Napi::Object s = Napi::Object::New(env);
    s.Set("value", Napi::Number::New(env, f.state));
    s.Set("name", Napi::String::New(env, f.name));
    // ERROR's "all bits" does not fit a number exactly: null = never requestable.
    s.Set("needs", f.needs == ~0ull ? env.Null() : Napi::Value(Napi::Number::New(env, double(f.needs))));
    s.Set("always", Napi::Boolean::New(env, f.always));
    s.Set("saving", Napi::Boolean::New(env, f.saving));
    s.Set("precopy", Napi::Boolean::New(env, f.precopy));
    s.Set("p2pQuiesced", Napi::Boolean::New(env, f.p2p_quiesced));
    states.Set(i, s);
  }
  o.Set("states", states);
  Napi::Array flags = Napi::Array::New(env);
  for (const FlagFact& f : kFlagFacts) {
    Napi::Object x = Napi::Object::New(env);
    x.Set("key", Napi::String::New(env, f.key));
    x.Set("name", Napi::String::New(env, f.name));
    x.Set("bit", Napi::Number::New(env, double(f.bit)));
    flags.Set(flags.Length(), x);
  }
  o.Set("flags", flags);
  Napi::Array next = Napi::Array::New(env, kNumStates);
  for (uint32_t from = 0; from < kNumStates; from++) {
    Napi::Array row = Napi::Array::New(env, kNumStates);
    for (uint32_t to = 0; to < kNumStates; to++) row.Set(to, Napi::Number::New(env, kNextStateTable[from][to]));
    next.Set(from, row);
  }
  o.Set("next", next);
  Napi::Array arcs = Napi::Array::New(env);
  for (const DataFdArc& a : kDataFdArcs) {
    Napi::Object x = Napi::Object::New(env);
    x.Set("from", Napi::Number::New(env, a.from));
    x.Set("to", Napi::Number::New(env, a.to));
    x.Set("direction", Napi::String::New(env, a.save ? "save" : "resume"));
    arcs.Set(arcs.Length(), x);
  }
  o.Set("dataFdArcs", arcs);
  return o;
}

// dupSocketFd(fd) -> a close-on-exec duplicate of a socket fd: lets the
// migration layer re-wrap an accepted connection in a net.Socket that reads
// into its own large buffers (net.Server cannot). fcntl does not block.
Napi::Value DupSocketFdJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "dupSocketFd(fd): fd must be a number");
  double d = info[0].As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 2147483647.0) || std::floor(d) != d) throw MakeError(env, EBADF, "dupSocketFd: not an fd: " + Fmt(d));
  int fd = int(d);
  int type = 0;
  socklen_t len = sizeof type;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) throw MakeError(env, errno, "getsockopt(SO_TYPE) in dupSocketFd");
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw MakeError(env, errno, "fcntl(F_DUPFD_CLOEXEC) in dupSocketFd");
  return Napi::Number::New(env, copy);
}

template <Napi::Value (*Fn)(const Napi::CallbackInfo&)>
Napi::Value Guarded(const Napi::CallbackInfo& info) {
  return Guard(info.Env(), "vfio addon", [&] { return Fn(info); });
}

}  // namespace

Napi::Value Crc32cJs(const Napi::CallbackInfo& info);
void InitCrc32c();

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  PinThisLibrary(reinterpret_cast<const void*>(&Init));  // detached data threads outlive a worker's unload: see pin_library.h
  InitCrc32c();
  // Everything an environment owns hangs off its instance data; the cleanup
  // hook runs while Node-API still works, before the environment's threads
  // and handles go away.
  auto state = std::make_shared<EnvState>();
  env.SetInstanceData(new std::shared_ptr<EnvState>(state));
  env.AddCleanupHook([state] {
    state->tearing_down = true;
    std::set<NativeDevice*> devices = state->devices;
    for (NativeDevice* d : devices) d->Teardown();
  });
  exports.Set("crc32c", Napi::Function::New(env, Guarded<Crc32cJs>));
  exports.Set("NativeDevice", NativeDevice::Init(env));
  exports.Set("nextState", Napi::Function::New(env, Guarded<NextStateJs>));
  exports.Set("dupSocketFd", Napi::Function::New(env, Guarded<DupSocketFdJs>));
  exports.Set("uapi", UapiNumbers(env));
  exports.Set("stateFacts", StateFacts(env));
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
