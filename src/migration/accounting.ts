// Byte and time figures that cannot lie: everything a device reports goes
// through here, is clamped to what is physically possible, and never wraps,
// underflows or shows absurd values (QEMU once showed "Remaining: 16 EiB").

/** The largest byte count we report (2^53 - 1): beyond it a figure is a glitch. */
export const MAX_REPORTED_BYTES = Number.MAX_SAFE_INTEGER;
/** The longest duration we report (a day): an expected downtime beyond it is a glitch. */
export const MAX_REPORTED_MS = 24 * 3600 * 1000;

export interface ClampResult {
  value: number;
  clamped: boolean;
}

/**
 * A device-reported u64 as a safe number, clamped to [0, ceiling]. `ceiling`
 * is what the device could possibly hold (for example its state size).
 */
export function clampDeviceBytes(raw: bigint, ceilingBytes: number = MAX_REPORTED_BYTES): ClampResult {
  const ceiling = BigInt(Math.max(0, Math.min(MAX_REPORTED_BYTES, Math.floor(ceilingBytes))));
  if (raw < 0n) return { value: 0, clamped: true };
  if (raw > ceiling) return { value: Number(ceiling), clamped: true };
  return { value: Number(raw), clamped: false };
}

/** a - b, never below 0. */
export function subtractBytes(a: number, b: number): number {
  return a > b ? a - b : 0;
}

/** Sum of byte counts, saturating at MAX_REPORTED_BYTES. */
export function sumBytes(values: Iterable<number>): number {
  let total = 0;
  for (const v of values) {
    if (!(v > 0)) continue;
    total += v;
    if (total >= MAX_REPORTED_BYTES) return MAX_REPORTED_BYTES;
  }
  return total;
}

/** bytes / (bytes per second) in ms, finite and within MAX_REPORTED_MS. */
export function transferMs(bytes: number, bytesPerSec: number): number {
  if (!(bytes > 0)) return 0;
  if (!(bytesPerSec > 0)) return MAX_REPORTED_MS;
  return Math.min(MAX_REPORTED_MS, (bytes / bytesPerSec) * 1000);
}

/** A duration in ms, made finite and within MAX_REPORTED_MS. */
export function saneMs(ms: number): number {
  if (!Number.isFinite(ms) || ms < 0) return ms > 0 ? MAX_REPORTED_MS : 0;
  return Math.min(ms, MAX_REPORTED_MS);
}

/** Bandwidth over a sliding window of transfer samples. */
export class BandwidthMeter {
  #samples: { bytes: number; ms: number }[] = [];
  #windowMs: number;

  constructor(windowMs = 1000) {
    this.#windowMs = windowMs;
  }

  record(bytes: number, ms: number): void {
    if (!(bytes > 0) || !(ms > 0)) return;
    this.#samples.push({ bytes, ms });
    let total = 0;
    for (let i = this.#samples.length - 1; i >= 0; i--) {
      total += this.#samples[i]!.ms;
      if (total > this.#windowMs) {
        this.#samples.splice(0, i);
        break;
      }
    }
  }

  /** Of sending measured in the window, ms: how much the rate rests on. */
  get coveredMs(): number {
    let ms = 0;
    for (const s of this.#samples) ms += s.ms;
    return ms;
  }

  /** bytes/s, 0 when nothing was measured yet. */
  get bytesPerSec(): number {
    let bytes = 0;
    let ms = 0;
    for (const s of this.#samples) {
      bytes += s.bytes;
      ms += s.ms;
    }
    return ms > 0 ? (bytes / ms) * 1000 : 0;
  }
}
