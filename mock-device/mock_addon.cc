// The mock device's own addon (vfio_migration_mock): loaded only by
// 'vfio-migration/testing' and the CLI's --mock, never by the production
// addon, which carries no mock code. It builds a mock backend and hands it to
// the production addon's device machinery (workers, sessions, errors) as a
// BackendFactory carrier (native/backend.h): one copy of that machinery, and
// this file is the whole C++ surface between the two.
//
//   new MockHandle(profile, seed)  a carrier for NativeDevice.openBackend();
//                                  the profile is parsed and checked here
//   handle.info()                  digests and counters (after the open)
//   checkMockProfile(profile)      throws what new MockHandle would
//   mockProfileSchema              the profile's fields and limits
#include <napi.h>

#include <atomic>
#include <mutex>
#include <new>

#include "../native/backend.h"
#include "../native/napi_args.h"
#include "../native/pin_library.h"
#include "mock_device.h"
#include "mtty_mock.h"
#include "profile_napi.h"

namespace vfio {

namespace {

// The device, once the production addon's control thread has built it;
// shared by the factory (which builds it) and the JS handle (info()).
struct MockSlot {
  std::mutex mu;
  std::shared_ptr<MockDevice> mock;
  std::shared_ptr<MttyMockDevice> mtty;
};

class MockFactory : public BackendFactory {
 public:
  MockFactory(MockProfile profile, uint64_t seed, std::shared_ptr<MockSlot> slot)
      : profile_(std::move(profile)), seed_(seed), slot_(std::move(slot)) {}

  std::shared_ptr<DeviceBackend> Make(int* err, std::string* op) override {
    if (made_.exchange(true)) {
      *err = EBUSY;
      *op = "openBackend: this mock device was opened already";
      return nullptr;
    }
    // Built outside the lock: a large profile's tables take a while, and
    // info() on the JS thread must not wait for them.
    if (profile_.driver == "mtty") {
      auto d = std::make_shared<MttyMockDevice>(profile_.ports, seed_);
      std::lock_guard<std::mutex> l(slot_->mu);
      slot_->mtty = d;
      return d;
    }
    auto d = std::make_shared<MockDevice>(std::move(profile_), seed_);
    std::lock_guard<std::mutex> l(slot_->mu);
    slot_->mock = d;
    return d;
  }

 private:
  MockProfile profile_;
  uint64_t seed_;
  std::shared_ptr<MockSlot> slot_;
  std::atomic<bool> made_{false};
};

class MockHandle : public Napi::ObjectWrap<MockHandle> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "MockHandle", {InstanceMethod<&MockHandle::InfoJs>("info")});
  }

  explicit MockHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MockHandle>(info) {
    Napi::Env env = info.Env();
    Guard(env, "MockHandle", [&]() -> Napi::Value {
      if (!info.IsConstructCall()) throw BadType(env, "MockHandle(profile, seed) must be called with new");
      if (!info[0].IsObject()) throw BadType(env, "MockHandle(profile, seed): profile must be an object");
      MockProfile profile = ParseMockProfile(info[0].As<Napi::Object>());
      uint64_t seed = U64(info[1], "MockHandle(profile, seed): seed");
      auto factory = std::make_shared<MockFactory>(std::move(profile), seed, slot_);
      Napi::Object self = info.This().As<Napi::Object>();
      const napi_type_tag tag{kBackendCarrierTagLower, kBackendCarrierTagUpper};
      self.TypeTag(&tag);
      auto* held = new std::shared_ptr<BackendFactory>(std::move(factory));
      auto ext = Napi::External<std::shared_ptr<BackendFactory>>::New(env, held, [](Napi::Env, std::shared_ptr<BackendFactory>* p) { delete p; });
      // Read-only and fixed: nothing in JS can swap the factory for another External.
      self.DefineProperty(Napi::PropertyDescriptor::Value("factory", ext, napi_default));
      return env.Undefined();
    });
  }

 private:
  Napi::Value InfoJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guard(env, "mockInfo", [&]() -> Napi::Value {
      MockInfo m;
      {
        std::lock_guard<std::mutex> l(slot_->mu);
        if (!slot_->mock && !slot_->mtty) throw Coded(env, "ERR_VFIO_BAD_ARGUMENT", "mockInfo() is only available on open mock devices");
        m = slot_->mtty ? slot_->mtty->Info() : slot_->mock->Info();
      }
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
    });
  }

  std::shared_ptr<MockSlot> slot_ = std::make_shared<MockSlot>();
};

Napi::Value CheckMockProfileJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guard(env, "checkMockProfile", [&]() -> Napi::Value {
    if (!info[0].IsObject()) throw BadType(env, "checkMockProfile(profile): profile must be an object");
    ParseMockProfile(info[0].As<Napi::Object>());
    return env.Undefined();
  });
}

}  // namespace

Napi::Object InitMock(Napi::Env env, Napi::Object exports) {
  PinThisLibrary(reinterpret_cast<const void*>(&InitMock));  // see pin_library.h
  exports.Set("MockHandle", MockHandle::Init(env));
  exports.Set("checkMockProfile", Napi::Function::New(env, CheckMockProfileJs));
  exports.Set("mockProfileSchema", MockProfileSchema(env));
  return exports;
}

}  // namespace vfio

static Napi::Object InitMockAddon(Napi::Env env, Napi::Object exports) { return vfio::InitMock(env, exports); }

NODE_API_MODULE(vfio_migration_mock, InitMockAddon)
