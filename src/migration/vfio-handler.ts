// The VFIO device state handler: drives one VfioDevice through the migration
// and turns its data fd into section data.
import type { DataSession, ReadResult, VfioDevice } from '../vfio/device.js';
import type { Arc } from '../vfio/arc-planner.js';
import { type MigrationFlags, type MigrationState, P2P_QUIESCED_STATES, PRECOPY_STATES } from '../vfio/states.js';
import type { DeviceInfo, HandlerContext, PendingBytes, SectionDescription, SectionOutput, StateHandler } from './handler.js';
import { MAX_REPORTED_BYTES, clampDeviceBytes } from './accounting.js';
import { MigrationError } from './errors.js';

const READ_BYTES = 1 << 20;

export class VfioHandler implements StateHandler {
  readonly device: VfioDevice;
  #flags: MigrationFlags | null = null;
  #session: DataSession | null = null;
  #initialSent = false;
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

  async #step(target: MigrationState, ctx: HandlerContext): Promise<DataSession | null> {
    return this.device.stepTo(target, {
      onBeforeArc: (arc: Arc) => {
        if (P2P_QUIESCED_STATES.includes(arc.to)) ctx.prepare(this.device.id, arc.to);
      },
      onArc: (arc: Arc, ms: number) => {
        this.arcMs.set(`${arc.from}>${arc.to}`, ms);
        ctx.deviceState(this.device.id, arc.to, ms);
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
    const initialStopCopy = clampDeviceBytes(await this.device.stopCopySize(), MAX_REPORTED_BYTES);
    if (!initialStopCopy.clamped && initialStopCopy.value > 0) this.#ceilingBytes = Math.min(MAX_REPORTED_BYTES, initialStopCopy.value * 4 + (64 << 20));
    else this.#ceilingBytes = 1 << 40;
    if (flags.preCopy) this.#session = await this.#step('pre-copy', ctx);
    else this.#initialSent = true;
  }

  async pending(exact: boolean): Promise<PendingBytes> {
    const inPrecopy = this.#session && PRECOPY_STATES.includes(this.device.lastKnownState as MigrationState);
    if (exact || !this.#pending.exact) {
      // MIG_DATA_SIZE is queried once per iteration (exact) and cached in between.
      this.#stopCopyBytes = this.#clamp(await this.device.stopCopySize(), 'stop-copy size');
    }
    let precopyBytes = 0;
    if (inPrecopy) {
      const info = await this.device.precopyInfo(this.#session);
      precopyBytes = Math.min(MAX_REPORTED_BYTES, this.#clamp(info.initialBytes, 'initial_bytes') + this.#clamp(info.dirtyBytes, 'dirty_bytes'));
    }
    this.#pending = { precopyBytes, stopcopyBytes: this.#stopCopyBytes, exact };
    return this.#pending;
  }

  /** A read issued ahead of time, so the device produces while the network sends. */
  #readAhead: Promise<ReadResult> | null = null;

  #read(session: DataSession): Promise<ReadResult> {
    const r = this.#readAhead ?? session.read(READ_BYTES);
    this.#readAhead = null;
    return r;
  }

  async savePrecopy(budgetBytes: number, out: SectionOutput): Promise<number> {
    const session = this.#session;
    if (!session || !PRECOPY_STATES.includes(this.device.lastKnownState as MigrationState)) return 0;
    let sent = 0;
    while (sent < budgetBytes) {
      const r = await this.#read(session);
      if (r.kind !== 'data') break;
      // Read the next chunk while this one goes out, unless the budget is spent.
      if (sent + r.bytes.length < budgetBytes) this.#readAhead = session.read(READ_BYTES);
      await out.send(r.bytes);
      sent += r.bytes.length;
    }
    this.transferredBytes += sent;
    if (!this.#initialSent && !this.#readAhead) {
      const info = await this.device.precopyInfo(session);
      if (info.initialBytes === 0n) {
        this.#initialSent = true;
        await out.initialSent();
      }
    }
    return sent;
  }

  /** Whether all initial bytes have gone out (switchover-ack waits for their load). */
  get initialSent(): boolean {
    return this.#initialSent;
  }

  get hasPrecopy(): boolean {
    return this.#flags?.preCopy ?? false;
  }

  async saveQuiesce(ctx: HandlerContext): Promise<void> {
    const flags = await this.#flagsOnce();
    if (!flags.p2p) return;
    const state = this.device.lastKnownState;
    await this.#step(state === 'pre-copy' ? 'pre-copy-p2p' : 'running-p2p', ctx);
  }

  async saveStop(ctx: HandlerContext): Promise<void> {
    const opened = await this.#step('stop-copy', ctx);
    if (opened) this.#session = opened;
    if (!this.#session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: no data fd in stop-copy`);
  }

  async saveComplete(out: SectionOutput): Promise<number> {
    const session = this.#session;
    if (!session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: no data session`);
    let sent = 0;
    for (;;) {
      const r = await this.#read(session);
      if (r.kind === 'end') break;
      if (r.kind === 'no-data') throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: ENOMSG in stop-copy`);
      this.#readAhead = session.read(READ_BYTES);
      await out.send(r.bytes);
      sent += r.bytes.length;
    }
    this.transferredBytes += sent;
    return sent;
  }

  async #closeSession(): Promise<void> {
    const s = this.#session;
    this.#session = null;
    // A read still in flight finishes on the data thread before the close there.
    await this.#readAhead?.catch(() => {});
    this.#readAhead = null;
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
    ctx.deviceState(this.device.id, 'running', 0);
  }

  // ---- destination ----
  async loadSetup(ctx: HandlerContext): Promise<void> {
    this.#ctx = ctx;
    await this.#flagsOnce();
    this.#session = await this.#step('resuming', ctx);
    if (!this.#session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: no data fd in resuming`);
  }

  async load(parts: readonly Buffer[]): Promise<void> {
    if (!this.#session) throw new MigrationError('ERR_MIGRATION_DEVICE', `${this.device.id}: data arrived outside resuming`);
    await this.#session.write(parts);
    for (const p of parts) this.transferredBytes += p.length;
  }

  async loadFinish(ctx: HandlerContext): Promise<void> {
    await this.#step('stop', ctx);
    await this.#closeSession();
  }

  async loadResumeP2P(ctx: HandlerContext): Promise<void> {
    if ((await this.#flagsOnce()).p2p) await this.#step('running-p2p', ctx);
  }

  async loadResume(ctx: HandlerContext): Promise<void> {
    await this.#step('running', ctx);
  }

  async loadCleanup(outcome: 'completed' | 'failed', ctx: HandlerContext): Promise<void> {
    await this.#closeSession();
    if (outcome === 'failed') {
      await this.device.reset();
      ctx.deviceState(this.device.id, 'running', 0);
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
