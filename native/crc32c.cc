// CRC32C (Castagnoli) for the migration wire format: the SSE4.2 instruction
// where the CPU has it (~10+ GB/s, cheap enough to run on the JS thread),
// else slicing-by-8 tables.
#include "crc32c.h"

#include <napi.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace vfio {

namespace {

uint32_t g_table[8][256];

void InitTables() {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
    g_table[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++)
    for (int t = 1; t < 8; t++) g_table[t][i] = (g_table[t - 1][i] >> 8) ^ g_table[0][g_table[t - 1][i] & 0xff];
}

uint32_t Crc32cTable(uint32_t crc, const uint8_t* p, size_t n) {
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    v ^= crc;
    crc = g_table[7][v & 0xff] ^ g_table[6][(v >> 8) & 0xff] ^ g_table[5][(v >> 16) & 0xff] ^ g_table[4][(v >> 24) & 0xff] ^
          g_table[3][(v >> 32) & 0xff] ^ g_table[2][(v >> 40) & 0xff] ^ g_table[1][(v >> 48) & 0xff] ^ g_table[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ g_table[0][(crc ^ *p++) & 0xff];
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t Crc32cHw(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = uint32_t(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}
#endif

bool g_hw = false;

}  // namespace

uint32_t Crc32c(const uint8_t* p, size_t n, uint32_t previous) {
  uint32_t crc = ~previous;
#if defined(__x86_64__)
  if (g_hw) return ~Crc32cHw(crc, p, n);
#endif
  return ~Crc32cTable(crc, p, n);
}

void InitCrc32c() {
  InitTables();
#if defined(__x86_64__)
  __builtin_cpu_init();
  g_hw = __builtin_cpu_supports("sse4.2");
#endif
}

Napi::Value Crc32cJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "crc32c(data, previous?): data must be a Buffer or Uint8Array");
  Napi::Uint8Array a = info[0].As<Napi::Uint8Array>();
  uint32_t previous = info[1].IsNumber() ? info[1].As<Napi::Number>().Uint32Value() : 0;
  return Napi::Number::New(env, Crc32c(a.Data(), a.ByteLength(), previous));
}

}  // namespace vfio
