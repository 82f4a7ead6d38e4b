// Channels of one migration: the main channel (control both ways, RAM) and
// extra data channels (multifd-like) so several devices stream and load at
// once. Each section is bound to one channel, which keeps its bytes in order.
import type net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { FrameReader, FrameType, FrameWriter, MAX_FRAME_PAYLOAD_BYTES } from './wire.js';
import type { SectionOutput } from './handler.js';
import { MigrationError } from './errors.js';

export interface Channel {
  index: number;
  socket: net.Socket;
  reader: FrameReader;
  writer: FrameWriter;
  /** Section payload bytes sent or received on this channel. */
  dataBytes: number;
}

/** `deferDataChecksums`: section data is checked by the loader (see FrameReader). */
export function makeChannel(index: number, socket: net.Socket, options: { deferDataChecksums?: boolean } = {}): Channel {
  return { index, socket, reader: new FrameReader(socket, options), writer: new FrameWriter(socket), dataBytes: 0 };
}

/** Shared cap on the stream rate (max-bandwidth), bytes/s; 0 = none. */
export class RateLimiter {
  bytesPerSec: number;
  #start = performance.now();
  #bytes = 0;

  constructor(bytesPerSec: number) {
    this.bytesPerSec = bytesPerSec;
  }

  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    if (!(this.bytesPerSec > 0)) return;
    const now = performance.now();
    // Idle time is not credit for a later burst.
    if (now - (this.#start + (this.#bytes / this.bytesPerSec) * 1000) > 50) {
      this.#start = now;
      this.#bytes = 0;
    }
    this.#bytes += bytes;
    const due = this.#start + (this.#bytes / this.bytesPerSec) * 1000;
    if (due > now) await sleep(due - now, undefined, { signal });
  }
}

/** A section's output on its channel, split into frames within the size limit. */
export function sectionOutput(channel: Channel, section: number, limiter: RateLimiter, signal: AbortSignal, onBytes: (n: number) => void, onInitialRenewed: () => void = () => {}): SectionOutput {
  return {
    async send(data: Buffer, crc32c?: number) {
      // A known checksum covers the whole buffer: only usable if it goes out as one frame.
      const knownCrc = data.length <= MAX_FRAME_PAYLOAD_BYTES ? crc32c : undefined;
      for (let at = 0; at < data.length; at += MAX_FRAME_PAYLOAD_BYTES) {
        const part = data.subarray(at, Math.min(data.length, at + MAX_FRAME_PAYLOAD_BYTES));
        await limiter.take(part.length, signal);
        await channel.writer.write(FrameType.SectionData, section, part, knownCrc);
        channel.dataBytes += part.length;
        onBytes(part.length);
      }
    },
    async initialSent() {
      await channel.writer.write(FrameType.InitialSent, section);
    },
    async initialRenewed() {
      // Counted before the frame goes out: an ACK that races it is stale.
      onInitialRenewed();
      await channel.writer.write(FrameType.InitialRenewed, section);
    },
  };
}

/** `p`, or ERR_MIGRATION_CONNECTION with `message` once `ms` have passed (a peer gone without a word). */
export async function withTimeout<T>(p: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new MigrationError('ERR_MIGRATION_CONNECTION', message)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Waits for every promise; throws the first failure only after all settled. */
export async function settleAll<T>(promises: (Promise<T> | T)[]): Promise<T[]> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r) => r.status === 'rejected');
  if (failed) throw (failed as PromiseRejectedResult).reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}

/**
 * Liveness of the peer over one migration's channels. Every tick (a tenth of
 * the timeout) it says "alive" on `writer` every other tick, if that channel
 * is idle; and it calls `onSilent` once nothing (no byte on any channel) came
 * from the peer for 90% of the timeout, so a stopped or cut-off peer is
 * detected within it. Data this side has not consumed yet counts as the
 * peer's life: the consumer, not the peer, holds the stream up then.
 */
export class PeerWatch {
  readonly timeoutMs: number;
  #readers: () => readonly (FrameReader | undefined)[];
  #writer: FrameWriter | null;
  #onSilent: (silentMs: number) => void;
  #timer: NodeJS.Timeout | null = null;
  #arrived = -1;
  #lastHeardAt = 0;
  #lastTickAt = 0;
  #ticks = 0;

  constructor(options: { timeoutMs: number; readers: () => readonly (FrameReader | undefined)[]; writer: FrameWriter | null; onSilent: (silentMs: number) => void }) {
    this.timeoutMs = options.timeoutMs;
    this.#readers = options.readers;
    this.#writer = options.writer;
    this.#onSilent = options.onSilent;
  }

  start(): void {
    if (this.#timer) return;
    const tickMs = Math.max(10, this.timeoutMs / 10);
    this.#lastHeardAt = this.#lastTickAt = performance.now();
    this.#writer?.heartbeat();
    this.#timer = setInterval(() => this.#tick(tickMs), tickMs);
    this.#timer.unref();
  }

  #tick(tickMs: number): void {
    const now = performance.now();
    // A late tick means this process did not run (stopped, starved): the
    // peer's silence since is not the peer's; judge it from here on.
    const late = now - this.#lastTickAt > 3 * tickMs;
    this.#lastTickAt = now;
    if (++this.#ticks % 2 === 0) this.#writer?.heartbeat();
    let arrived = 0;
    let backlogged = false;
    for (const r of this.#readers()) {
      if (!r) continue;
      arrived += r.bytesArrived;
      backlogged ||= r.backlogged;
    }
    if (late || backlogged || arrived !== this.#arrived) {
      this.#arrived = arrived;
      this.#lastHeardAt = now;
      return;
    }
    const silentMs = now - this.#lastHeardAt;
    if (silentMs >= this.timeoutMs * 0.9) {
      this.stop();
      this.#onSilent(silentMs);
    }
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }
}
