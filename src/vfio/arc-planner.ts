// The arc planner: the single arcs the kernel walks for a state change,
// computed with the kernel's own table (vfio_mig_get_next_state, compiled into
// the addon so that the mock device and this planner share one copy).
import { native } from './native.js';
import { type MigrationFlags, type MigrationState, flagsToBits, stateFromKernel, stateToKernel } from './states.js';
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
