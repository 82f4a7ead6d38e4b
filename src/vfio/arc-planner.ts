// The arc planner: the single arcs the kernel walks for a state change,
// computed with the kernel's own table (vfio_mig_get_next_state, compiled into
// the addon so that the mock device and this planner share one copy).
import { native } from './native.js';
import { type MigrationFlags, type MigrationState, P2P_QUIESCED_STATES, PRECOPY_STATES, SAVING_STATES, flagsToBits, stateFromKernel, stateToKernel, supportedStates } from './states.js';
import { VfioError } from './errors.js';

export interface Arc {
  from: MigrationState;
  to: MigrationState;
}

/** The next single arc from `current` toward `target`, or null if the kernel refuses. */
export function nextState(current: MigrationState, target: MigrationState, flags: MigrationFlags): MigrationState | null {
  const next = native.nextState(stateToKernel(current), stateToKernel(target), flagsToBits(flags));
  return next === null ? null : (stateFromKernel(next) ?? null);
}

/**
 * The sequence of single arcs the kernel walks from `current` to `target`.
 * Throws ERR_VFIO_UNSUPPORTED_STATE when the path is refused (a state the
 * flags lack, ERROR, or a blocked arc such as stop-copy -> pre-copy).
 */
export function planArcs(current: MigrationState, target: MigrationState, flags: MigrationFlags): Arc[] {
  const arcs: Arc[] = [];
  let at = current;
  while (at !== target) {
    const next = nextState(at, target, flags);
    if (next === null) {
      throw new VfioError('ERR_VFIO_UNSUPPORTED_STATE', `the kernel refuses ${current} -> ${target} (at ${at}) for a device with flags ${describeFlags(flags)}`, {
        arc: { from: current, to: target },
      });
    }
    arcs.push({ from: at, to: next });
    at = next;
    if (arcs.length > 8) throw new Error(`arc planner loop ${current} -> ${target}`);
  }
  return arcs;
}

export function describeFlags(flags: MigrationFlags): string {
  const names = [flags.stopCopy && 'stop-copy', flags.p2p && 'p2p', flags.preCopy && 'pre-copy'].filter(Boolean);
  return names.length ? names.join('+') : 'none';
}

// The migration's paths, derived from the state table and the kernel's walk
// rather than written out per flag combination.

/**
 * The state a source device runs in while its state is copied live: its
 * pre-copy state that keeps P2P going (pre-copy) when it has PRE_COPY,
 * otherwise running.
 */
export function liveState(flags: MigrationFlags): MigrationState {
  const supported = supportedStates(flags);
  return supported.find((s) => PRECOPY_STATES.includes(s) && !P2P_QUIESCED_STATES.includes(s)) ?? 'running';
}

/** Where a save ends: the saving state that is not a pre-copy state (stop-copy). */
export const STOP_COPY_STATE: MigrationState = SAVING_STATES.find((s) => !PRECOPY_STATES.includes(s))!;

/**
 * The source's switchover: from the live state to stop-copy as the kernel
 * walks it (through the P2P-quiesced state first, where the device has P2P).
 */
export function switchoverPath(flags: MigrationFlags): Arc[] {
  return planArcs(liveState(flags), STOP_COPY_STATE, flags);
}

/** The destination's path from loading to running: resuming -> stop (-> running-p2p) -> running. */
export function resumePath(flags: MigrationFlags): Arc[] {
  return planArcs('resuming', 'running', flags);
}

/** The first P2P-quiesced state on the kernel's path from -> to (the quiesce step before a stop or a run), or null. */
export function quiescedOnPath(from: MigrationState, to: MigrationState, flags: MigrationFlags): MigrationState | null {
  return planArcs(from, to, flags).find((a) => P2P_QUIESCED_STATES.includes(a.to))?.to ?? null;
}
