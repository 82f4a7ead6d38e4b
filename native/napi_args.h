// Argument checks and typed errors shared by the addons (the production
// addon, native/addon.cc, and the mock's, mock-device/mock_addon.cc): every
// value from JS is type- and range-checked before any conversion, and every
// error carries a code.
#pragma once

#include <napi.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>

namespace vfio {

constexpr double kMaxSafeInteger = 9007199254740991.0;

inline const char* ErrnoName(int e) {
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

inline Napi::Error MakeError(Napi::Env env, int err, const std::string& op) {
  std::string msg = std::string(ErrnoName(err)) + ": " + strerror(err) + " (" + op + ")";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("operation", Napi::String::New(env, op));
  return e;
}

// Errors of our own: ERR_VFIO_BAD_ARGUMENT (TypeError or RangeError),
// ERR_VFIO_PROFILE, ERR_VFIO_CLOSED, ERR_VFIO_NOMEM (errno ENOMEM), ERR_VFIO_INTERNAL.
enum class Kind { kError, kType, kRange };
inline Napi::Error Coded(Napi::Env env, const char* code, const std::string& msg, Kind kind = Kind::kError, int err = 0,
                  const std::string& op = "") {
  Napi::Error e = kind == Kind::kType    ? Napi::Error(Napi::TypeError::New(env, msg))
                  : kind == Kind::kRange ? Napi::Error(Napi::RangeError::New(env, msg))
                                         : Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  if (err) e.Set("errno", Napi::Number::New(env, err));
  if (!op.empty()) e.Set("operation", Napi::String::New(env, op));
  return e;
}
inline Napi::Error BadType(Napi::Env env, const std::string& msg) { return Coded(env, "ERR_VFIO_BAD_ARGUMENT", msg, Kind::kType); }
inline Napi::Error BadRange(Napi::Env env, const std::string& msg) { return Coded(env, "ERR_VFIO_BAD_ARGUMENT", msg, Kind::kRange); }
inline Napi::Error NoMem(Napi::Env env, const std::string& op) {
  return Coded(env, "ERR_VFIO_NOMEM", "out of memory (" + op + ")", Kind::kError, ENOMEM, op);
}

inline std::string Fmt(double d) {
  char b[32];
  snprintf(b, sizeof b, "%.17g", d);
  return b;
}

// A non-negative integer argument: a bigint below 2^64, or a number that is
// a safe integer. Anything else is an error before any cast.
inline uint64_t U64(const Napi::Value& v, const std::string& what, uint64_t max = UINT64_MAX) {
  Napi::Env env = v.Env();
  uint64_t out;
  if (v.IsBigInt()) {
    bool lossless = false;
    out = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw BadRange(env, what + " must be a bigint in [0, 2^64)");
  } else if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= kMaxSafeInteger) || std::floor(d) != d)
      throw BadRange(env, what + " must be an integer in [0, 2^53), got " + Fmt(d));
    out = uint64_t(d);
  } else {
    throw BadType(env, what + " must be a number or bigint");
  }
  if (out > max) throw BadRange(env, what + " must be at most " + std::to_string(max) + ", got " + std::to_string(out));
  return out;
}

inline Napi::Object ObjectAt(const Napi::Array& a, uint32_t i, const char* what) {
  Napi::Value v = a.Get(i);
  if (!v.IsObject()) throw BadType(a.Env(), std::string(what) + "[" + std::to_string(i) + "] must be an object");
  return v.As<Napi::Object>();
}

// Calls from JS never let a C++ exception escape into Node (that would
// terminate the process): Napi errors are thrown as they are, anything else
// becomes a typed error.
template <typename Fn>
inline Napi::Value Guard(Napi::Env env, const char* what, Fn&& fn) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw NoMem(env, what);
  } catch (const std::exception& e) {
    throw Coded(env, "ERR_VFIO_INTERNAL", std::string(what) + ": " + e.what());
  }
}

}  // namespace vfio
