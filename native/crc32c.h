#pragma once
#include <cstddef>
#include <cstdint>

namespace vfio {
// CRC32C (Castagnoli); hardware-accelerated where the CPU allows.
// `previous` continues a CRC: Crc32c(b, n, Crc32c(a, m)) is the CRC of a then b.
uint32_t Crc32c(const uint8_t* p, size_t n, uint32_t previous = 0);
}  // namespace vfio
