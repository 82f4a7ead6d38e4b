// Device migration states and flags, named as QEMU's QAPI names them
// (QapiVfioMigrationState), mapped to the kernel's enum vfio_device_mig_state.
// Every fact here comes from the addon's one table (native/uapi.h, exported
// as `stateFacts`): numbers, the flags each state needs, the groups, the arcs
// that open a data fd. Only the names are written here too, because
// TypeScript needs them at compile time; loading checks that they match.
import { native, type NativeStateFacts } from './native.js';

export type MigrationState = 'error' | 'stop' | 'running' | 'stop-copy' | 'resuming' | 'running-p2p' | 'pre-copy' | 'pre-copy-p2p';

/** Every state name once: a state added to the type and not here, or the reverse, does not compile. */
const STATE_NAMES: Record<MigrationState, true> = {
  error: true,
  stop: true,
  running: true,
  'stop-copy': true,
  resuming: true,
  'running-p2p': true,
  'pre-copy': true,
  'pre-copy-p2p': true,
};

/** VFIO_MIGRATION_* flags, as booleans. */
export interface MigrationFlags {
  stopCopy: boolean;
  p2p: boolean;
  preCopy: boolean;
}
export type MigrationFlagName = keyof MigrationFlags;
const FLAG_KEYS: Record<MigrationFlagName, true> = { stopCopy: true, p2p: true, preCopy: true };

/** The addon's table, checked once against the names TypeScript knows (a mismatched build fails here, not later). */
function checkedFacts(facts: NativeStateFacts): NativeStateFacts {
  const names = facts.states.map((s) => s.name);
  const known = Object.keys(STATE_NAMES);
  const flagKeys = facts.flags.map((f) => f.key);
  if (
    names.length !== known.length ||
    !names.every((n) => n in STATE_NAMES) ||
    new Set(names).size !== names.length ||
    !facts.states.every((s, i) => s.value === i) ||
    flagKeys.length !== Object.keys(FLAG_KEYS).length ||
    !flagKeys.every((k) => k in FLAG_KEYS)
  )
    throw new Error(`the addon's state table (${names.join(', ')}; flags ${flagKeys.join(', ')}) does not match this build of the library`);
  return facts;
}

/** The addon's table of state facts (native/uapi.h). */
export const STATE_FACTS: NativeStateFacts = checkedFacts(native.stateFacts);

/** The states in kernel enum order (index = the kernel's value). */
export const MIGRATION_STATES: readonly MigrationState[] = Object.freeze(STATE_FACTS.states.map((s) => s.name as MigrationState));

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

/** VFIO_MIGRATION_* bit of each flag. */
export const MIGRATION_FLAG_BITS: Readonly<Record<MigrationFlagName, number>> = Object.freeze(
  Object.fromEntries(STATE_FACTS.flags.map((f) => [f.key, f.bit])) as Record<MigrationFlagName, number>,
);
/** The flags' names in profiles and on the command line ("stop-copy", "p2p", "pre-copy"). */
export const MIGRATION_FLAG_NAMES: Readonly<Record<string, MigrationFlagName>> = Object.freeze(
  Object.fromEntries(STATE_FACTS.flags.map((f) => [f.name, f.key as MigrationFlagName])),
);

export function flagsFromBits(bits: number): MigrationFlags {
  const flags = { stopCopy: false, p2p: false, preCopy: false };
  for (const f of STATE_FACTS.flags) flags[f.key as MigrationFlagName] = (bits & f.bit) !== 0;
  return flags;
}

export function flagsToBits(flags: MigrationFlags): number {
  let bits = 0;
  for (const f of STATE_FACTS.flags) if (flags[f.key as MigrationFlagName]) bits |= f.bit;
  return bits;
}

/**
 * The states a device with these flags supports (uapi: a successful MIGRATION
 * GET means RUNNING and ERROR exist; every other state exists when the device
 * has the flags it needs), in kernel enum order.
 */
export function supportedStates(flags: MigrationFlags): MigrationState[] {
  const bits = flagsToBits(flags);
  return STATE_FACTS.states.filter((s) => s.always || (s.needs !== null && (s.needs & bits) === s.needs)).map((s) => s.name as MigrationState);
}

const group = (pick: (s: NativeStateFacts['states'][number]) => boolean): readonly MigrationState[] =>
  Object.freeze(STATE_FACTS.states.filter(pick).map((s) => s.name as MigrationState));

/** States in which the device hands out its state through a data fd (the saving group). */
export const SAVING_STATES: readonly MigrationState[] = group((s) => s.saving);
/** States in which VFIO_MIG_GET_PRECOPY_INFO is valid. */
export const PRECOPY_STATES: readonly MigrationState[] = group((s) => s.precopy);
/** States in which the device does not initiate P2P DMA and is not fully running. */
export const P2P_QUIESCED_STATES: readonly MigrationState[] = group((s) => s.p2pQuiesced);

/** Which data fd the single arc from -> to opens: a save stream, a resume stream, or none (uapi single arcs). */
export function dataFdOpenedBy(from: MigrationState, to: MigrationState): 'save' | 'resume' | null {
  const f = stateToKernel(from);
  const t = stateToKernel(to);
  return STATE_FACTS.dataFdArcs.find((a) => a.from === f && a.to === t)?.direction ?? null;
}

/** Whether the single arc from -> to opens a new data fd (uapi single arcs). */
export function arcOpensDataFd(from: MigrationState, to: MigrationState): boolean {
  return dataFdOpenedBy(from, to) !== null;
}
