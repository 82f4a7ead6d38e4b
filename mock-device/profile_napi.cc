#include "profile_napi.h"

#include <cmath>
#include <string>

#include "../native/napi_args.h"

namespace vfio {

namespace {

Napi::Error ProfileError(Napi::Env env, const std::string& msg) {
  return Coded(env, "ERR_VFIO_PROFILE", "mock profile: " + msg, Kind::kRange);
}

// A finite number in [lo, hi]; `dflt` when undefined.
double Num(const Napi::Object& o, const char* field, double dflt, double lo, double hi) {
  Napi::Value v = o.Get(field);
  if (v.IsUndefined()) return dflt;
  if (!v.IsNumber()) throw BadType(o.Env(), std::string("mock profile: ") + field + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d > hi) throw ProfileError(o.Env(), std::string(field) + " must be at most " + Fmt(hi) + ", got " + Fmt(d));
  if (!(d >= lo)) throw ProfileError(o.Env(), std::string(field) + " must be at least " + Fmt(lo) + ", got " + Fmt(d));
  return d;
}

// An integer in [lo, hi] (|lo|, |hi| <= 2^53); `dflt` when undefined.
int64_t Int(const Napi::Object& o, const char* field, int64_t dflt, int64_t lo, int64_t hi) {
  Napi::Value v = o.Get(field);
  if (v.IsUndefined()) return dflt;
  double d = Num(o, field, 0, double(lo), double(hi));
  if (std::floor(d) != d) throw ProfileError(o.Env(), std::string(field) + " must be an integer, got " + Fmt(d));
  return int64_t(d);
}

bool Bool(const Napi::Object& o, const char* field, bool dflt) {
  Napi::Value v = o.Get(field);
  if (v.IsUndefined()) return dflt;
  if (!v.IsBoolean()) throw BadType(o.Env(), std::string("mock profile: ") + field + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// One table-driven field, by the member's type.
void Field(const Napi::Object& o, const MockFieldSpec& f, uint64_t& out) {
  if (f.required && o.Get(f.name).IsUndefined()) throw ProfileError(o.Env(), std::string(f.name) + " is required");
  if (f.kind == MockFieldKind::kU64) {
    if (!o.Get(f.name).IsUndefined()) out = U64(o.Get(f.name), std::string("mock profile: ") + f.name);
    return;
  }
  out = uint64_t(Int(o, f.name, int64_t(f.dflt), int64_t(f.min), int64_t(f.max)));
}
void Field(const Napi::Object& o, const MockFieldSpec& f, uint32_t& out) {
  uint64_t v = out;
  Field(o, f, v);
  out = uint32_t(v);  // the spec's max fits
}
void Field(const Napi::Object& o, const MockFieldSpec& f, int64_t& out) { out = Int(o, f.name, int64_t(f.dflt), int64_t(f.min), int64_t(f.max)); }
void Field(const Napi::Object& o, const MockFieldSpec& f, double& out) { out = Num(o, f.name, f.dflt, f.min, f.max); }
void Field(const Napi::Object& o, const MockFieldSpec& f, bool& out) { out = Bool(o, f.name, f.dflt != 0); }
void Field(const Napi::Object& o, const MockFieldSpec& f, std::optional<uint64_t>& out) {
  if (!o.Get(f.name).IsUndefined()) out = U64(o.Get(f.name), std::string("mock profile: ") + f.name);
}

const char* KindName(MockFieldKind k) {
  switch (k) {
    case MockFieldKind::kBytes: return "bytes";
    case MockFieldKind::kRate: return "rate";
    case MockFieldKind::kMs: return "ms";
    case MockFieldKind::kBool: return "bool";
    case MockFieldKind::kOffset: return "offset";
    case MockFieldKind::kU64: return "u64";
  }
  return "?";
}

}  // namespace

MockProfile ParseMockProfile(const Napi::Object& o) {
  Napi::Env env = o.Env();
  MockProfile p;
  Napi::Value name = o.Get("name");
  if (!name.IsString()) throw BadType(env, "mock profile: name must be a string");
  p.name = name.As<Napi::String>().Utf8Value();
  if (o.Get("driver").IsString()) p.driver = o.Get("driver").As<Napi::String>().Utf8Value();
  if (p.driver != "generic" && p.driver != "mtty") throw ProfileError(env, "driver must be \"generic\" or \"mtty\"");
  p.ports = uint32_t(Int(o, "ports", 2, 1, 2));
  if (p.driver == "mtty") return p;  // the mtty personality uses nothing else

  p.flags = U64(o.Get("flags"), "mock profile: flags", 7);
  size_t i = 0;
#define VFIO_MOCK_FIELD_PARSE(member, type, name, input, kind, required, dflt, lo, hi) Field(o, kMockProfileFields[i++], p.member);
  VFIO_MOCK_PROFILE_FIELDS(VFIO_MOCK_FIELD_PARSE)
#undef VFIO_MOCK_FIELD_PARSE

  // Rules between fields.
  if (p.chunk_bytes % 8 != 0) throw ProfileError(env, "chunkBytes must be a multiple of 8, got " + std::to_string(p.chunk_bytes));
  if (p.state_bytes == 0 || p.state_bytes % p.chunk_bytes != 0)
    throw ProfileError(env, "stateBytes must be a non-zero multiple of chunkBytes (" + std::to_string(p.chunk_bytes) + "), got " + std::to_string(p.state_bytes));
  if (p.state_bytes / p.chunk_bytes > kMockMaxChunks)
    throw ProfileError(env, "stateBytes is " + std::to_string(p.state_bytes / p.chunk_bytes) + " chunks of " + std::to_string(p.chunk_bytes) +
                                " bytes; at most " + std::to_string(kMockMaxChunks) + " chunks (use a larger chunkBytes)");
  if (p.dirty_working_set_bytes > p.state_bytes)
    throw ProfileError(env, "dirtyWorkingSetBytes must not exceed stateBytes (" + std::to_string(p.state_bytes) + ")");
  if (p.max_bytes_per_sec != 0 && p.max_bytes_per_sec < kMockMinBytesPerSec)
    throw ProfileError(env, "maxBytesPerSec must be 0 (no cap) or at least " + std::to_string(uint64_t(kMockMinBytesPerSec)) + ", got " + Fmt(p.max_bytes_per_sec));

  for (auto& row : p.arc_latency_ms)
    for (double& v : row) v = -1;
  Napi::Value arcs = o.Get("arcLatencies");
  if (!arcs.IsUndefined()) {
    if (!arcs.IsArray()) throw BadType(env, "mock profile: arcLatencies must be an array");
    Napi::Array a = arcs.As<Napi::Array>();
    if (a.Length() > kMockMaxListEntries) throw ProfileError(env, "at most " + std::to_string(kMockMaxListEntries) + " arcLatencies");
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Object e = ObjectAt(a, i, "arcLatencies");
      uint32_t from = uint32_t(Int(e, "from", 0, 0, 7)), to = uint32_t(Int(e, "to", 0, 0, 7));
      p.arc_latency_ms[from][to] = Num(e, "ms", 0, 0, kMockMaxDelayMs);
    }
  }
  Napi::Value faults = o.Get("faults");
  if (!faults.IsUndefined()) {
    if (!faults.IsArray()) throw BadType(env, "mock profile: faults must be an array");
    Napi::Array a = faults.As<Napi::Array>();
    if (a.Length() > kMockMaxListEntries) throw ProfileError(env, "faults must have at most " + std::to_string(kMockMaxListEntries) + " entries");
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Object f = ObjectAt(a, i, "faults");
      p.faults.push_back({uint32_t(Int(f, "from", 0, 0, 7)), uint32_t(Int(f, "to", 0, 0, 7)), int(Int(f, "errno", EIO, 1, 4095)),
                          Bool(f, "intoError", false), Int(f, "times", -1, -1, int64_t(kMaxSafeInteger))});
    }
  }
  return p;
}

Napi::Object MockProfileSchema(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  Napi::Array fields = Napi::Array::New(env);
  for (const MockFieldSpec& f : kMockProfileFields) {
    Napi::Object x = Napi::Object::New(env);
    x.Set("name", f.name);
    x.Set("input", f.input);
    x.Set("kind", KindName(f.kind));
    x.Set("required", Napi::Boolean::New(env, f.required));
    bool u64 = f.kind == MockFieldKind::kU64;
    x.Set("default", u64 ? env.Null() : f.kind == MockFieldKind::kBool ? Napi::Value(Napi::Boolean::New(env, f.dflt != 0)) : Napi::Value(Napi::Number::New(env, f.dflt)));
    x.Set("min", u64 ? env.Null() : Napi::Value(Napi::Number::New(env, f.min)));
    x.Set("max", u64 ? env.Null() : Napi::Value(Napi::Number::New(env, f.max)));
    fields.Set(fields.Length(), x);
  }
  o.Set("fields", fields);
  Napi::Object limits = Napi::Object::New(env);
  limits.Set("maxStateBytes", Napi::Number::New(env, double(kMockMaxStateBytes)));
  limits.Set("maxChunks", Napi::Number::New(env, double(kMockMaxChunks)));
  limits.Set("minChunkBytes", Napi::Number::New(env, kMockMinChunkBytes));
  limits.Set("maxChunkBytes", Napi::Number::New(env, kMockMaxChunkBytes));
  limits.Set("maxDelayMs", Napi::Number::New(env, kMockMaxDelayMs));
  limits.Set("maxLoadMsPerMiB", Napi::Number::New(env, kMockMaxLoadMsPerMiB));
  limits.Set("minMaxBytesPerSec", Napi::Number::New(env, kMockMinBytesPerSec));
  limits.Set("maxFaults", Napi::Number::New(env, kMockMaxListEntries));
  o.Set("limits", limits);
  return o;
}

}  // namespace vfio
