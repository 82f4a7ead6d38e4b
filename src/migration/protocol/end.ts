// What a frame from the peer means, by phase: one table per side, read by
// both ends, for the whole migration and above all its end (ReadyToRun,
// Commit, Running, Error, Cancel before and after the commit). A frame with
// no entry in its phase is ERR_MIGRATION_PROTOCOL.
import { MigrationError } from '../errors.js';
import { FrameType } from './frame.js';

/**
 * The source's phases, as its return path sees them: `handshake` until the
 * HelloAck; `precopy` until it sends Switchover; `switchover` (VM stopped,
 * stream and ReadyToRun awaited) until it sends Commit; `committed` until
 * Running; `done` after it (or after a failure).
 */
export type SourcePhase = 'handshake' | 'precopy' | 'switchover' | 'committed' | 'done';

/** What a destination's frame means to the source. */
export type SourceMeaning =
  | 'accepted' // HelloAck: the migration starts
  | 'refused' // the destination refused in the handshake (nothing started there)
  | 'alive' // liveness only
  | 'ping' // answer Pong at once (the destination measures the round trip)
  | 'initial-loaded' // informational
  | 'report' // load report: arrival, loading, the destination's arcs
  | 'ack' // switchover-ack: every device loaded its initial bytes
  | 'ready' // every device is loaded and stopped there: commit now (or abort)
  | 'running' // the VM runs there: the migration completed
  | 'failed-before-commit' // the destination failed; nothing runs there: roll back
  | 'failed-after-commit' // the destination failed after the commit: roll back only if it says it runs nothing
  | 'late'; // after the end: ignored

const S = FrameType;
export const SOURCE_TABLE: Record<SourcePhase, Partial<Record<FrameType, SourceMeaning>>> = {
  handshake: { [S.HelloAck]: 'accepted', [S.Error]: 'refused' },
  precopy: { [S.Heartbeat]: 'alive', [S.Ping]: 'ping', [S.InitialLoaded]: 'initial-loaded', [S.LoadReport]: 'report', [S.SwitchoverAck]: 'ack', [S.Error]: 'failed-before-commit' },
  switchover: {
    [S.Heartbeat]: 'alive',
    [S.Ping]: 'ping',
    [S.InitialLoaded]: 'initial-loaded',
    [S.LoadReport]: 'report',
    [S.SwitchoverAck]: 'ack',
    [S.ReadyToRun]: 'ready',
    [S.Error]: 'failed-before-commit',
  },
  committed: { [S.Heartbeat]: 'alive', [S.LoadReport]: 'report', [S.Running]: 'running', [S.Error]: 'failed-after-commit' },
  done: Object.fromEntries(Object.values(FrameType).filter((v): v is FrameType => typeof v === 'number').map((t) => [t, 'late'])),
};

/**
 * The destination's phases: `loading` until the Switchover frame; `switchover`
 * (the source's VM is stopped, the abort clock runs) until every channel
 * ended and the devices are loaded and stopped; `ready` (ReadyToRun sent)
 * until the Commit; `committed` after it (the VM is this side's).
 */
export type DestinationPhase = 'loading' | 'switchover' | 'ready' | 'committed';

/** What a source's frame means to the destination. */
export type DestinationMeaning =
  | 'data' // section data: load it
  | 'initial-sent' // a section's initial bytes are all sent
  | 'initial-renewed' // a section's device has new initial bytes: its initial load is pending again (and the ACK with it)
  | 'switchover' // the source stopped the VM: start the abort clock
  | 'end-of-stream' // nothing more on this channel
  | 'alive'
  | 'pong' // the answer to a Ping: a round trip measured
  | 'cancelled' // the source gave up before the commit: reset, nothing runs here
  | 'commit' // the VM is this side's: run it whatever happens to the connection
  | 'late'; // after the commit: ignored (a cancel cannot take the VM back)

const loadingFrames = { [S.SectionData]: 'data', [S.InitialSent]: 'initial-sent', [S.InitialRenewed]: 'initial-renewed', [S.EndOfStream]: 'end-of-stream', [S.Heartbeat]: 'alive', [S.Pong]: 'pong', [S.Cancel]: 'cancelled' } as const;
export const DESTINATION_TABLE: Record<DestinationPhase, Partial<Record<FrameType, DestinationMeaning>>> = {
  // Extra channels have no Switchover frame: their EndOfStream may come first.
  loading: { ...loadingFrames, [S.Switchover]: 'switchover' },
  switchover: loadingFrames,
  ready: { [S.Commit]: 'commit', [S.Cancel]: 'cancelled', [S.Heartbeat]: 'alive', [S.Pong]: 'pong' },
  committed: { [S.Heartbeat]: 'late', [S.Pong]: 'late', [S.Cancel]: 'late' },
};

function unexpected(who: string, type: FrameType, phase: string): MigrationError {
  return new MigrationError('ERR_MIGRATION_PROTOCOL', `unexpected ${FrameType[type] ?? `type ${type}`} frame from the ${who} in the ${phase} phase`);
}

/** What a destination's frame means to the source in `phase` (ERR_MIGRATION_PROTOCOL if nothing). */
export function sourceMeaning(phase: SourcePhase, type: FrameType): SourceMeaning {
  const m = SOURCE_TABLE[phase][type];
  if (!m) throw unexpected('destination', type, phase);
  return m;
}

/** What a source's frame means to the destination in `phase` (ERR_MIGRATION_PROTOCOL if nothing). */
export function destinationMeaning(phase: DestinationPhase, type: FrameType): DestinationMeaning {
  const m = DESTINATION_TABLE[phase][type];
  if (!m) throw unexpected('source', type, phase);
  return m;
}
