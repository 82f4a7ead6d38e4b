// Loads the C++ addon (prebuilt or built by node-gyp at install time).
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import type { MockProfileScalars } from './mock-profile.js';

/** A validated profile in the addon's terms: states and errnos as kernel numbers. */
export interface NativeMockProfile extends MockProfileScalars {
  name: string;
  flags: number;
  arcLatencies: { from: number; to: number; ms: number }[];
  faults: { from: number; to: number; errno: number; intoError: boolean; times: number }[];
  profileHash: bigint;
}

export interface NativeMockInfo {
  seed: bigint;
  digest: string;
  savedDigest: string;
  loadedDigest: string;
  bytesRead: number;
  bytesWritten: number;
  dirtiedChunks: number;
  arcsTaken: number;
  loadBusyMs: number;
}

export interface NativeDeviceHandle {
  openKernel(path: string, via: string): Promise<string>;
  openMock(profile: NativeMockProfile, seed: bigint): void;
  info(): { kind: string | null; openPath: string | null; closed: boolean };
  migrationFlags(): Promise<number>;
  getState(): Promise<number>;
  setState(state: number): Promise<number>;
  precopyInfo(dataFd: number): Promise<{ initialBytes: bigint; dirtyBytes: bigint }>;
  stopCopySize(): Promise<bigint>;
  reset(): Promise<void>;
  dmaLoggingStart(pageSize: number | bigint, ranges: { iova: number | bigint; length: number | bigint }[]): Promise<void>;
  dmaLoggingStop(): Promise<void>;
  dmaLoggingReport(iova: number | bigint, length: number | bigint, pageSize: number | bigint): Promise<Buffer>;
  /** One read(2); the CRC32C of the bytes is computed on the device's data thread. */
  readData(dataFd: number, maxBytes: number): Promise<{ bytes: Buffer; crc32c: number } | null>;
  /** `checks`: [parts, crc32c] pairs; each run of parts is verified (EBADMSG) before it is written. */
  writeData(dataFd: number, data: Buffer | readonly Buffer[], checks?: Uint32Array): Promise<number>;
  closeDataFd(dataFd: number): Promise<void>;
  openDataFds(): number[];
  mockInfo(): NativeMockInfo;
  close(): Promise<void>;
}

export interface NativeAddon {
  NativeDevice: new () => NativeDeviceHandle;
  nextState(current: number, target: number, flags: number): number | null;
  uapi: Record<string, number>;
  /** CRC32C (Castagnoli) of the bytes, hardware-accelerated where the CPU allows. */
  crc32c(data: Uint8Array, previous?: number): number;
  /** A close-on-exec duplicate of a socket fd; throws ENOTSOCK for other fds, EBADF for closed ones. */
  dupSocketFd(fd: number): number;
  kernelBackend: boolean;
}

const require = createRequire(import.meta.url);
const here = path.dirname(fileURLToPath(import.meta.url));
// dist/src/vfio -> package root
const packageRoot = path.resolve(here, '..', '..', '..');

export const native: NativeAddon = require('node-gyp-build')(packageRoot) as NativeAddon;
