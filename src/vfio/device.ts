// VfioDevice: the typed device API over either backend (kernel or mock).
// Every method that can take time returns a promise and runs off the JS
// thread in the addon; transitions of different devices run in parallel.
import diagnosticsChannel from 'node:diagnostics_channel';
import { Readable, Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { constants as osConstants } from 'node:os';
import { native, type NativeBackendCarrier, type NativeDeviceHandle, type NativeSessionRef } from './native.js';
import type { NativeMockInfo } from './mock-native.js';
import { VfioError, fromNative } from './errors.js';
import { type Arc, planArcs } from './arc-planner.js';
import { type MigrationFlags, type MigrationState, PRECOPY_STATES, SAVING_STATES, flagsFromBits, stateFromKernel, stateToKernel } from './states.js';
import type { MockProfile, MockProfileInput } from './mock-profile.js';

/** Raw results of every device call, for tracing (node:diagnostics_channel). */
export const ioctlChannel = diagnosticsChannel.channel('vfio-migration:ioctl');

export interface IoctlTrace {
  device: string;
  operation: string;
  args?: unknown;
  result?: unknown;
  error?: { code: string; errno?: number };
  durationMs: number;
}

export interface OpenMockOptions {
  /** A shipped profile name, a path to a profile JSON file, or a profile object. */
  profile: string | MockProfileInput;
  overrides?: Partial<MockProfileInput>;
  /** Seed of the device's deterministic content. */
  seed?: bigint | number;
  id?: string;
}

export interface OpenKernelOptions {
  /** /dev/vfio/devices/vfioN, a sysfs device path, or a device name (PCI address, mdev UUID). */
  path: string;
  /** Which open path to take; auto prefers the iommufd cdev when the device has one. */
  via?: 'auto' | 'cdev' | 'group';
  id?: string;
}

/**
 * One read of a data fd. `no-data` is the temporary end of a PRE_COPY stream:
 * ENOMSG as the uAPI asks, or a 0-byte read from drivers that return 0 there
 * (the kernel's mtty sample does); `via` says which.
 */
/**
 * `crc32c` is the CRC32C of `bytes`, computed off the event loop while they
 * were hot. `readMs` is how long the device took for the read(2), timed on
 * the data thread: the device's rate, without the event loop's delays (a
 * reader that times the promise also measures every GC and busy callback).
 */
export type ReadResult = { kind: 'data'; bytes: Buffer; crc32c: number; readMs?: number } | { kind: 'no-data'; via: 'ENOMSG' | 'zero' } | { kind: 'end' };

export interface PrecopyInfo {
  initialBytes: bigint;
  dirtyBytes: bigint;
  /**
   * VFIO_PRECOPY_INFO_REINIT: the device has entirely new initial data
   * (`initialBytes` is a new value, `dirtyBytes` restarted). Only ever true
   * after enablePrecopyInfoV2() resolved true; the flags are not read before.
   */
  reinit: boolean;
}

export interface StepOptions {
  signal?: AbortSignal;
  /** Called before each single arc starts (the "prepare" point). */
  onBeforeArc?: (arc: Arc) => void;
  /** Called after each single arc completes. */
  onArc?: (arc: Arc, durationMs: number) => void;
}

/** What a backend addon's device needs to open as a VfioDevice (src/vfio/mock.ts). */
export interface BackendDeviceOptions {
  id: string;
  profile?: MockProfile;
  mockInfo?: () => NativeMockInfo;
}
/**
 * Opens a device whose backend another addon built (the mock addon), with
 * the production addon's device machinery. Internal: not exported by the
 * package's entry points.
 */
// Assigned in VfioDevice's static block (the constructor is private).
// eslint-disable-next-line prefer-const
export let openBackendDevice: (backend: NativeBackendCarrier, options: BackendDeviceOptions) => Promise<VfioDevice>;

function abortError(signal: AbortSignal): VfioError {
  return new VfioError('ABORT_ERR', `aborted: ${String(signal.reason ?? 'signal aborted')}`, { cause: signal.reason });
}

export class VfioDevice implements AsyncDisposable {
  readonly id: string;
  readonly kind: 'kernel' | 'mock';
  readonly openPath: 'cdev' | 'group' | 'mock';
  readonly profile?: MockProfile;
  #handle: NativeDeviceHandle;
  #flags?: MigrationFlags;
  #session: DataSession | null = null;
  #lastState: MigrationState | 'unknown' = 'unknown';
  #closed = false;
  #mockInfo?: () => NativeMockInfo;

  private constructor(handle: NativeDeviceHandle, id: string, kind: 'kernel' | 'mock', openPath: 'cdev' | 'group' | 'mock', profile?: MockProfile) {
    this.#handle = handle;
    this.id = id;
    this.kind = kind;
    this.openPath = openPath;
    this.profile = profile;
  }

  static {
    openBackendDevice = async (backend, options) => {
      const handle = new native.NativeDevice();
      try {
        await handle.openBackend(backend);
      } catch (err) {
        await handle.close();
        throw fromNative(err, { device: options.id });
      }
      const dev = new VfioDevice(handle, options.id, 'mock', 'mock', options.profile);
      dev.#mockInfo = options.mockInfo;
      return dev;
    };
  }

  static async openKernel(options: OpenKernelOptions): Promise<VfioDevice> {
    if (typeof options?.path !== 'string' || options.path === '') throw new VfioError('ERR_VFIO_BAD_ARGUMENT', 'openKernel: path must be a non-empty string');
    const via = options.via ?? 'auto';
    if (!['auto', 'cdev', 'group'].includes(via)) throw new VfioError('ERR_VFIO_BAD_ARGUMENT', `openKernel: via must be auto, cdev or group, got ${JSON.stringify(via)}`);
    const handle = new native.NativeDevice();
    let openPath: string;
    try {
      openPath = await handle.openKernel(options.path, via);
    } catch (err) {
      await handle.close();
      throw fromNative(err, { device: options.path });
    }
    return new VfioDevice(handle, options.id ?? options.path, 'kernel', openPath as 'cdev' | 'group');
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** The open data session (save or resume), if any. */
  get dataSession(): DataSession | null {
    return this.#session;
  }

  async #call<T>(operation: string, fn: () => Promise<T>, args?: unknown): Promise<T> {
    if (this.#closed) throw new VfioError('ERR_VFIO_CLOSED', `${this.id}: device is closed (${operation})`);
    const t0 = performance.now();
    try {
      const result = await fn();
      if (ioctlChannel.hasSubscribers) ioctlChannel.publish({ device: this.id, operation, args, result, durationMs: performance.now() - t0 } satisfies IoctlTrace);
      return result;
    } catch (err) {
      const e = err as { code?: string; errno?: number };
      if (ioctlChannel.hasSubscribers) ioctlChannel.publish({ device: this.id, operation, args, error: { code: String(e?.code), errno: e?.errno }, durationMs: performance.now() - t0 } satisfies IoctlTrace);
      throw err;
    }
  }

  async migrationFlags(): Promise<MigrationFlags> {
    if (!this.#flags) {
      const bits = await this.#call('migration-flags', () => this.#handle.migrationFlags()).catch((err) => {
        throw fromNative(err, { device: this.id });
      });
      this.#flags = flagsFromBits(bits);
    }
    return { ...this.#flags };
  }

  async getState(): Promise<MigrationState> {
    const v = await this.#call('get-state', () => this.#handle.getState()).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
    const state = stateFromKernel(v);
    if (!state) throw new VfioError('EUNKNOWN', `${this.id}: the device reports unknown state ${v}`, { device: this.id });
    this.#lastState = state;
    return state;
  }

  async #stateAfterFailure(): Promise<MigrationState | 'unknown'> {
    try {
      return await this.getState();
    } catch {
      return 'unknown';
    }
  }

  /**
   * One SET of the device state; the kernel walks a combination transition
   * itself. Returns the data session the SET opened, if any.
   */
  async setState(target: MigrationState, options: { signal?: AbortSignal } = {}): Promise<DataSession | null> {
    if (options.signal?.aborted) throw abortError(options.signal);
    const from = this.#lastState;
    let opened: NativeSessionRef | null;
    try {
      opened = await this.#call('set-state', () => this.#handle.setState(stateToKernel(target)), { target });
    } catch (err) {
      const stateAfter = await this.#stateAfterFailure();
      this.#dropSessionUnless(stateAfter);
      throw fromNative(err, { device: this.id, arc: { from, to: target }, stateAfter });
    }
    return this.#afterSet(target, opened);
  }

  /**
   * Walks to `target` one single arc per SET, as planned from the current
   * state and flags, calling the hooks around each arc: this is how the
   * orchestrator emits a prepare event before and a state event after each
   * step. Returns the data session opened on the way, if any.
   */
  async stepTo(target: MigrationState, options: StepOptions = {}): Promise<DataSession | null> {
    const flags = await this.migrationFlags();
    const current = await this.getState();
    const arcs = planArcs(current, target, flags);
    let opened: DataSession | null = null;
    for (const arc of arcs) {
      if (options.signal?.aborted) throw abortError(options.signal);
      options.onBeforeArc?.(arc);
      const t0 = performance.now();
      let ref: NativeSessionRef | null;
      try {
        ref = await this.#call('set-state', () => this.#handle.setState(stateToKernel(arc.to)), { target: arc.to });
      } catch (err) {
        const stateAfter = await this.#stateAfterFailure();
        this.#dropSessionUnless(stateAfter);
        throw fromNative(err, { device: this.id, arc, stateAfter });
      }
      const session = this.#afterSet(arc.to, ref);
      if (session) opened = session;
      options.onArc?.(arc, performance.now() - t0);
    }
    return opened;
  }

  #afterSet(state: MigrationState, ref: NativeSessionRef | null): DataSession | null {
    this.#lastState = state;
    if (ref) {
      // The addon ended (and closed) every earlier session already.
      const old = this.#session;
      if (old) old.invalidate();
      this.#session = new DataSession(this, this.#handle, ref, state === 'resuming' ? 'resume' : 'save');
      return this.#session;
    }
    this.#dropSessionUnless(state);
    return null;
  }

  // A data session lives while the device stays in its group of states;
  // leaving them ends it (its fd is closed, later calls answer as the kernel
  // does for a stale data fd).
  #dropSessionUnless(state: MigrationState | 'unknown'): void {
    const s = this.#session;
    if (!s) return;
    const keeps = s.direction === 'save' ? SAVING_STATES.includes(state as MigrationState) : state === 'resuming';
    if (!keeps) {
      s.invalidate();
      this.#session = null;
    }
  }

  async precopyInfo(session: DataSession | null = this.#session): Promise<PrecopyInfo> {
    if (!session) throw new VfioError('ERR_VFIO_NO_DATA_SESSION', `${this.id}: precopy info needs a data fd (the device has no open save session)`, { device: this.id });
    if (!(session instanceof DataSession) || session.device !== this) throw new VfioError('ERR_VFIO_BAD_ARGUMENT', `${this.id}: precopyInfo(session): not a data session of this device`, { device: this.id });
    if (this.#closed) throw new VfioError('ERR_VFIO_CLOSED', `${this.id}: device is closed (precopy-info)`, { device: this.id });
    session.assertUsable('precopy-info');
    if (!session.valid) {
      // As a driver answers for a stale data fd: a resume fd has no ioctls,
      // the state is checked before the fd (mtty, mlx5).
      const errno = session.direction === 'resume' ? 'ENOTTY' : PRECOPY_STATES.includes(this.#lastState as MigrationState) ? 'ENODEV' : 'EINVAL';
      throw staleError(errno, 'VFIO_MIG_GET_PRECOPY_INFO', this.id);
    }
    return this.#call('precopy-info', () => this.#handle.precopyInfo(session.id)).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
  }

  /**
   * VFIO_DEVICE_FEATURE(SET MIG_PRECOPY_INFOv2) with no data: opts this
   * device fd in to the PRECOPY_INFO flags (REINIT). Resolves false when the
   * kernel or the driver lacks the feature (ENOTTY, EINVAL, EOPNOTSUPP: the
   * 6.12 mtty does), which is no error; other errnos reject.
   */
  async enablePrecopyInfoV2(): Promise<boolean> {
    if (this.#closed) throw new VfioError('ERR_VFIO_CLOSED', `${this.id}: device is closed (enable-precopy-info-v2)`, { device: this.id });
    return this.#call('enable-precopy-info-v2', () => this.#handle.enablePrecopyInfoV2()).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
  }

  /** VFIO_DEVICE_FEATURE(MIG_DATA_SIZE): bytes still needed to complete stop-copy. */
  async stopCopySize(): Promise<bigint> {
    return this.#call('stop-copy-size', () => this.#handle.stopCopySize()).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
  }

  async reset(): Promise<void> {
    await this.#call('reset', () => this.#handle.reset()).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
    this.#dropSessionUnless('running');
  }

  async dmaLoggingStart(pageSize: number, ranges: { iova: number | bigint; length: number | bigint }[]): Promise<void> {
    await this.#call('dma-logging-start', () => this.#handle.dmaLoggingStart(pageSize, ranges), { pageSize, ranges }).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
  }

  async dmaLoggingStop(): Promise<void> {
    await this.#call('dma-logging-stop', () => this.#handle.dmaLoggingStop()).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
  }

  /** Dirty bitmap of [iova, iova+length), one bit per page. */
  async dmaLoggingReport(iova: number | bigint, length: number | bigint, pageSize: number): Promise<Buffer> {
    return this.#call('dma-logging-report', () => this.#handle.dmaLoggingReport(iova, length, pageSize)).catch((err) => {
      throw fromNative(err, { device: this.id });
    });
  }

  /** Mock devices only: digests and counters a test can check. */
  mockInfo(): NativeMockInfo {
    if (this.kind !== 'mock') throw new VfioError('ERR_VFIO_BAD_ARGUMENT', `${this.id}: mockInfo() is only available on mock devices`);
    if (!this.#mockInfo) throw new VfioError('ERR_VFIO_BAD_ARGUMENT', `${this.id}: mockInfo() is only available on mock devices`);
    return this.#mockInfo();
  }

  /** Data fds of this device that are still open (for leak checks). */
  openDataFds(): number[] {
    return this.#handle.openDataFds();
  }

  /** The state last seen through this API (no ioctl). */
  get lastKnownState(): MigrationState | 'unknown' {
    return this.#lastState;
  }

  /** Closes every data fd and the device. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#session?.invalidate();
    this.#session = null;
    await this.#handle.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

export interface ReadStreamOptions {
  /** Bytes per read(2) of the data fd. */
  chunkBytes?: number;
  /** In PRE_COPY, how long to wait before reading again after ENOMSG. */
  pollIntervalMs?: number;
  highWaterMark?: number;
  signal?: AbortSignal;
}

/** The errno error a driver gives for a stale data fd, for a session whose fd is closed already. */
function staleError(code: 'ENODEV' | 'EINVAL' | 'ENOTTY', operation: string, device: string): VfioError {
  return new VfioError(code, `${device}: ${code} (${operation}): the data session ended when the device left its states`, { errno: osConstants.errno[code], operation, device });
}

/**
 * A device's data fd: the save stream (PRE_COPY / STOP_COPY) or the resume
 * stream (RESUMING). Valid while the device stays in those states; the fd is
 * closed when the session ends (the device leaves those states, a newer
 * session opens, close(), or the device closes), exactly once, by the addon.
 * After it ended, calls fail as the kernel's do for a stale fd (ENODEV);
 * after close() they fail with ERR_VFIO_CLOSED.
 */
export class DataSession {
  readonly device: VfioDevice;
  /** The fd number while the session is open: informational (no call takes an fd). */
  readonly fd: number;
  /** The addon's handle for this session. */
  readonly id: number;
  readonly direction: 'save' | 'resume';
  bytesTransferred = 0;
  #handle: NativeDeviceHandle;
  #valid = true;
  #closed = false;
  #released: Promise<void> | null = null;

  constructor(device: VfioDevice, handle: NativeDeviceHandle, ref: NativeSessionRef, direction: 'save' | 'resume') {
    this.device = device;
    this.#handle = handle;
    this.fd = ref.fd;
    this.id = ref.id;
    this.direction = direction;
  }

  /** False once the session has ended: the device left its states, or it was closed. */
  get valid(): boolean {
    return this.#valid;
  }

  /** True after close() (or the device's close). */
  get closed(): boolean {
    return this.#closed || this.device.closed;
  }

  /** Ends the session: its fd is closed once the reads and writes already queued are done. */
  invalidate(): void {
    this.#valid = false;
    void this.#release();
  }

  #release(): Promise<void> {
    // Nothing to wait for once the device closed: its close ends every session.
    this.#released ??= this.device.closed ? Promise.resolve() : this.#handle.closeSession(this.id).catch(() => {});
    return this.#released;
  }

  /** @internal Throws ERR_VFIO_CLOSED after close() or the device's close. */
  assertUsable(operation: string): void {
    if (this.closed) throw new VfioError('ERR_VFIO_CLOSED', `${this.device.id}: data session is closed (${operation})`, { device: this.device.id, operation });
  }

  /**
   * One read(2): bytes, `no-data` at the temporary end of a PRE_COPY stream
   * (ENOMSG: more may come later), or `end` at the end of a STOP_COPY stream.
   */
  async read(maxBytes = 1 << 20): Promise<ReadResult> {
    if (this.direction !== 'save') throw new VfioError('ERR_VFIO_BAD_ARGUMENT', `${this.device.id}: read() on a resume session`);
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 1) throw new VfioError('ERR_VFIO_BAD_ARGUMENT', `read(maxBytes): maxBytes must be a positive integer, got ${maxBytes}`);
    this.assertUsable('read');
    if (!this.#valid) throw staleError('ENODEV', 'read(data_fd)', this.device.id);
    // The state when the read was issued decides what a 0-byte read means: a
    // SET to STOP_COPY may complete while this read is in flight.
    const issuedInPrecopy = PRECOPY_STATES.includes(this.device.lastKnownState as MigrationState);
    try {
      const got = await this.#handle.readData(this.id, maxBytes);
      if (got === null) {
        // In PRE_COPY states the stream cannot have ended for good: more may
        // come (a later read in STOP_COPY returns the permanent end).
        return issuedInPrecopy ? { kind: 'no-data', via: 'zero' } : { kind: 'end' };
      }
      this.bytesTransferred += got.bytes.length;
      return { kind: 'data', bytes: got.bytes, crc32c: got.crc32c, readMs: got.readMs };
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOMSG') return { kind: 'no-data', via: 'ENOMSG' };
      throw fromNative(err, { device: this.device.id });
    }
  }

  /**
   * Writes all of `data` (a Buffer, or Buffers written in order) into a
   * resume session. With `checksums`, each run of `parts` Buffers must have
   * the given CRC32C: it is verified on the data thread right before the run
   * is written, and a mismatch rejects with EBADMSG before any byte of that
   * run reaches the device (runs before it are written).
   */
  async write(data: Buffer | readonly Buffer[], options: { checksums?: readonly { parts: number; crc32c: number }[] } = {}): Promise<void> {
    if (this.direction !== 'resume') throw new VfioError('ERR_VFIO_BAD_ARGUMENT', `${this.device.id}: write() on a save session`);
    const parts = Buffer.isBuffer(data) ? [data] : data;
    if (!Array.isArray(parts) || !parts.every((p) => Buffer.isBuffer(p))) throw new VfioError('ERR_VFIO_BAD_ARGUMENT', 'write(data): data must be a Buffer or an array of Buffers');
    const bytes = parts.reduce((n, p) => n + p.length, 0);
    let checks: Uint32Array | undefined;
    if (options.checksums) {
      const runs = options.checksums;
      if (!runs.every((r) => Number.isInteger(r.parts) && r.parts > 0 && Number.isInteger(r.crc32c) && r.crc32c >= 0 && r.crc32c <= 0xffffffff) || runs.reduce((n, r) => n + r.parts, 0) !== parts.length)
        throw new VfioError('ERR_VFIO_BAD_ARGUMENT', 'write(data, { checksums }): runs of at least one part with a 32-bit CRC, covering every part once');
      checks = new Uint32Array(runs.length * 2);
      runs.forEach((r, i) => {
        checks![2 * i] = r.parts;
        checks![2 * i + 1] = r.crc32c;
      });
    }
    this.assertUsable('write');
    if (!this.#valid) throw staleError('ENODEV', 'write(data_fd)', this.device.id);
    if (bytes === 0 && !checks) return;
    try {
      await this.#handle.writeData(this.id, Buffer.isBuffer(data) ? data : parts, checks);
      this.bytesTransferred += bytes;
    } catch (err) {
      throw fromNative(err, { device: this.device.id });
    }
  }

  /**
   * The save stream as a Readable with backpressure. In PRE_COPY states it
   * emits 'drained' at each temporary end of stream and polls for more; it
   * ends at the end of the STOP_COPY stream.
   */
  createReadStream(options: ReadStreamOptions = {}): Readable {
    const chunkBytes = options.chunkBytes ?? 1 << 20;
    const pollMs = options.pollIntervalMs ?? 10;
    const session = this;
    let stop = false;
    const stream = new Readable({
      highWaterMark: options.highWaterMark ?? 4 << 20,
      signal: options.signal,
      async read() {
        try {
          for (;;) {
            if (stop) return;
            const r = await session.read(chunkBytes);
            if (r.kind === 'data') {
              this.push(r.bytes);
              return;
            }
            if (r.kind === 'end') {
              this.push(null);
              return;
            }
            this.emit('drained');
            await sleep(pollMs);
          }
        } catch (err) {
          this.destroy(err as Error);
        }
      },
      destroy(err, cb) {
        stop = true;
        cb(err);
      },
    });
    return stream;
  }

  /** The resume stream as a Writable with backpressure. */
  createWriteStream(options: { highWaterMark?: number; signal?: AbortSignal } = {}): Writable {
    const session = this;
    return new Writable({
      highWaterMark: options.highWaterMark ?? 4 << 20,
      signal: options.signal,
      write(chunk: Buffer, _enc, cb) {
        session.write(chunk).then(() => cb(), cb);
      },
      writev(chunks, cb) {
        session.write(Buffer.concat(chunks.map((c) => c.chunk as Buffer))).then(() => cb(), cb);
      },
    });
  }

  /** Closes the data fd (the device state does not change). Idempotent. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#valid = false;
    await this.#release();
  }
}

