// Typed migration events. Each is emitted under its own name and, for
// consumers that want one ordered stream (the CLI's JSON lines, a QMP
// socket), also as 'event' with its name and a timestamp.
import { EventEmitter } from 'node:events';
import type { MigrationState } from '../vfio/states.js';
import type { DowntimeSplit } from './policy.js';

/** QEMU's MigrationStatus values that apply here. */
export type MigrationStatus = 'none' | 'setup' | 'active' | 'device' | 'completed' | 'failed' | 'cancelling' | 'cancelled';

export type VfioEventState = MigrationState | `${MigrationState}-prepare`;

export interface MigrationEventMap {
  /** A device changed state, or (`*-prepare`) is about to start a transition into a P2P state. */
  VFIO_MIGRATION: { device: string; state: VfioEventState; arcMs?: number };
  MIGRATION: { status: MigrationStatus; reason?: { code: string; message: string } };
  MIGRATION_PASS: {
    pass: number;
    remainingBytes: number;
    stopcopyBytes: number;
    expectedDowntimeMs: number | null;
    bandwidthBytesPerSec: number;
    /** The expected downtime in parts, each with what it rests on (measured, probed, learned, assumed). */
    expectedDowntime: DowntimeSplit;
    /** The limit in force (downtime-limit, or the dynamic limit once it ramped). */
    downtimeLimitMs: number;
    /** Why this pass switched over or did not (what a migration that goes on waits for). */
    reason: string;
  };
  /** Reported when the stall starts and again every few seconds while it lasts. */
  MIGRATION_STALLED: { pass: number; remainingBytes: number; suggestedDowntimeLimitMs: number; downtimeLimitMs: number; expectedDowntime: DowntimeSplit; message: string };
  MIGRATION_WARNING: { message: string; data?: Record<string, unknown> };
  /** `renewals`: how many initial-data renewals (device REINITs) the ACK covers. */
  SWITCHOVER_ACK: { afterMs: number; renewals: number };
  /** A device announced new initial bytes (VFIO_PRECOPY_INFO_REINIT): they go out before the switchover, and with switchover-ack the source waits for a new ACK. */
  INITIAL_RENEWED: { device: string; section: number; renewals: number; afterMs: number };
  /** Said on both sides, once: `side` is the one whose clock reached the bound first (each runs it). */
  SWITCHOVER_ABORT: { measuredDowntimeMs: number; abortAfterMs: number; side: 'source' | 'destination' };
  /** The source told the destination to run the VM: from here on it never resumes the VM by itself (no split brain). */
  MIGRATION_COMMITTED: { afterStopMs: number };
  /** Destination: a connection refused before any migration took it (bad first frame, busy, TLS: `reason`); it changed nothing here. */
  CONNECTION_REFUSED: { code: string; message: string; reason?: string };
}

export type MigrationEventName = keyof MigrationEventMap;

/** The events state handlers emit themselves (HandlerContext.emit); every other event is the core's. */
export type HandlerEventName = 'VFIO_MIGRATION';

export interface MigrationEventRecord<K extends MigrationEventName = MigrationEventName> {
  event: K;
  data: MigrationEventMap[K];
  /** ms since the epoch, sub-ms precision. */
  timestamp: number;
}

/** A record of any event, discriminated by `event` (what 'event' listeners receive). */
export type AnyMigrationEventRecord = { [K in MigrationEventName]: MigrationEventRecord<K> }[MigrationEventName];

/** A listener of one named event: its payload and when it was emitted (ms since the epoch). */
export type MigrationEventListener<K extends MigrationEventName> = (data: MigrationEventMap[K], timestamp: number) => void;

// Typed on/once/off for every event (declaration merging with the class
// below): a misspelt event name or a wrong payload type is a compile error.
export interface MigrationEvents {
  on<K extends MigrationEventName>(event: K, listener: MigrationEventListener<K>): this;
  on(event: 'event', listener: (record: AnyMigrationEventRecord) => void): this;
  once<K extends MigrationEventName>(event: K, listener: MigrationEventListener<K>): this;
  once(event: 'event', listener: (record: AnyMigrationEventRecord) => void): this;
  off<K extends MigrationEventName>(event: K, listener: MigrationEventListener<K>): this;
  off(event: 'event', listener: (record: AnyMigrationEventRecord) => void): this;
}

export class MigrationEvents extends EventEmitter {
  readonly history: MigrationEventRecord[] = [];
  keepHistory = true;

  emitEvent<K extends MigrationEventName>(event: K, data: MigrationEventMap[K]): void {
    const record: MigrationEventRecord<K> = { event, data, timestamp: performance.timeOrigin + performance.now() };
    if (this.keepHistory) this.history.push(record);
    this.emit(event, data, record.timestamp);
    this.emit('event', record);
  }

  onEvent<K extends MigrationEventName>(event: K, listener: (data: MigrationEventMap[K], timestamp: number) => void): this {
    return this.on(event, listener);
  }
}
