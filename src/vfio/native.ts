// Loads the C++ addon (prebuilt or built by node-gyp at install time).
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

/**
 * A device backend built by another addon, for NativeDevice.openBackend():
 * a type-tagged object holding the backend's factory (native/backend.h).
 * Only the addons can make one.
 */
export interface NativeBackendCarrier {
  readonly factory: unknown;
}

/** A data session a SET opened: `id` names it in every later call; `fd` is informational only (no call takes an fd). */
export interface NativeSessionRef {
  id: number;
  fd: number;
}

/**
 * The raw binding. Argument errors are thrown (code ERR_VFIO_BAD_ARGUMENT,
 * ERR_VFIO_PROFILE); a call on a closed device or session rejects with
 * ERR_VFIO_CLOSED; out of memory is ERR_VFIO_NOMEM; device errors carry the
 * errno name as `code`.
 */
export interface NativeDeviceHandle {
  openKernel(path: string, via: string): Promise<string>;
  /** Opens a device whose backend another addon built (the mock addon's MockHandle); the backend is built on the device's control thread. */
  openBackend(backend: NativeBackendCarrier): Promise<void>;
  info(): { kind: string | null; openPath: string | null; closed: boolean };
  migrationFlags(): Promise<number>;
  getState(): Promise<number>;
  /** The data session the SET opened, if any; it ends every earlier session of the device. */
  setState(state: number): Promise<NativeSessionRef | null>;
  /** `reinit`: VFIO_PRECOPY_INFO_REINIT, only ever true after enablePrecopyInfoV2() resolved true. */
  precopyInfo(session: number): Promise<{ initialBytes: bigint; dirtyBytes: bigint; reinit: boolean }>;
  /** VFIO_DEVICE_FEATURE(SET MIG_PRECOPY_INFOv2): true when opted in, false when the kernel/driver lacks it. */
  enablePrecopyInfoV2(): Promise<boolean>;
  stopCopySize(): Promise<bigint>;
  reset(): Promise<void>;
  dmaLoggingStart(pageSize: number | bigint, ranges: { iova: number | bigint; length: number | bigint }[]): Promise<void>;
  dmaLoggingStop(): Promise<void>;
  dmaLoggingReport(iova: number | bigint, length: number | bigint, pageSize: number | bigint): Promise<Buffer>;
  /** One read(2) of at most 16 MiB; the CRC32C of the bytes is computed on the device's data thread; `readMs`: the read(2) alone, timed there. */
  readData(session: number, maxBytes: number): Promise<{ bytes: Buffer; crc32c: number; readMs: number } | null>;
  /** `checks`: [parts, crc32c] pairs; each run of parts is verified (EBADMSG) before it is written. */
  writeData(session: number, data: Buffer | readonly Buffer[], checks?: Uint32Array): Promise<number>;
  /** Closes the session's data fd after the reads and writes queued before; idempotent. */
  closeSession(session: number): Promise<void>;
  /** Data fds not closed yet (for leak checks). */
  openDataFds(): number[];
  close(): Promise<void>;
}

/** native/uapi.h's state machine as data (the addon's `stateFacts`). */
export interface NativeStateFacts {
  /** Indexed by the kernel's enum value. */
  states: {
    value: number;
    name: string;
    /** VFIO_MIGRATION_* bits the state needs to exist; null: never requestable (ERROR). */
    needs: number | null;
    /** Exists on every migration-capable device (RUNNING, ERROR). */
    always: boolean;
    saving: boolean;
    precopy: boolean;
    p2pQuiesced: boolean;
  }[];
  flags: { key: string; name: string; bit: number }[];
  /** [from][to]: the kernel's first single arc toward `to` (0 = ERROR: refused), before skipping states the device lacks. */
  next: number[][];
  dataFdArcs: { from: number; to: number; direction: 'save' | 'resume' }[];
}

export interface NativeAddon {
  stateFacts: NativeStateFacts;
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

/**
 * VFIO_MIGRATION_ADDON names another build of the addon to load (the
 * sanitizer run's, scripts/test-sanitize.sh); by default the package's own.
 */
export const ADDON_PATH_ENV = 'VFIO_MIGRATION_ADDON';
const override = process.env[ADDON_PATH_ENV];
export const native: NativeAddon = (override ? require(path.resolve(override)) : require('node-gyp-build')(packageRoot)) as NativeAddon;
