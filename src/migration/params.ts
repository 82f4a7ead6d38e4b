// Migration capabilities and parameters, with QEMU's names. Unknown names and
// bad values are errors, never ignored.
import { MigrationError } from './errors.js';

export interface MigrationCapabilities {
  'return-path': boolean;
  'switchover-ack': boolean;
  'switchover-abort': boolean;
  events: boolean;
}

export interface MigrationParameters {
  /** Downtime the switchover decision aims for, ms (QEMU's downtime-limit). */
  'downtime-limit': number;
  /** With switchover-abort: measured downtime past which the switchover is aborted, ms. */
  'switchover-limit': number;
  /** Cap on the migration stream, bytes/s; 0 = unlimited. */
  'max-bandwidth': number;
  /** Bandwidth available for the switchover, bytes/s; 0 = use the measured one. */
  'avail-switchover-bandwidth': number;
  /** Iterations without progress before the migration is reported stalled. */
  'stall-iterations': number;
}

export const DEFAULT_CAPABILITIES: MigrationCapabilities = { 'return-path': true, 'switchover-ack': false, 'switchover-abort': false, events: true };
export const DEFAULT_PARAMETERS: MigrationParameters = {
  'downtime-limit': 300,
  'switchover-limit': 0,
  'max-bandwidth': 0,
  'avail-switchover-bandwidth': 0,
  'stall-iterations': 10,
};

const LIMITS: Record<keyof MigrationParameters, [min: number, max: number]> = {
  'downtime-limit': [1, 2_000_000],
  'switchover-limit': [0, 2_000_000],
  'max-bandwidth': [0, Number.MAX_SAFE_INTEGER],
  'avail-switchover-bandwidth': [0, Number.MAX_SAFE_INTEGER],
  'stall-iterations': [2, 1_000_000],
};

export function mergeCapabilities(base: MigrationCapabilities, update: unknown): MigrationCapabilities {
  if (update === undefined) return { ...base };
  if (typeof update !== 'object' || update === null) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', 'capabilities must be an object of name: boolean');
  const out = { ...base };
  for (const [name, value] of Object.entries(update)) {
    if (!(name in base)) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `unknown capability "${name}" (known: ${Object.keys(base).join(', ')})`);
    if (typeof value !== 'boolean') throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `capability "${name}" must be true or false, got ${JSON.stringify(value)}`);
    out[name as keyof MigrationCapabilities] = value;
  }
  for (const cap of ['switchover-ack', 'switchover-abort'] as const)
    if (out[cap] && !out['return-path']) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `capability "${cap}" requires capability "return-path"`);
  return out;
}

export function mergeParameters(base: MigrationParameters, update: unknown): MigrationParameters {
  if (update === undefined) return { ...base };
  if (typeof update !== 'object' || update === null) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', 'parameters must be an object of name: number');
  const out = { ...base };
  for (const [name, value] of Object.entries(update)) {
    if (!(name in base)) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `unknown parameter "${name}" (known: ${Object.keys(base).join(', ')})`);
    const [min, max] = LIMITS[name as keyof MigrationParameters];
    if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max)
      throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `parameter "${name}" must be a number between ${min} and ${max}, got ${JSON.stringify(value)}`);
    out[name as keyof MigrationParameters] = value;
  }
  return out;
}
