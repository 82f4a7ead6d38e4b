// Device migration states and flags, named as QEMU's QAPI names them
// (QapiVfioMigrationState), mapped to the kernel's enum vfio_device_mig_state.

export const MIGRATION_STATES = [
  'error',
  'stop',
  'running',
  'stop-copy',
  'resuming',
  'running-p2p',
  'pre-copy',
  'pre-copy-p2p',
] as const;

export type MigrationState = (typeof MIGRATION_STATES)[number];

/** The kernel's enum value for each state (index in MIGRATION_STATES). */
export function stateToKernel(state: MigrationState): number {
  return MIGRATION_STATES.indexOf(state);
}

export function stateFromKernel(value: number): MigrationState | undefined {
  return MIGRATION_STATES[value];
}

export function isMigrationState(value: unknown): value is MigrationState {
  return typeof value === 'string' && (MIGRATION_STATES as readonly string[]).includes(value);
}

/** VFIO_MIGRATION_* flags, as booleans. */
export interface MigrationFlags {
  stopCopy: boolean;
  p2p: boolean;
  preCopy: boolean;
}

export const MIGRATION_FLAG_BITS = { stopCopy: 1, p2p: 2, preCopy: 4 } as const;
export type MigrationFlagName = keyof typeof MIGRATION_FLAG_BITS;

export function flagsFromBits(bits: number): MigrationFlags {
  return { stopCopy: (bits & 1) !== 0, p2p: (bits & 2) !== 0, preCopy: (bits & 4) !== 0 };
}

export function flagsToBits(flags: MigrationFlags): number {
  return (flags.stopCopy ? 1 : 0) | (flags.p2p ? 2 : 0) | (flags.preCopy ? 4 : 0);
}

/**
 * The states a device with these flags supports (uapi: a successful MIGRATION
 * GET means RUNNING and ERROR exist; STOP_COPY adds STOP, STOP_COPY, RESUMING;
 * P2P adds RUNNING_P2P; PRE_COPY adds PRE_COPY; both add PRE_COPY_P2P).
 */
export function supportedStates(flags: MigrationFlags): MigrationState[] {
  const states: MigrationState[] = ['error', 'running'];
  if (!flags.stopCopy) return states;
  states.push('stop', 'stop-copy', 'resuming');
  if (flags.p2p) states.push('running-p2p');
  if (flags.preCopy) states.push('pre-copy');
  if (flags.p2p && flags.preCopy) states.push('pre-copy-p2p');
  return states;
}

/** States in which the device hands out its state through a data fd. */
export const SAVING_STATES: readonly MigrationState[] = ['pre-copy', 'pre-copy-p2p', 'stop-copy'];
export const PRECOPY_STATES: readonly MigrationState[] = ['pre-copy', 'pre-copy-p2p'];
/** States in which the device does not initiate P2P DMA and is not fully running. */
export const P2P_QUIESCED_STATES: readonly MigrationState[] = ['running-p2p', 'pre-copy-p2p'];

/** Whether the single arc from -> to opens a new data fd (uapi single arcs). */
export function arcOpensDataFd(from: MigrationState, to: MigrationState): boolean {
  return (
    (from === 'running' && to === 'pre-copy') ||
    (from === 'running-p2p' && to === 'pre-copy-p2p') ||
    (from === 'stop' && to === 'stop-copy') ||
    (from === 'stop' && to === 'resuming')
  );
}
