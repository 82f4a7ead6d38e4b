// CRC32C (Castagnoli) for the migration wire format: the SSE4.2 instruction
// where the CPU has it (three streams at once, cheap enough to run on the JS
// thread), else slicing-by-8 tables.
#include "crc32c.h"

#include <napi.h>

#include <cstdint>
#include <cstring>
#include <mutex>

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
// The crc32 instruction has a 3-cycle latency but issues every cycle, so one
// stream runs at a third of its speed. Three streams over adjacent blocks run
// at full speed; their CRCs are then combined by shifting a CRC over a block
// of zeros, which for a fixed block size is four table lookups (the method
// of Mark Adler's crc32c.c).
constexpr size_t kLongBlock = 8192;
constexpr size_t kShortBlock = 256;
uint32_t g_shift_long[4][256];
uint32_t g_shift_short[4][256];

uint32_t Gf2Times(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec; vec >>= 1, mat++)
    if (vec & 1) sum ^= *mat;
  return sum;
}

void Gf2Square(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; n++) square[n] = Gf2Times(mat, mat[n]);
}

// The operator that feeds `bytes` zero bytes (a power of two) through a CRC register.
void ZerosOperator(uint32_t* even, size_t bytes) {
  uint32_t odd[32];
  odd[0] = 0x82f63b78u;
  for (int n = 1; n < 32; n++) odd[n] = 1u << (n - 1);
  Gf2Square(even, odd);  // 2 zero bits
  Gf2Square(odd, even);  // 4 zero bits
  for (;;) {
    Gf2Square(even, odd);  // 8, 32, ... zero bits
    bytes >>= 1;
    if (bytes == 0) return;
    Gf2Square(odd, even);  // 16, 64, ... zero bits
    bytes >>= 1;
    if (bytes == 0) break;
  }
  memcpy(even, odd, sizeof odd);
}

void InitShiftTable(uint32_t table[4][256], size_t bytes) {
  uint32_t op[32];
  ZerosOperator(op, bytes);
  for (uint32_t n = 0; n < 256; n++)
    for (int k = 0; k < 4; k++) table[k][n] = Gf2Times(op, n << (8 * k));
}

inline uint32_t Shift(const uint32_t table[4][256], uint32_t crc) {
  return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

template <size_t kBlock>
__attribute__((target("sse4.2"))) inline void ThreeWay(const uint32_t table[4][256], uint64_t& crc, const uint8_t*& p, size_t& n) {
  while (n >= 3 * kBlock) {
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    for (const uint8_t* end = p + kBlock; p < end; p += 8) {
      uint64_t v0, v1, v2;
      memcpy(&v0, p, 8);
      memcpy(&v1, p + kBlock, 8);
      memcpy(&v2, p + 2 * kBlock, 8);
      c0 = _mm_crc32_u64(c0, v0);
      c1 = _mm_crc32_u64(c1, v1);
      c2 = _mm_crc32_u64(c2, v2);
    }
    crc = Shift(table, Shift(table, uint32_t(c0)) ^ uint32_t(c1)) ^ uint32_t(c2);
    p += 2 * kBlock;
    n -= 3 * kBlock;
  }
}

__attribute__((target("sse4.2"))) uint32_t Crc32cHw(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc;
  ThreeWay<kLongBlock>(g_shift_long, c, p, n);
  ThreeWay<kShortBlock>(g_shift_short, c, p, n);
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

void InitTablesOnce() {
  InitTables();
#if defined(__x86_64__)
  __builtin_cpu_init();
  g_hw = __builtin_cpu_supports("sse4.2");
  InitShiftTable(g_shift_long, kLongBlock);
  InitShiftTable(g_shift_short, kShortBlock);
#endif
}

void InitCrc32c() {
  // Once per process: worker threads load the addon again while data threads may be reading the tables.
  static std::once_flag once;
  std::call_once(once, InitTablesOnce);
}

Napi::Value Crc32cJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "crc32c(data, previous?): data must be a Buffer or Uint8Array");
  Napi::Uint8Array a = info[0].As<Napi::Uint8Array>();
  uint32_t previous = info[1].IsNumber() ? info[1].As<Napi::Number>().Uint32Value() : 0;
  return Napi::Number::New(env, Crc32c(a.Data(), a.ByteLength(), previous));
}

}  // namespace vfio
