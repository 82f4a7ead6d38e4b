// The VFIO device state handler: drives one VfioDevice through the migration
// and turns its data fd into section data.
import type { DataSession, PrecopyInfo, ReadResult, VfioDevice } from '../vfio/device.js';
import type { VfioError } from '../vfio/errors.js';
import { type Arc, STOP_COPY_STATE, liveState, quiescedOnPath, resumePath, switchoverPath } from '../vfio/arc-planner.js';
import { type MigrationFlags, type MigrationState, P2P_QUIESCED_STATES, PRECOPY_STATES } from '../vfio/states.js';
import type { ArcEstimate, DeviceInfo, HandlerContext, PendingBytes, SectionDescription, SectionOutput, StateHandler, SwitchoverStep } from './handler.js';
import { MAX_REPORTED_BYTES, clampDeviceBytes } from './accounting.js';
import { MigrationError, describeError } from './errors.js';

/**
 * Reads start at 1 MiB and follow the device's rate between 256 KiB and
 * 4 MiB, so that one takes about READ_TARGET_MS: large enough that a fast
 * device streams in few round trips, small enough that a slow device's read
 * in flight never holds a switchover (or its abort) up for long.
 */
const FIRST_READ_BYTES = 1 << 20;
const MIN_READ_BYTES = 256 << 10;
const MAX_READ_BYTES = 4 << 20;
const READ_TARGET_MS = 20;
/**
 * Full reads whose rate sizes the next ones (the fastest counts): the device's
 * capability is its best recent read, and a busy host can preempt the data
 * thread for several reads in a row (four 4 MiB reads of 20-40 ms each, seen
 * on a loaded 2-core CI machine, against 1-3 ms when idle).
 */
const READ_RATE_SAMPLES = 8;
/** Reads kept queued on the device's data thread, so it produces while the event loop sends. */
const READS_AHEAD = 3;
/** Precopy data smaller than this is gathered before it goes out as a frame. */
const MIN_FRAME_BYTES = 256 * 1024;
/** Writes at least this large say what a backlog costs to load (see loadMsPerMiB). */
const LARGE_WRITE_BYTES = 1 << 20;
/** The load rate is the fastest of this many recent (large) writes. */
const LOAD_RATE_SAMPLES = 4;

/**
 * Arc latencies learned across migrations in this process, per device model
 * (the compatibility key): a retry, or the next migration of the same model,
 * starts from what earlier ones observed, including arcs a migration only
 * takes at switchover (pre-copy -> pre-copy-p2p can take hundreds of ms).
 * An embedder can persist it with exportArcHistory()/importArcHistory().
 */
const arcHistory = new Map<string, Map<string, number>>();

export function exportArcHistory(): Record<string, Record<string, number>> {
  return Object.fromEntries([...arcHistory].map(([k, v]) => [k, Object.fromEntries(v)]));
}

/** Forgets every learned arc latency of this process (a first contact, as on a fresh host). */
export function clearArcHistory(): void {
  arcHistory.clear();
}

export function importArcHistory(history: Record<string, Record<string, number>>): void {
  for (const [model, arcs] of Object.entries(history)) {
    const m = arcHistory.get(model) ?? new Map<string, number>();
    for (const [arc, ms] of Object.entries(arcs)) if (Number.isFinite(ms) && ms >= 0) m.set(arc, ms);
    arcHistory.set(model, m);
  }
}

export class VfioHandler implements StateHandler {
  readonly device: VfioDevice;
  /** A data fd is a byte stream: the destination may merge frames into one write. */
  readonly byteStream = true;
  /** Devices spread over the extra channels, so that they load in parallel. */
  readonly channelPlacement = 'spread';
  #flags: MigrationFlags | null = null;
  #session: DataSession | null = null;
  #initialSent = false;
  /** The device fd opted in to VFIO_PRECOPY_INFO flags (MIG_PRECOPY_INFOv2): REINIT can be seen. */
  precopyInfoV2 = false;
  /** A REINIT seen (by pending() or savePrecopy()) but not yet announced with out.initialRenewed(). */
  #reinitUnannounced = false;
  /** REINITs seen in this migration. */
  reinits = 0;
  #stopCopyBytes = 0;
  #pending: PendingBytes = { precopyBytes: 0, stopcopyBytes: 0, exact: false };
  /** Ceiling for device-reported figures: what the device could possibly hold. */
  #ceilingBytes = MAX_REPORTED_BYTES;
  #ctx: HandlerContext | null = null;
  /** Last observed duration of each single arc, "from>to" -> ms. */
  readonly arcMs = new Map<string, number>();
  transferredBytes = 0;

  constructor(device: VfioDevice) {
    this.device = device;
  }

  describe(): SectionDescription {
    const p = this.device.profile;
    const compat = p ? `mock:${p.name}:${p.stateBytes}:${p.chunkBytes}:${p.setupBytes}:${p.stopCopyOnlyBytes}` : `vfio:${this.device.kind}`;
    return { id: this.device.id, kind: 'vfio', compat };
  }

  async #flagsOnce(): Promise<MigrationFlags> {
    this.#flags ??= await this.device.migrationFlags();
    return this.#flags;
  }

  /** `probe`: a walk before the stop to measure arcs (kept apart from what the migration itself observed). */
  async #step(target: MigrationState, ctx: HandlerContext, probe = false): Promise<DataSession | null> {
    return this.device.stepTo(target, {
      // A failed or cancelled migration stops the walk at the next arc (the rollback's own walk has a live signal).
      signal: ctx.signal,
      onBeforeArc: (arc: Arc) => {
        // The `<state>-prepare` event: a slow P2P quiesce arc is about to start.
        if (P2P_QUIESCED_STATES.includes(arc.to)) ctx.emit('VFIO_MIGRATION', { device: this.device.id, state: `${arc.to}-prepare` });
      },
      onArc: (arc: Arc, ms: number) => {
        (probe ? this.probedArcMs : this.arcMs).set(`${arc.from}>${arc.to}`, ms);
        const model = this.describe().compat;
        if (!arcHistory.has(model)) arcHistory.set(model, new Map());
        arcHistory.get(model)!.set(`${arc.from}>${arc.to}`, ms);
        ctx.emit('VFIO_MIGRATION', { device: this.device.id, state: arc.to, arcMs: ms });
      },
    });
  }

  #clamp(raw: bigint, what: string): number {
    const r = clampDeviceBytes(raw, this.#ceilingBytes);
    if (r.clamped) this.#ctx?.warn(`${this.device.id}: device reported an impossible ${what} of ${raw} bytes; clamped to ${r.value}`, { device: this.device.id, what, raw: raw.toString(), clamped: r.value });
    return r.value;
  }

  // ---- source ----
  async saveSetup(ctx: HandlerContext): Promise<void> {
    this.#ctx = ctx;
    const flags = await this.#flagsOnce();
    await this.device.getState();
    // The device cannot hold more than its stop-copy size at the start (with a
    // generous margin for streams that re-send dirtied state).
    // The first sane figure of the device's size (MIG_DATA_SIZE, or the
    // initial bytes of a fresh pre-copy session) bounds every later one.
    const sizes: bigint[] = [await this.device.stopCopySize()];
    if (flags.preCopy) {
      // Opt in to the PRECOPY_INFO flags before the first PRECOPY_INFO, so a
      // REINIT (entirely new initial bytes) is seen and re-acknowledged.
      // A kernel or driver without it (6.12, its mtty) resolves false: the
      // migration goes on as before, a REINIT's data then just shows as
      // more initial bytes, and nothing waits for their load.
      this.precopyInfoV2 = await this.device.enablePrecopyInfoV2().catch((err: unknown) => {
        ctx.warn(`${this.device.id}: opting in to PRECOPY_INFOv2 failed (${(err as Error).message}); REINITs will not be seen`, { device: this.device.id });
        return false;
      });
      this.#session = await this.#step('pre-copy', ctx);
      if (this.#session) sizes.push((await this.#precopyInfo(this.#session)).initialBytes);
    } else this.#initialSent = true;
    const sane = sizes.filter((v) => v > 0n && v < 1n << 50n).map(Number);
    this.#ceilingBytes = sane.length ? Math.min(MAX_REPORTED_BYTES, Math.min(...sane) * 4 + (64 << 20)) : 1 << 40;
  }

  async pending(exact: boolean): Promise<PendingBytes> {
    const inPrecopy = this.#session && PRECOPY_STATES.includes(this.device.lastKnownState as MigrationState);
    if (exact || !this.#pending.exact) {
      // MIG_DATA_SIZE is queried once per iteration (exact) and cached in between.
      this.#stopCopyBytes = this.#clamp(await this.device.stopCopySize(), 'stop-copy size');
    }
    let precopyBytes = 0;
    if (inPrecopy) {
      const info = await this.#precopyInfo(this.#session!);
      precopyBytes = Math.min(MAX_REPORTED_BYTES, this.#clamp(info.initialBytes, 'initial_bytes') + this.#clamp(info.dirtyBytes, 'dirty_bytes'));
    }
    this.#pending = { precopyBytes, stopcopyBytes: this.#stopCopyBytes, exact };
    if (exact && inPrecopy) this.#sampleDirtying();
    return this.#pending;
  }

  /** Bytes the device has given to reads (in precopy and after). */
  #bytesRead = 0;
  #dirtySamples: { ms: number; bytes: number }[] = [];
  #lastDirtySample: { at: number; stopCopyBytes: number; bytesRead: number } | null = null;

  /**
   * How fast the device re-dirties its state while it runs: between two
   * exact queries, the growth of its stop-copy size plus what reads took
   * from it. A device keeps running (and dirtying) through its switchover
   * arcs until it is in stop-copy: the estimate adds what it dirties then.
   */
  #sampleDirtying(): void {
    const now = performance.now();
    const last = this.#lastDirtySample;
    this.#lastDirtySample = { at: now, stopCopyBytes: this.#stopCopyBytes, bytesRead: this.#bytesRead };
    if (!last || now - last.at <= 0) return;
    const grown = this.#stopCopyBytes - last.stopCopyBytes + (this.#bytesRead - last.bytesRead);
    this.#dirtySamples.push({ ms: now - last.at, bytes: Math.max(0, grown) });
    // About the last two seconds.
    let ms = 0;
    for (let i = this.#dirtySamples.length - 1; i >= 0; i--) {
      ms += this.#dirtySamples[i]!.ms;
      if (ms > 2000) {
        this.#dirtySamples.splice(0, i);
        break;
      }
    }
  }

  /** The device's dirtying rate while it runs, bytes/s (null before two exact queries in precopy). */
  dirtyBytesPerSec(): number | null {
    let ms = 0;
    let bytes = 0;
    for (const d of this.#dirtySamples) {
      ms += d.ms;
      bytes += d.bytes;
    }
    return ms > 0 ? (bytes / ms) * 1000 : null;
  }

  /** Reads issued ahead of time, in stream order; `inPrecopy`: issued in a PRE_COPY state. */
  #readsAhead: { result: Promise<ReadResult>; inPrecopy: boolean }[] = [];

  #readBytes = FIRST_READ_BYTES;
  /** Bytes per ms of the last full reads. */
  #readRates: number[] = [];
  #lastReadDoneAt = 0;

  /** Bytes the next data reads ask for (follows the device's read rate). */
  get readBytes(): number {
    return this.#readBytes;
  }

  #issueRead(session: DataSession): void {
    const asked = this.#readBytes;
    const issuedAt = performance.now();
    const result = session.read(asked).then((r) => {
      if (r.kind === 'data') this.#bytesRead += r.bytes.length;
      this.#learnReadRate(r, asked, issuedAt);
      return r;
    });
    result.catch(() => {}); // awaited in order by #nextRead or #closeSession
    this.#readsAhead.push({ result, inPrecopy: PRECOPY_STATES.includes(this.device.lastKnownState as MigrationState) });
  }

  /** Sizes the next reads from this one's service time (from when it could start: reads queue). */
  #learnReadRate(r: ReadResult, asked: number, issuedAt: number): void {
    const done = performance.now();
    const serviceMs = done - Math.max(issuedAt, this.#lastReadDoneAt);
    this.#lastReadDoneAt = done;
    // A short read only says the stream ran dry for now.
    if (r.kind !== 'data' || r.bytes.length < asked) return;
    // The device's own time for the read(2), timed on its data thread, where
    // the addon gives it: the event loop's view adds its own delays. One
    // sample can still be a preemption of that thread (30-90 ms seen on a
    // loaded 2-core host), so the rate is the fastest of the last few reads.
    const ms = r.readMs !== undefined && r.readMs >= 0 ? r.readMs : serviceMs;
    this.#readRates.push(r.bytes.length / Math.max(ms, 0.01));
    if (this.#readRates.length > READ_RATE_SAMPLES) this.#readRates.shift();
    const fits = Math.max(...this.#readRates) * READ_TARGET_MS;
    this.#readBytes = Math.min(MAX_READ_BYTES, Math.max(MIN_READ_BYTES, 2 ** Math.floor(Math.log2(Math.max(1, fits)))));
  }

  #nextRead(session: DataSession): { result: Promise<ReadResult>; inPrecopy: boolean } {
    if (this.#readsAhead.length === 0) this.#issueRead(session);
    return this.#readsAhead.shift()!;
  }

  /** Whether a REINIT was seen and not yet told to the core (the source withholds the switchover meanwhile). */
  get initialRenewPending(): boolean {
    return this.#reinitUnannounced;
  }

  /** PRECOPY_INFO; a REINIT makes the initial bytes unsent again, to be announced by savePrecopy(). */
  async #precopyInfo(session: DataSession): Promise<PrecopyInfo> {
    const info = await this.device.precopyInfo(session);
    if (info.reinit) {
      this.reinits++;
      this.#reinitUnannounced = true;
      this.#initialSent = false;
    }
    return info;
  }

  async savePrecopy(budgetBytes: number, out: SectionOutput): Promise<number> {
    const session = this.#session;
    if (!session || !PRECOPY_STATES.includes(this.device.lastKnownState as MigrationState)) return 0;
    // Before the new initial bytes (some may have been read ahead already:
    // the destination loads in order, and their end is the next InitialSent).
    if (this.#reinitUnannounced) {
      this.#reinitUnannounced = false;
      await out.initialRenewed();
    }
    let sent = 0;
    // A running device re-dirties its state a little at a time: small reads
    // are gathered into one frame, so the destination loads in few large
    // writes instead of a backlog of thousands of tiny ones.
    let small: Buffer[] = [];
    let smallBytes = 0;
    const flush = async () => {
      if (smallBytes === 0) return;
      const data = small.length === 1 ? small[0]! : Buffer.concat(small, smallBytes);
      small = [];
      smallBytes = 0;
      await out.send(data);
    };
    while (sent < budgetBytes) {
      const r = await this.#nextRead(session).result;
      if (r.kind !== 'data') break;
      // Read the next chunks while this one goes out, as far as the budget goes.
      while (this.#readsAhead.length < READS_AHEAD && sent + r.bytes.length + this.#readsAhead.length * this.#readBytes < budgetBytes) this.#issueRead(session);
      sent += r.bytes.length;
      if (r.bytes.length >= MIN_FRAME_BYTES && smallBytes === 0) await out.send(r.bytes, r.crc32c);
      else {
        small.push(r.bytes);
        smallBytes += r.bytes.length;
        if (smallBytes >= MIN_FRAME_BYTES) await flush();
      }
    }
    await flush();
    this.transferredBytes += sent;
    if (!this.#initialSent && this.#readsAhead.length === 0) {
      const info = await this.#precopyInfo(session);
      if (this.#reinitUnannounced) {
        this.#reinitUnannounced = false;
        await out.initialRenewed();
      } else if (info.initialBytes === 0n) {
        this.#initialSent = true;
        await out.initialSent();
      }
    }
    return sent;
  }

  /**
   * Each arc's expected time and what it rests on: seen in this migration,
   * probed before the stop, learned from earlier migrations of this model, or
   * assumed (ms null: the policy applies its assumption and warns).
   */
  #estimate(arcs: (Arc & { step: SwitchoverStep })[]): ArcEstimate[] {
    const history = arcHistory.get(this.describe().compat);
    return arcs.map(({ from, to, step }) => {
      const arc = `${from}>${to}`;
      const measured = this.arcMs.get(arc);
      if (measured !== undefined) return { arc, step, ms: measured, basis: 'measured' };
      const probed = this.probedArcMs.get(arc);
      if (probed !== undefined) return { arc, step, ms: probed, basis: 'probed' };
      const learned = history?.get(arc);
      if (learned !== undefined) return { arc, step, ms: learned, basis: 'learned' };
      return { arc, step, ms: null, basis: 'assumed' };
    });
  }

  /**
   * The switchover path, as the kernel walks it, each arc with the hook that
   * walks it: saveQuiesce up to the P2P-quiesced state where the device has
   * P2P, saveStop the rest, to stop-copy.
   */
  switchoverArcs(): ArcEstimate[] {
    const f = this.#flags;
    if (!f) return [];
    const quiesced = quiescedOnPath(liveState(f), STOP_COPY_STATE, f);
    let step: SwitchoverStep = quiesced ? 'quiesce' : 'stop';
    return this.#estimate(
      switchoverPath(f).map((a) => {
        const tagged = { ...a, step };
        if (a.to === quiesced) step = 'stop';
        return tagged;
      }),
    );
  }

  /**
   * The destination's path, as the kernel walks it, each arc with the hook
   * that walks it: loadFinish resuming -> stop, loadResumeP2P on to the
   * P2P-quiesced state where the device has P2P, loadResume to running.
   */
  resumeArcs(): ArcEstimate[] {
    const f = this.#flags;
    if (!f) return [];
    const quiesced = quiescedOnPath('stop', 'running', f);
    let step: SwitchoverStep = 'finish';
    return this.#estimate(
      resumePath(f).map((a) => {
        const tagged = { ...a, step };
        if (a.to === 'stop') step = quiesced ? 'resume-p2p' : 'resume';
        else if (a.to === quiesced) step = 'resume';
        return tagged;
      }),
    );
  }

  /** Whether the destination walked the switchover path on this idle device (see #probeIdle). */
  #probedIdle = false;

  /**
   * Destination, with x-probe-switchover-arcs: before RESUMING, while nothing
   * runs on this device (no guest, no data yet), walk the path the source's
   * device of the same model takes at switchover, pre-copy-p2p -> stop-copy
   * included (the arc the source cannot probe without stopping its device),
   * then this side's resume arcs stop -> running-p2p -> running. The figures
   * are an idle device's: a busy device's stop may take longer, which the
   * next migration learns. resuming -> stop cannot be walked without data: it
   * stays assumed unless learned.
   */
  async #probeIdle(ctx: HandlerContext): Promise<void> {
    const f = this.#flags!;
    if (this.device.lastKnownState !== 'running' && (await this.device.getState()) !== 'running') return;
    const opened: (DataSession | null)[] = [];
    if (f.preCopy) opened.push(await this.#step('pre-copy', ctx, true));
    if (f.p2p) opened.push(await this.#step(f.preCopy ? 'pre-copy-p2p' : 'running-p2p', ctx, true));
    opened.push(await this.#step('stop-copy', ctx, true));
    await this.#step('stop', ctx, true);
    for (const s of opened) await s?.close().catch(() => {});
    if (f.p2p) await this.#step('running-p2p', ctx, true);
    await this.#step('running', ctx, true);
    this.#probedIdle = true;
  }

  /**
   * Destination: what the LoadReport tells the source: the resume arcs and,
   * after an idle probe, the source's switchover arcs as walked here (same
   * model: the compatibility check holds), which the source takes for arcs it
   * could not measure itself.
   */
  reportArcs(): ArcEstimate[] {
    const resume = this.resumeArcs();
    if (!this.#probedIdle) return resume;
    return [...resume, ...this.switchoverArcs().filter((a) => a.basis !== 'assumed')];
  }

  /** Arc times measured by the probe (x-probe-switchover-arcs), "from>to" -> ms. */
  readonly probedArcMs = new Map<string, number>();
  #probed = false;

  /**
   * Walks the reversible part of the switchover path and back while the VM
   * runs: pre-copy -> pre-copy-p2p -> pre-copy (running -> running-p2p ->
   * running without PRE_COPY), with the same prepare events as at switchover.
   * PRE_COPY_P2P -> STOP_COPY cannot be probed: it stops the device.
   */
  async probeSwitchover(ctx: HandlerContext): Promise<boolean> {
    const f = this.#flags;
    if (this.#probed || !f || !f.p2p) return true;
    const state = this.device.lastKnownState;
    // Initial bytes still to read (reads queued ahead may hide that the stream already drained them).
    if (f.preCopy && !this.#initialSent && this.#session && state === 'pre-copy' && (await this.#precopyInfo(this.#session)).initialBytes > 0n) return false;
    // Only from the live state (pre-copy, or running): the quiesce step there and back.
    const quiesced = state === 'pre-copy' || state === 'running' ? quiescedOnPath(state, STOP_COPY_STATE, f) : null;
    if (!quiesced) return true;
    this.#probed = true;
    await this.#step(quiesced, ctx, true);
    await this.#step(state as MigrationState, ctx, true);
    return true;
  }

  /** Recent per-write load costs (ms per MiB) and sizes; the median ignores one-off setup spikes. */
  #loadSamples: { msPerMiB: number; bytes: number; write: number }[] = [];
  #lastLoadDone = 0;
  /** Writes so far (a sample names the write it came from). */
  #writes = 0;

  /**
   * The source's initial bytes are all loaded. The write that completed them
   * paid the device's one-off setup for its initial data (what switchover-ack
   * waits for: 2 s on a slow loader), not a per-MiB cost: taken for a rate,
   * one such 4 MiB write read 500 ms/MiB and the estimate then never fit the
   * limit. Its sample goes.
   */
  async loadInitialDone(): Promise<void> {
    this.#loadSamples = this.#loadSamples.filter((s) => s.write !== this.#writes);
  }

  /**
   * The load cost per MiB of data that arrives in bulk (a backlog, stop-copy
   * data). Each write also pays a fixed cost (the hand-off to the device's
   * thread), which on the small writes of a trickle of dirty data is most of
   * the time, while a backlog loads in large gathered writes: so the figure
   * comes from the writes of 1 MiB or more when there are any. Of those, the
   * fastest of the last few: what slows one write down is one-off (the first
   * writes touch fresh device memory, 3-8 ms/MiB, where later ones take
   * 1.1-1.4; a preemption on a busy host; an initial load's setup, 600), as
   * for the data reads' rate.
   */
  loadMsPerMiB(): number | null {
    const large = this.#loadSamples.filter((s) => s.bytes >= LARGE_WRITE_BYTES);
    const samples = (large.length > 0 ? large : this.#loadSamples).slice(-LOAD_RATE_SAMPLES);
    if (samples.length === 0) return null;
    return Math.min(...samples.map((s) => s.msPerMiB));
  }

  /** Whether all initial bytes have gone out (switchover-ack waits for their load). */
  get initialSent(): boolean {
    return this.#initialSent;
  }

  /** Devices with PRE_COPY send initial bytes first; the destination loads them before the ACK. */
  hasInitialData(): boolean {
    return this.#flags?.preCopy ?? false;
  }

  async saveQuiesce(ctx: HandlerContext): Promise<void> {
    const flags = await this.#flagsOnce();
    if (!flags.p2p) return;
    const state = this.device.lastKnownState;
    const quiesced = quiescedOnPath(state === 'pre-copy' ? 'pre-copy' : 'running', STOP_COPY_STATE, flags);
    if (quiesced) await this.#step(quiesced, ctx);
  }

  async saveStop(ctx: HandlerContext): Promise<void> {
    const opened = await this.#step(STOP_COPY_STATE, ctx);
    if (opened) this.#session = opened;
    if (!this.#session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: no data fd in stop-copy`);
  }

  async saveComplete(out: SectionOutput): Promise<number> {
    const session = this.#session;
    if (!session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: no data session`);
    let sent = 0;
    for (;;) {
      const { result, inPrecopy } = this.#nextRead(session);
      const r = await result;
      if (r.kind === 'end') break;
      if (r.kind === 'no-data') {
        // A read issued in precopy found the stream's temporary end: the rest follows.
        if (inPrecopy) continue;
        throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: ENOMSG in stop-copy`);
      }
      while (this.#readsAhead.length < READS_AHEAD) this.#issueRead(session);
      await out.send(r.bytes, r.crc32c);
      sent += r.bytes.length;
    }
    this.transferredBytes += sent;
    return sent;
  }

  async #closeSession(): Promise<void> {
    const s = this.#session;
    this.#session = null;
    // Reads still in flight finish on the data thread before the close there.
    const pending = this.#readsAhead;
    this.#readsAhead = [];
    await Promise.allSettled(pending.map((p) => p.result));
    await s?.close().catch(() => {});
  }

  async saveCleanup(outcome: 'completed' | 'failed', ctx: HandlerContext): Promise<void> {
    await this.#closeSession();
    if (outcome === 'completed') {
      await this.#step('stop', ctx);
      return;
    }
    await this.#backToRunning(ctx);
  }

  async #backToRunning(ctx: HandlerContext): Promise<void> {
    let state: MigrationState | 'unknown' = 'unknown';
    try {
      state = await this.device.getState();
      if (state === 'running') return;
      if (state !== 'error') {
        await this.#step('running', ctx);
        return;
      }
    } catch {
      /* reset below */
    }
    ctx.warn(`${this.device.id}: device in ${state}; resetting it (its state is lost)`, { device: this.device.id });
    await this.device.reset();
    ctx.emit('VFIO_MIGRATION', { device: this.device.id, state: 'running', arcMs: 0 });
  }

  // ---- destination ----
  async loadSetup(ctx: HandlerContext, options: { probeArcs?: boolean } = {}): Promise<void> {
    this.#ctx = ctx;
    await this.#flagsOnce();
    // A failed walk costs the figures, not the migration: the device is reset if it ended in ERROR.
    if (options.probeArcs)
      await this.#probeIdle(ctx).catch(async (err: unknown) => {
        ctx.warn(`${this.device.id}: walking the idle device through the switchover arcs failed (${describeError(err).message}); they stay unprobed`, { device: this.device.id });
        if ((await this.device.getState().catch(() => 'error' as const)) === 'error') await this.device.reset();
      });
    this.#session = await this.#step('resuming', ctx);
    if (!this.#session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: no data fd in resuming`);
  }

  load(parts: readonly Buffer[]): Promise<void> {
    return this.#load(parts);
  }

  loadChecked(parts: readonly Buffer[], checksums: readonly { parts: number; crc32c: number }[]): Promise<void> {
    return this.#load(parts, checksums);
  }

  async #load(parts: readonly Buffer[], checksums?: readonly { parts: number; crc32c: number }[]): Promise<void> {
    if (!this.#session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: data arrived outside resuming`);
    const t0 = performance.now();
    try {
      await this.#session.write(parts, checksums ? { checksums } : {});
    } catch (err) {
      if ((err as VfioError).code === 'EBADMSG') throw new MigrationError('ERR_MIGRATION_PROTOCOL', `checksum mismatch in section data for ${this.device.id}: the stream was corrupted on its way`, { cause: err });
      throw err;
    }
    // Writes queue on the device's data thread: service time is from when
    // this one could start (the previous one finished) to when it finished.
    const done = performance.now();
    const ms = done - Math.max(t0, this.#lastLoadDone);
    this.#lastLoadDone = done;
    let bytes = 0;
    for (const p of parts) bytes += p.length;
    this.transferredBytes += bytes;
    this.#writes++;
    if (bytes >= 64 * 1024) {
      this.#loadSamples.push({ msPerMiB: (ms * (1 << 20)) / bytes, bytes, write: this.#writes });
      if (this.#loadSamples.length > 64) this.#loadSamples.shift();
    }
  }

  async loadFinish(ctx: HandlerContext): Promise<void> {
    await this.#step('stop', ctx);
    await this.#closeSession();
  }

  async loadResumeP2P(ctx: HandlerContext): Promise<void> {
    // loadFinish left the device in stop.
    const quiesced = quiescedOnPath('stop', 'running', await this.#flagsOnce());
    if (quiesced) await this.#step(quiesced, ctx);
  }

  async loadResume(ctx: HandlerContext): Promise<void> {
    await this.#step('running', ctx);
  }

  async loadCleanup(outcome: 'completed' | 'failed', ctx: HandlerContext): Promise<void> {
    await this.#closeSession();
    if (outcome === 'failed') {
      await this.device.reset();
      ctx.emit('VFIO_MIGRATION', { device: this.device.id, state: 'running', arcMs: 0 });
    }
  }

  digest(when: 'saved' | 'loaded'): string | undefined {
    if (this.device.kind !== 'mock') return undefined;
    const info = this.device.mockInfo();
    return when === 'saved' ? info.savedDigest : info.loadedDigest;
  }

  deviceInfo(): DeviceInfo {
    return {
      id: this.device.id,
      state: this.device.lastKnownState,
      transferredBytes: this.transferredBytes,
      pendingPrecopyBytes: this.#pending.precopyBytes,
      pendingStopcopyBytes: this.#pending.stopcopyBytes,
    };
  }
}
