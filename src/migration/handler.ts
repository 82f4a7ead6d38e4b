// State handlers: every participant of a migration (a VFIO device, guest RAM,
// whatever the embedding VMM registers) implements one interface, the
// analogue of QEMU's SaveVMHandlers. The orchestrator drives them through the
// phases; they never talk to the network themselves.
import type { MigrationState } from '../vfio/states.js';
import type { HandlerEventName, MigrationEventMap } from './events.js';

/** What an expected time rests on: seen in this migration, seen when probed before the stop, learned from earlier migrations of the same model, or assumed (never seen). */
export type EstimateBasis = 'measured' | 'probed' | 'learned' | 'assumed';

/**
 * The barrier steps of a switchover, in order, each named after the hook that
 * walks it: every handler finishes a step before any starts the next, so each
 * step costs its slowest handler. Source: `quiesce` (saveQuiesce: the P2P
 * quiesce, hundreds of ms on real drivers under load), `stop` (saveStop).
 * Destination: `finish` (loadFinish), `resume-p2p` (loadResumeP2P), `resume`
 * (loadResume).
 */
export const SWITCHOVER_STEPS = ['quiesce', 'stop', 'finish', 'resume-p2p', 'resume'] as const;
export type SwitchoverStep = (typeof SWITCHOVER_STEPS)[number];
/** Which side walks a step. */
export const stepSide = (step: SwitchoverStep): 'source' | 'destination' => (step === 'quiesce' || step === 'stop' ? 'source' : 'destination');

/** What some steps cost when every handler finishes each step before any starts the next: per step its slowest handler, summed (arcs without a figure count 0). */
export function stepsCriticalMs(perHandler: readonly (readonly ArcEstimate[])[], steps: readonly SwitchoverStep[]): number {
  let total = 0;
  for (const step of steps) {
    let slowest = 0;
    for (const arcs of perHandler) slowest = Math.max(slowest, arcs.filter((a) => a.step === step).reduce((ms, a) => ms + (a.ms ?? 0), 0));
    total += slowest;
  }
  return total;
}

/** One single arc a device walks at switchover, the step that walks it, and what its time rests on (`ms` is null when assumed: the policy supplies the assumption). */
export interface ArcEstimate {
  /** "from>to", e.g. "pre-copy>pre-copy-p2p": the handler's own name, shown to people. */
  arc: string;
  step: SwitchoverStep;
  ms: number | null;
  basis: EstimateBasis;
}

/** Data a handler still has to send, split the way the switchover decision needs it. */
export interface PendingBytes {
  /** What can be sent now, while the VM runs. */
  precopyBytes: number;
  /** What must be sent after the VM stops, if it stopped now. */
  stopcopyBytes: number;
  /** True at iteration boundaries (exact queries); false for cheap estimates. */
  exact: boolean;
}

/** Identity checked in the handshake before any device changes state. */
export interface SectionDescription {
  id: string;
  kind: string;
  /** Compatibility key: a device profile, vendor data, a RAM layout... */
  compat: string;
}

/** Where a handler's data goes: the section's channel. */
export interface SectionOutput {
  /** `crc32c`: the CRC32C of `data` if the handler has it already (it spares the event loop a pass over the bytes). */
  send(data: Buffer, crc32c?: number): Promise<void>;
  /** Marks the end of this section's initial bytes (for switchover-ack). */
  initialSent(): Promise<void>;
  /**
   * The section's initial bytes start over (a device's REINIT): written
   * before the new initial bytes; the destination's initial load is pending
   * again until the next initialSent(), and switchover-ack waits for it.
   */
  initialRenewed(): Promise<void>;
}

export interface HandlerContext {
  /**
   * Aborted when the migration fails or is cancelled while it can still roll
   * back: a hook's pending work (a walk of device arcs, a wait) stops there.
   * The hooks that roll back or finish (saveCleanup, loadCleanup, and the
   * destination's loadResumeP2P/loadResume past the commit) get a context
   * whose signal stays live: what they do must finish.
   */
  signal: AbortSignal;
  /** Emits a handler's own event (its device's state changes) on the migration's emitter: the core names no device kind. */
  emit<K extends HandlerEventName>(event: K, data: MigrationEventMap[K]): void;
  /** A MIGRATION_WARNING (and, at the source, an entry of the result's warnings). */
  warn(message: string, data?: Record<string, unknown>): void;
}

export interface StateHandler {
  describe(): SectionDescription;
  /**
   * Where the section's data goes: `main` (the default) keeps it on the main
   * channel; `spread` places it on one of the extra channels, round-robin, so
   * that sections (devices) load in parallel at the destination.
   */
  readonly channelPlacement?: 'main' | 'spread';

  // ---- source ----
  saveSetup(ctx: HandlerContext): Promise<void>;
  pending(exact: boolean): Promise<PendingBytes>;
  /**
   * Optional: true while the handler knows its initial bytes start over but
   * has not yet said so through initialRenewed() (e.g. pending() saw a
   * REINIT): the source treats the switchover-ack as withdrawn meanwhile.
   */
  readonly initialRenewPending?: boolean;
  /** Sends up to about `budgetBytes` of precopy data; returns the bytes sent. */
  savePrecopy(budgetBytes: number, out: SectionOutput): Promise<number>;
  /** Switchover, step 1 (all handlers in parallel): stop initiating P2P DMA. Optional: only P2P-capable participants quiesce. */
  saveQuiesce?(ctx: HandlerContext): Promise<void>;
  /** Switchover, step 2 (after every handler quiesced): stop and open the stop-copy stream. */
  saveStop(ctx: HandlerContext): Promise<void>;
  /** Sends everything that is left; returns the bytes sent. */
  saveComplete(out: SectionOutput): Promise<number>;
  /** Source done: `completed` leaves devices stopped; `failed` brings them back to running. */
  saveCleanup(outcome: 'completed' | 'failed', ctx: HandlerContext): Promise<void>;

  // ---- destination ----
  /**
   * `probeArcs` (the source asked for x-probe-switchover-arcs): before
   * RESUMING, while nothing runs here, the handler may walk its idle device
   * through the switchover's arcs to measure them (see reportArcs).
   */
  loadSetup(ctx: HandlerContext, options?: { probeArcs?: boolean }): Promise<void>;
  /**
   * Section data in arrival order. For a `byteStream` section, `parts` are
   * any run of its bytes (frames may be merged); otherwise one frame's payload.
   * The parts' memory takes new socket reads once the promise settles: copy
   * anything kept beyond that.
   */
  load(parts: readonly Buffer[]): Promise<void>;
  /**
   * Optional: load() for data not yet checked. Each run of `checksums[i].parts`
   * parts must have CRC32C `checksums[i].crc32c`; the handler verifies a run
   * before any of its bytes are used (e.g. on the device's data thread) and
   * rejects with ERR_MIGRATION_PROTOCOL on a mismatch. Without it, the
   * destination verifies on the event loop before load().
   */
  loadChecked?(parts: readonly Buffer[], checksums: readonly { parts: number; crc32c: number }[]): Promise<void>;
  /** The section's data is an opaque byte stream: frame boundaries carry no meaning (a VFIO data fd). */
  readonly byteStream?: boolean;
  /** Whether this section sends initial bytes that must load before switchover (switchover-ack waits for them). */
  hasInitialData?(): boolean;
  /** The source marked the end of the initial bytes; everything before it has been loaded. */
  loadInitialDone?(): Promise<void>;
  /** All data arrived: validate and stop (RESUMING -> STOP). */
  loadFinish(ctx: HandlerContext): Promise<void>;
  /** Step 1 of resuming (all handlers in parallel): RUNNING_P2P where supported. Optional. */
  loadResumeP2P?(ctx: HandlerContext): Promise<void>;
  /** Step 2: fully running. Optional: a participant with nothing to start (RAM) leaves it out. */
  loadResume?(ctx: HandlerContext): Promise<void>;
  /** Destination done; `failed` resets devices. Optional. */
  loadCleanup?(outcome: 'completed' | 'failed', ctx: HandlerContext): Promise<void>;

  /** Source: the arcs this device walks at switchover (to stop-copy, in P2P order), each with its expected time and basis. */
  switchoverArcs?(): ArcEstimate[];
  /** The arcs the destination walks (resuming -> running); on the source side, what its own history knows of them. */
  resumeArcs?(): ArcEstimate[];
  /** Destination, optional: the arcs its LoadReport carries (default resumeArcs()); may add source-path arcs it probed on its idle device. */
  reportArcs?(): ArcEstimate[];
  /**
   * Source, optional (capability x-probe-switchover-arcs): walk the switchover's
   * reversible arcs once while the VM runs (e.g. pre-copy -> pre-copy-p2p ->
   * pre-copy) to measure them. Resolves true when done (or nothing to probe),
   * false when not ready yet (initial bytes still going out).
   */
  probeSwitchover?(ctx: HandlerContext): Promise<boolean>;
  /** Source, optional: how fast the section re-dirties while its device runs, bytes/s (null before it was measured). */
  dirtyBytesPerSec?(): number | null;
  /** Destination: observed load cost, ms per MiB written (null before anything was measured). */
  loadMsPerMiB?(): number | null;

  /** Content digest, where the handler can prove what it holds (mock devices, synthetic RAM). */
  digest?(when: 'saved' | 'loaded'): string | undefined;
  /** Per-device figures for the query. */
  deviceInfo?(): DeviceInfo | undefined;
}

export interface DeviceInfo {
  id: string;
  state: MigrationState | 'unknown';
  transferredBytes: number;
  pendingPrecopyBytes: number;
  pendingStopcopyBytes: number;
  /** The device's share of the expected downtime, ms: arcs on both sides (each with its basis) and load beyond the transfer. */
  expectedSwitchover?: { sourceArcsMs: number; destinationArcsMs: number; loadMs: number; arcs: ResolvedArc[] };
}

/** An arc estimate with the assumption applied: what the policy counts. */
export interface ResolvedArc {
  device: string;
  side: 'source' | 'destination';
  arc: string;
  step: SwitchoverStep;
  ms: number;
  basis: EstimateBasis;
}
