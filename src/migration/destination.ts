// The destination side: accepts a migration, checks it in the handshake
// before any device changes state, loads sections as they arrive (each
// channel in parallel), then brings every device and the VM to running and
// reports back on the return path.
import type net from 'node:net';
import { MigrationEvents, type MigrationStatus } from './events.js';
import { MigrationError, describeError } from './errors.js';
import type { HandlerContext, StateHandler } from './handler.js';
import type { VmControl } from './vm.js';
import { type Channel, makeChannel, settleAll, withTimeout } from './channels.js';
import { type Frame, FrameType, type LoadReportMessage, WIRE_VERSION, parseJson, verifyFrame } from './wire.js';
import { type MigrationServer, formatUri, listen, parseUri } from './transport.js';
import type { HelloMessage, RunningMessage } from './source.js';
import type { MigrationState } from '../vfio/states.js';

/**
 * Ends a connection after what was written to it (an error report above all)
 * has been flushed; destroy() would drop it. close() destroys what is left.
 */
function endSocket(s: net.Socket): void {
  if (s.destroyed) return;
  s.end();
  setTimeout(() => s.destroy(), 2000).unref();
}

/** Section loads one channel may have queued on the devices at once. */
const MAX_INFLIGHT_LOADS = 4;
/** Longest wait for the source's Commit after ReadyToRun (it answers at once unless gone). */
const COMMIT_TIMEOUT_MS = 30_000;
/** Shortest interval between two LoadReports while data loads. */
const LOAD_REPORT_INTERVAL_MS = 10;
/** Up to this many bytes of already-arrived data frames go to a device in one write. */
const COALESCE_BYTES = 8 << 20;

export interface DestinationOptions {
  handlers: StateHandler[];
  vm: VmControl;
}

export interface IncomingResult {
  status: MigrationStatus;
  totalTimeMs: number;
  loadMs: number;
  /** VM stop on the source to VM running here, as measured here (from the source's stop time). */
  downtimeMs: number | null;
  digests: (string | null)[];
  sectionBytes: number[];
  error?: { code: string; message: string };
}

export interface IncomingOptions {
  signal?: AbortSignal;
  /** ms to wait for all channels once the main one said hello. */
  channelTimeoutMs?: number;
}

export class MigrationDestination extends MigrationEvents {
  readonly handlers: StateHandler[];
  readonly vm: VmControl;
  #server: MigrationServer | null = null;
  #status: MigrationStatus = 'none';
  #failure: Error | null = null;
  #channels: Channel[] = [];
  #sockets = new Set<net.Socket>();
  #switchoverLimitMs = 0;
  #sourceStoppedAt = 0;
  #abortTimer: NodeJS.Timeout | null = null;
  #initialPending = new Set<number>();
  #acked = false;
  /** The source committed: this side runs the VM whatever happens to the connection. */
  #committed = false;
  uri: string | null = null;

  constructor(options: DestinationOptions) {
    super();
    if (!Array.isArray(options.handlers) || options.handlers.length === 0) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', 'a migration needs at least one state handler');
    this.handlers = options.handlers;
    this.vm = options.vm;
  }

  get status(): MigrationStatus {
    return this.#status;
  }

  /** Starts listening; returns the bound URI (tcp port 0 picks a free port). */
  async listen(uri: string): Promise<string> {
    const { server, uri: bound } = await listen(parseUri(uri));
    this.#server = server;
    server.on('accepted', (s: net.Socket) => {
      this.#sockets.add(s);
      s.on('close', () => this.#sockets.delete(s));
    });
    this.uri = formatUri(bound);
    return this.uri;
  }

  #setStatus(status: MigrationStatus, reason?: { code: string; message: string }): void {
    this.#status = status;
    this.emitEvent('MIGRATION', reason ? { status, reason } : { status });
  }

  #context(): HandlerContext {
    return {
      signal: new AbortController().signal,
      prepare: (device, state) => this.emitEvent('VFIO_MIGRATION', { device, state: `${state}-prepare` as `${MigrationState}-prepare` }),
      deviceState: (device, state, arcMs) => this.emitEvent('VFIO_MIGRATION', { device, state, arcMs }),
      warn: (message, data) => this.emitEvent('MIGRATION_WARNING', data ? { message, data } : { message }),
    };
  }

  #fail(err: Error): void {
    if (this.#failure) return;
    this.#failure = err;
    for (const s of this.#sockets) endSocket(s);
  }

  /** Accepts and runs one incoming migration. */
  async incoming(options: IncomingOptions = {}): Promise<IncomingResult> {
    if (!this.#server) throw new MigrationError('ERR_MIGRATION_STATE', 'call listen() before incoming()');
    if (this.#status !== 'none') throw new MigrationError('ERR_MIGRATION_STATE', `incoming() was already called (status ${this.#status})`);
    const t0 = performance.now();
    let loadStart = 0;
    let loadEnd = 0;
    const ctx = this.#context();
    const onAbort = () => this.#fail(new MigrationError('ERR_MIGRATION_CANCELLED', String(options.signal?.reason ?? 'aborted')));
    options.signal?.addEventListener('abort', onAbort, { once: true });
    let setupStarted = false;
    let main: Channel | null = null;
    let reporter: NodeJS.Timeout | undefined;
    try {
      const hello = await this.#acceptMain(options.signal);
      main = this.#channels[0]!;
      this.#setStatus('setup');
      const mismatch = this.#compatibility(hello);
      if (mismatch) {
        const err = new MigrationError('ERR_MIGRATION_INCOMPATIBLE', mismatch);
        await main.writer.writeJson(FrameType.Error, 0, describeError(err)).catch(() => {});
        throw err;
      }
      await this.#acceptChannels(hello, options.channelTimeoutMs ?? 10_000);
      setupStarted = true;
      await settleAll(this.handlers.map((h) => h.loadSetup(ctx)));
      // Every device with initial bytes must load them before the source may switch over.
      this.handlers.forEach((h, i) => {
        if (h.hasInitialData?.()) this.#initialPending.add(i);
      });
      await main.writer.writeJson(FrameType.HelloAck, 0, { wireVersion: WIRE_VERSION });
      await this.#sendLoadReport(main);
      this.#setStatus('active');
      if (hello.capabilities['switchover-ack'] && this.#initialPending.size === 0) await this.#sendAck(main);
      loadStart = performance.now();
      // Tell the source how far arrival and loading got, every 10 ms while
      // either moves: also while a slow load holds everything up (arrivals
      // still count), and no more often (per-MiB reports cost a fast link dearly).
      let reported = { received: -1, loaded: -1 };
      reporter = setInterval(() => {
        const received = this.#channels.reduce((n, ch) => n + (ch ? ch.reader.bytesArrived : 0), 0);
        if (received === reported.received && this.#loadedBytes === reported.loaded) return;
        reported = { received, loaded: this.#loadedBytes };
        void this.#sendLoadReport(main!).catch(() => {});
      }, LOAD_REPORT_INTERVAL_MS);
      await settleAll(this.#channels.map((ch) => this.#channelLoop(ch, hello)));
      clearInterval(reporter);
      loadEnd = performance.now();
      if (this.#failure) throw this.#failure;

      // Everything arrived: validate and stop all devices; then wait for the
      // source's commit (until then the source may still resume the VM
      // itself); then RUNNING_P2P for all before any device runs (the P2P
      // rule), then the VM.
      await settleAll(this.handlers.map((h) => h.loadFinish(ctx)));
      if (this.#failure) throw this.#failure;
      await this.#awaitCommit(main);
      await settleAll(this.handlers.map((h) => h.loadResumeP2P(ctx)));
      await settleAll(this.handlers.map((h) => h.loadResume(ctx)));
      await this.vm.resume();
      // The VM runs here now: nothing after this may stop it (the source gave
      // it up), so what still fails is only a warning.
      return await this.#finishRunning(main, ctx, { t0, loadStart, loadEnd });
    } catch (err) {
      const cause = this.#failure ?? (err as Error);
      if (this.#abortTimer) clearTimeout(this.#abortTimer);
      // `notRunning`: the source may resume the VM. True before this side's
      // commit (nothing ever ran here, even if this crosses the source's
      // Commit); after it, only once the VM is stopped and the devices reset.
      const tellSource = async () => {
        if (main && !main.socket.destroyed) await main.writer.writeJson(FrameType.Error, 0, { ...describeError(cause), notRunning: true }).catch(() => {});
        this.#fail(cause);
      };
      const stopHere = async () => {
        if (this.vm.running) await this.vm.stop();
        await Promise.allSettled(this.handlers.map((h) => h.loadCleanup('failed', ctx)));
      };
      if (this.#committed) {
        await stopHere();
        await tellSource();
      } else {
        // Tell the source why before the connections go.
        await tellSource();
        if (setupStarted) await stopHere();
      }
      const error = describeError(cause);
      this.#setStatus((cause as MigrationError).code === 'ERR_MIGRATION_CANCELLED' ? 'cancelled' : 'failed', error);
      const e = cause as Error & { result?: IncomingResult };
      e.result = { status: this.#status, totalTimeMs: performance.now() - t0, loadMs: loadEnd ? loadEnd - loadStart : 0, downtimeMs: null, digests: [], sectionBytes: this.#sectionBytes, error };
      throw cause;
    } finally {
      clearInterval(reporter);
      options.signal?.removeEventListener('abort', onAbort);
      for (const s of this.#sockets) endSocket(s);
    }
  }

  /** After the VM resumed here: report, clean up; failures are warnings (the VM keeps running). */
  async #finishRunning(main: Channel, ctx: HandlerContext, times: { t0: number; loadStart: number; loadEnd: number }): Promise<IncomingResult> {
    const warn = (what: string, err: unknown) => {
      try {
        this.emitEvent('MIGRATION_WARNING', { message: `${what} after the VM started here: ${describeError(err).message}` });
      } catch {
        // A throwing listener changes nothing here.
      }
    };
    const downtimeMs = this.#sourceStoppedAt ? performance.timeOrigin + performance.now() - this.#sourceStoppedAt : null;
    const digests = this.handlers.map((h) => {
      try {
        return h.digest?.('loaded') ?? null;
      } catch (err) {
        warn('digest', err);
        return null;
      }
    });
    const running: RunningMessage = { digests, loadMs: times.loadEnd - times.loadStart, resumeMs: performance.now() - times.loadEnd };
    // Whether or not the source hears of it.
    await main.writer.writeJson(FrameType.Running, 0, running).catch(() => {});
    try {
      this.#setStatus('completed');
    } catch (err) {
      warn('a MIGRATION listener', err);
    }
    const cleanup = await Promise.allSettled(this.handlers.map((h) => h.loadCleanup('completed', ctx)));
    for (const r of cleanup) if (r.status === 'rejected') warn('cleanup', r.reason);
    return { status: 'completed', totalTimeMs: performance.now() - times.t0, loadMs: times.loadEnd - times.loadStart, downtimeMs, digests, sectionBytes: this.#sectionBytes };
  }

  #sectionBytes: number[] = [];
  /** Section bytes the devices have finished loading (the source subtracts them from what it sent). */
  #loadedBytes = 0;

  /** Tells the source what this side's devices need at switchover (for its downtime estimate). */
  async #sendLoadReport(main: Channel): Promise<void> {
    const sections: LoadReportMessage['sections'] = [];
    this.handlers.forEach((h, section) => {
      if (h.resumeDeviceTimeMs) sections.push({ section, resumeDeviceMs: h.resumeDeviceTimeMs(), loadMsPerMiB: h.loadMsPerMiB?.() ?? null });
    });
    // Arrived counts what sits in this side's buffers too: it has crossed the link.
    const receivedBytes = this.#channels.reduce((n, ch) => n + (ch ? ch.reader.bytesArrived : 0), 0);
    await main.writer.writeJson(FrameType.LoadReport, 0, { sections, receivedBytes, loadedBytes: this.#loadedBytes } satisfies LoadReportMessage);
  }

  /** Says every device is loaded and stopped, and waits for the source's Commit. */
  async #awaitCommit(main: Channel): Promise<void> {
    // From here the source decides: it aborts (and says so) or commits.
    if (this.#abortTimer) clearTimeout(this.#abortTimer);
    await main.writer.write(FrameType.ReadyToRun, 0);
    // A source that never answers (gone without a FIN) must not keep this side waiting forever.
    const frame = await withTimeout(main.reader.next(), COMMIT_TIMEOUT_MS, `no commit from the source within ${COMMIT_TIMEOUT_MS} ms: the VM stays with the source`);
    if (frame?.type === FrameType.Commit) {
      this.#committed = true;
      return;
    }
    if (frame?.type === FrameType.Cancel) throw new MigrationError('ERR_MIGRATION_CANCELLED', `the source cancelled: ${parseJson<{ reason: string }>(frame).reason}`);
    if (!frame) throw this.#failure ?? new MigrationError('ERR_MIGRATION_CONNECTION', 'the source went away before committing: the VM stays with the source');
    throw new MigrationError('ERR_MIGRATION_PROTOCOL', `expected Commit, got a ${FrameType[frame.type]} frame`);
  }

  async #sendAck(main: Channel): Promise<void> {
    if (this.#acked) return;
    this.#acked = true;
    await main.writer.write(FrameType.SwitchoverAck, 0);
  }

  #compatibility(hello: HelloMessage): string | null {
    if (hello.wireVersion !== WIRE_VERSION) return `wire version ${hello.wireVersion} is not ${WIRE_VERSION}`;
    if (!Array.isArray(hello.sections)) return 'the hello lists no sections';
    if (hello.sections.length !== this.handlers.length) return `the source has ${hello.sections.length} sections, the destination ${this.handlers.length}`;
    for (let i = 0; i < this.handlers.length; i++) {
      const mine = this.handlers[i]!.describe();
      const theirs = hello.sections[i]!;
      if (theirs.kind !== mine.kind || theirs.compat !== mine.compat)
        return `section ${i} (${theirs.id}) is ${theirs.kind} "${theirs.compat}" on the source but ${mine.kind} "${mine.compat}" here (${mine.id})`;
    }
    if (!Number.isInteger(hello.channels) || hello.channels < 1 || hello.channels > 64) return `bad channel count ${hello.channels}`;
    return null;
  }

  async #acceptMain(signal?: AbortSignal): Promise<HelloMessage> {
    // Connections may arrive in any order; the one that says Hello is the main channel.
    for (;;) {
      const socket = await this.#nextConnection(signal);
      const ch = makeChannel(0, socket, { deferDataChecksums: true });
      const first = await ch.reader.next().catch(() => null);
      if (first?.type === FrameType.Hello) {
        this.#channels[0] = ch;
        return parseJson<HelloMessage>(first);
      }
      if (first?.type === FrameType.ChannelHello) {
        this.#early.push({ ch, index: parseJson<{ index: number }>(first).index });
        continue;
      }
      socket.destroy();
    }
  }

  #early: { ch: Channel; index: number }[] = [];
  #queue: net.Socket[] = [];
  #waiter: ((s: net.Socket) => void) | null = null;

  #nextConnection(signal?: AbortSignal): Promise<net.Socket> {
    if (!this.#listening) {
      this.#listening = true;
      this.#server!.on('accepted', (s: net.Socket) => {
        const w = this.#waiter;
        this.#waiter = null;
        if (w) w(s);
        else this.#queue.push(s);
      });
    }
    const queued = this.#queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      if (this.#failure) return reject(this.#failure);
      const onAbort = () => reject(new MigrationError('ERR_MIGRATION_CANCELLED', 'cancelled while waiting for the source'));
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiter = (s) => {
        signal?.removeEventListener('abort', onAbort);
        resolve(s);
      };
    });
  }
  #listening = false;

  async #acceptChannels(hello: HelloMessage, timeoutMs: number): Promise<void> {
    for (const e of this.#early) {
      e.ch.index = e.index;
      this.#channels[e.index] = e.ch;
    }
    const deadline = performance.now() + timeoutMs;
    while (this.#channels.filter(Boolean).length < hello.channels) {
      const left = deadline - performance.now();
      if (left <= 0) throw new MigrationError('ERR_MIGRATION_CONNECTION', `only ${this.#channels.filter(Boolean).length} of ${hello.channels} channels connected`);
      const ac = new AbortController();
      const timer = setTimeout(() => ac.abort(), left);
      let socket: net.Socket;
      try {
        socket = await this.#nextConnection(ac.signal);
      } finally {
        clearTimeout(timer);
      }
      const ch = makeChannel(0, socket, { deferDataChecksums: true });
      const first = await ch.reader.next();
      if (first?.type !== FrameType.ChannelHello) throw new MigrationError('ERR_MIGRATION_PROTOCOL', 'an extra channel did not identify itself');
      const m = parseJson<{ migrationId: string; index: number }>(first);
      if (m.migrationId !== hello.migrationId || !Number.isInteger(m.index) || m.index < 1 || m.index >= hello.channels || this.#channels[m.index])
        throw new MigrationError('ERR_MIGRATION_PROTOCOL', `unexpected channel ${m.index} of migration ${m.migrationId}`);
      ch.index = m.index;
      this.#channels[m.index] = ch;
    }
  }

  async #channelLoop(ch: Channel, hello: HelloMessage): Promise<void> {
    const main = this.#channels[0]!;
    this.#sectionBytes = this.#sectionBytes.length ? this.#sectionBytes : this.handlers.map(() => 0);
    // Loads are issued without waiting for the previous one: the device's data
    // thread runs them in order while this loop checks the next frames.
    const inflight: Promise<void>[] = [];
    const settleLoads = async () => {
      while (inflight.length) await inflight.shift();
    };
    // A frame taken while gathering data that turned out to be something else.
    let carried: Frame | null = null;
    for (;;) {
      if (this.#failure) throw this.#failure;
      const frame = carried ?? (await ch.reader.next());
      carried = null;
      if (!frame) throw new MigrationError('ERR_MIGRATION_CONNECTION', `the source closed channel ${ch.index} before the end of the stream`);
      const handler = this.handlers[frame.section];
      switch (frame.type) {
        case FrameType.SectionData: {
          if (!handler) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `data for unknown section ${frame.section}`);
          // Data frames of this section that are already here go to the
            // device in one write: fewer, larger loads.
          const parts = [...frame.parts];
          const frames = [frame];
          let gathered = frame.length;
          while (handler.byteStream && gathered < COALESCE_BYTES) {
            const next = ch.reader.nextIfBuffered();
            if (!next) break;
            if (next.type !== FrameType.SectionData || next.section !== frame.section) {
              carried = next;
              break;
            }
            parts.push(...next.parts);
            frames.push(next);
            gathered += next.length;
          }
          // Checked where the bytes are loaded (off the event loop) if the handler can; else here.
          let loading: Promise<void>;
          if (handler.loadChecked) {
            // An empty frame has no bytes to check on the device's thread: check it here.
            frames.filter((f) => f.parts.length === 0).forEach(verifyFrame);
            const checksums = frames.filter((f) => f.parts.length > 0).map((f) => ({ parts: f.parts.length, crc32c: f.checksum }));
            loading = handler.loadChecked(parts, checksums);
          } else {
            frames.forEach(verifyFrame);
            loading = handler.load(parts);
          }
          // Once the device has them, the bytes' memory can take new reads.
          void loading.finally(() => frames.forEach((f) => f.release())).catch(() => {});
          const load = loading.then(() => {
            this.#loadedBytes += gathered;
          });
          load.catch(() => {}); // awaited below; this only keeps it from counting as unhandled meanwhile
          inflight.push(load);
          if (inflight.length >= MAX_INFLIGHT_LOADS) await inflight.shift();
          ch.dataBytes += gathered;
          this.#sectionBytes[frame.section]! += gathered;
          break;
        }
        case FrameType.InitialSent: {
          if (!handler) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `initial marker for unknown section ${frame.section}`);
          // Everything before the marker has been loaded once the loads settle.
          await settleLoads();
          await handler.loadInitialDone?.();
          await main.writer.writeJson(FrameType.InitialLoaded, 0, { section: frame.section });
          await this.#sendLoadReport(main);
          this.#initialPending.delete(frame.section);
          if (hello.capabilities['switchover-ack'] && this.#initialPending.size === 0) await this.#sendAck(main);
          break;
        }
        case FrameType.Switchover: {
          const m = parseJson<{ stoppedAtEpochMs: number; abortAfterMs: number }>(frame);
          this.#sourceStoppedAt = m.stoppedAtEpochMs;
          this.#switchoverLimitMs = m.abortAfterMs;
          this.#armAbort();
          break;
        }
        case FrameType.EndOfStream:
          await settleLoads();
          return;
        case FrameType.Cancel:
          throw new MigrationError('ERR_MIGRATION_CANCELLED', `the source cancelled: ${parseJson<{ reason: string }>(frame).reason}`);
        default:
          throw new MigrationError('ERR_MIGRATION_PROTOCOL', `unexpected ${FrameType[frame.type]} frame on channel ${ch.index}`);
      }
      // Control frames are parsed by now (data frames go once loaded, above).
      if (frame.type !== FrameType.SectionData) frame.release();
    }
  }

  /**
   * The destination measures too: past the source's threshold it aborts,
   * tells the source, and cleans up. Time runs from the source's stop (same
   * clock on one host); a skewed clock falls back to this side's receipt.
   */
  #armAbort(): void {
    if (!(this.#switchoverLimitMs > 0)) return;
    const now = performance.timeOrigin + performance.now();
    let elapsed = now - this.#sourceStoppedAt;
    if (!(elapsed >= 0 && elapsed < this.#switchoverLimitMs * 10)) {
      this.#sourceStoppedAt = now;
      elapsed = 0;
    }
    this.#abortTimer = setTimeout(() => {
      if (this.#status === 'completed') return;
      const measured = performance.timeOrigin + performance.now() - this.#sourceStoppedAt;
      this.emitEvent('SWITCHOVER_ABORT', { measuredDowntimeMs: measured, abortAfterMs: this.#switchoverLimitMs, side: 'destination' });
      const err = new MigrationError('ERR_MIGRATION_SWITCHOVER_ABORTED', `switchover aborted on the destination: ${measured.toFixed(0)} ms since the source stopped, past downtime-limit + switchover-limit (${this.#switchoverLimitMs} ms)`);
      const main = this.#channels[0];
      const tell = main && !main.socket.destroyed ? main.writer.writeJson(FrameType.Error, 0, { ...describeError(err), notRunning: true }).catch(() => {}) : Promise.resolve();
      void tell.then(() => this.#fail(err));
    }, Math.max(0, this.#switchoverLimitMs - elapsed));
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    await new Promise<void>((resolve) => (this.#server ? this.#server.close(() => resolve()) : resolve()));
    this.#server = null;
  }
}
