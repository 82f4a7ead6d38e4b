// Migration capabilities and parameters, with QEMU's names. Unknown names and
// bad values are errors, never ignored.
import { MigrationError } from './errors.js';

export interface MigrationCapabilities {
  'return-path': boolean;
  'switchover-ack': boolean;
  'switchover-abort': boolean;
  events: boolean;
  /**
   * Walk each device's reversible switchover arcs once during precopy (after
   * its initial bytes) to measure them: pre-copy -> pre-copy-p2p -> pre-copy.
   * Off by default: it briefly quiesces the device's P2P DMA while the VM runs.
   */
  'x-probe-switchover-arcs': boolean;
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
  /**
   * Expected time of a P2P quiesce arc (running -> running-p2p, pre-copy ->
   * pre-copy-p2p) never measured, probed or learned, ms. Real drivers take
   * hundreds of ms under load (mlx5 with RDMA traffic): too low a figure
   * breaks the downtime promise, too high a figure delays convergence.
   */
  'x-assumed-p2p-arc-ms': number;
  /** Expected time of any other arc never measured, probed or learned, ms. */
  'x-assumed-arc-ms': number;
  /**
   * Dynamic downtime limit: while the migration is stalled, the limit in force
   * ramps from downtime-limit up to this ceiling in four steps, one per stall
   * period (KubeVirt ramps 150 -> 1050 ms). 0 = off.
   */
  'x-downtime-limit-ceiling': number;
  /**
   * Longest silence from the peer, ms (heartbeats keep a live peer audible):
   * past it the peer counts as stopped or cut off and the migration fails,
   * rolled back on both sides before the commit. The destination uses the
   * source's value.
   */
  'peer-timeout': number;
}

export const DEFAULT_CAPABILITIES: MigrationCapabilities = { 'return-path': true, 'switchover-ack': false, 'switchover-abort': false, events: true, 'x-probe-switchover-arcs': false };
export const DEFAULT_PARAMETERS: MigrationParameters = {
  'downtime-limit': 300,
  'switchover-limit': 0,
  'max-bandwidth': 0,
  'avail-switchover-bandwidth': 0,
  'stall-iterations': 10,
  'x-assumed-p2p-arc-ms': 300,
  'x-assumed-arc-ms': 10,
  'x-downtime-limit-ceiling': 0,
  'peer-timeout': 10_000,
};

const LIMITS: Record<keyof MigrationParameters, [min: number, max: number]> = {
  'downtime-limit': [1, 2_000_000],
  'switchover-limit': [0, 2_000_000],
  'max-bandwidth': [0, Number.MAX_SAFE_INTEGER],
  'avail-switchover-bandwidth': [0, Number.MAX_SAFE_INTEGER],
  'stall-iterations': [2, 1_000_000],
  'x-assumed-p2p-arc-ms': [0, 600_000],
  'x-assumed-arc-ms': [0, 600_000],
  'x-downtime-limit-ceiling': [0, 2_000_000],
  'peer-timeout': [200, 3_600_000],
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
