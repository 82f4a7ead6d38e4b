// Mock device profiles: the documented JSON format (mock-device/README.md),
// validated here with an error naming the field for anything wrong, then
// normalised for the addon.
import { readFile, readdir } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VfioError } from './errors.js';
import { MIGRATION_FLAG_NAMES, type MigrationState, flagsToBits, isMigrationState, stateToKernel } from './states.js';
import { mockNative, type NativeMockProfile, type NativeMockProfileSchema } from './mock-native.js';

/** A byte count: a number, or a string with a binary unit ("64KiB", "2GiB"). */
export type ByteSize = number | string;

export interface MockFault {
  /** The single arc that fails, "from>to" with QAPI state names. */
  arc: string;
  /** errno name, e.g. "EIO". */
  errno: string;
  /** Leave the device in ERROR (only a reset leaves it). */
  intoError?: boolean;
  /** How many times the fault fires; omitted = every time. */
  times?: number;
}

export interface MockProfileInput {
  name: string;
  description?: string;
  /** VFIO_MIGRATION_* flags: "stop-copy" is required; "p2p", "pre-copy" optional. */
  flags: ('stop-copy' | 'p2p' | 'pre-copy')[];
  stateBytes: ByteSize;
  chunkBytes?: ByteSize;
  setupBytes?: ByteSize;
  stopCopyOnlyBytes?: ByteSize;
  dirtyBytesPerSec?: ByteSize;
  dirtyWorkingSetBytes?: ByteSize;
  /** Latency of single arcs in ms: "default" and "from>to" keys. */
  arcLatencyMs?: Record<string, number>;
  loadInitialMs?: number;
  loadMsPerMiB?: number;
  maxBytesPerSec?: ByteSize;
  resumeFailureIntoError?: boolean;
  dmaLogging?: boolean;
  faults?: MockFault[];
  corruptSaveAtByte?: number;
  bogusPrecopyInfo?: { initialBytes?: string | number; dirtyBytes?: string | number };
  bogusStopCopyBytes?: string | number;
  /** Driver personality: "generic" (default) or "mtty" (behaves as the kernel's mtty sample driver). */
  driver?: 'generic' | 'mtty';
  /** mtty personality: number of serial ports, 1 (mtty-1) or 2 (mtty-2, default). */
  ports?: 1 | 2;
  /** Accepts the VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 opt-in (default true; the mtty personality never does, as 6.12's mtty). */
  precopyInfoV2?: boolean;
  /** Once, `afterPrecopyMs` after entering PRE_COPY, the device announces `initialBytes` of entirely new initial data (VFIO_PRECOPY_INFO_REINIT). */
  reinit?: { afterPrecopyMs: number; initialBytes: ByteSize };
}

/** A validated profile: every field present, sizes in bytes. */
/** Profile fields the addon takes as they are (NativeMockProfile shares them). */
export interface MockProfileScalars {
  stateBytes: number;
  chunkBytes: number;
  setupBytes: number;
  stopCopyOnlyBytes: number;
  dirtyBytesPerSec: number;
  dirtyWorkingSetBytes: number;
  defaultArcLatencyMs: number;
  loadInitialMs: number;
  loadMsPerMiB: number;
  maxBytesPerSec: number;
  resumeFailureIntoError: boolean;
  dmaLogging: boolean;
  corruptSaveAtByte: number;
  bogusInitialBytes?: bigint;
  bogusDirtyBytes?: bigint;
  bogusStopCopyBytes?: bigint;
  /** Accepts the PRECOPY_INFOv2 opt-in. */
  precopyInfoV2: boolean;
  /** -1 = no REINIT. */
  reinitAfterPrecopyMs: number;
  reinitInitialBytes: number;
}

export interface MockProfile extends MockProfileScalars {
  name: string;
  description: string;
  flags: { stopCopy: boolean; p2p: boolean; preCopy: boolean };
  arcLatencyMs: { from: MigrationState; to: MigrationState; ms: number }[];
  faults: { from: MigrationState; to: MigrationState; errno: string; intoError: boolean; times: number }[];
  driver?: 'generic' | 'mtty';
  ports?: number;
}

const here = path.dirname(fileURLToPath(import.meta.url));
/** The shipped profiles: mock-device/profiles/ in the package. */
export const PROFILES_DIR = path.resolve(here, '..', '..', '..', 'mock-device', 'profiles');

/**
 * The mock addon's description of the profile (mock-device/mock_device.h,
 * VFIO_MOCK_PROFILE_FIELDS): every scalar field and the limits. Read on
 * first use, so that importing this module (the CLI does, for byte sizes)
 * loads no mock code.
 */
interface Schema {
  fields: NativeMockProfileSchema['fields'];
  limits: NativeMockProfileSchema['limits'];
  /** Top-level input fields. */
  known: Set<string>;
  /** Input objects whose keys are table fields ("reinit": { afterPrecopyMs, initialBytes }). */
  groups: Map<string, NativeMockProfileSchema['fields']>;
}
/** Input fields that are not scalars of the table: read by the code below. */
const STRUCTURED_FIELDS = ['name', 'description', 'flags', 'arcLatencyMs', 'faults', 'driver', 'ports'];
let schemaCache: Schema | undefined;
function schema(): Schema {
  if (schemaCache) return schemaCache;
  const { fields, limits } = mockNative().mockProfileSchema;
  const groups = new Map<string, NativeMockProfileSchema['fields']>();
  for (const f of fields) {
    const [group, key] = f.input.split('.');
    if (key === undefined || group === 'arcLatencyMs') continue;
    groups.set(group!, [...(groups.get(group!) ?? []), f]);
  }
  const known = new Set([...STRUCTURED_FIELDS, ...fields.filter((f) => f.input).map((f) => f.input.split('.')[0]!)]);
  return (schemaCache = { fields, limits, known, groups });
}

/**
 * Limits that keep any valid profile's memory and open time small (the mock
 * keeps ~5 bytes per chunk, twice while resuming: ~40 MiB at the chunk cap)
 * and every call's sleep short (close() also interrupts them): the mock
 * addon's (mock-device/mock_device.h), which enforces them.
 */
export const PROFILE_LIMITS: Readonly<NativeMockProfileSchema['limits']> = new Proxy({} as NativeMockProfileSchema['limits'], {
  get: (_, key) => schema().limits[key as keyof NativeMockProfileSchema['limits']],
  has: (_, key) => key in schema().limits,
  ownKeys: () => Reflect.ownKeys(schema().limits),
  getOwnPropertyDescriptor: (_, key) => ({ ...Reflect.getOwnPropertyDescriptor(schema().limits, key), configurable: true }),
});
const UNITS: Record<string, number> = { '': 1, B: 1, KiB: 2 ** 10, MiB: 2 ** 20, GiB: 2 ** 30, TiB: 2 ** 40 };

function fail(profile: string, field: string, problem: string): never {
  throw new VfioError('ERR_VFIO_PROFILE', `mock profile "${profile}": ${field} ${problem}`);
}

export function parseByteSize(value: unknown, profile: string, field: string): number {
  let bytes: number;
  if (typeof value === 'number') bytes = value;
  else if (typeof value === 'string') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB)?\s*$/.exec(value);
    if (!m) fail(profile, field, `must be a byte count like 4096 or "64MiB", got ${JSON.stringify(value)}`);
    bytes = Number(m[1]) * UNITS[m[2] ?? '']!;
  } else fail(profile, field, `must be a byte count, got ${JSON.stringify(value)}`);
  if (!Number.isFinite(bytes) || bytes < 0 || !Number.isSafeInteger(Math.round(bytes))) fail(profile, field, `must be a finite byte count >= 0, got ${JSON.stringify(value)}`);
  return Math.round(bytes);
}

function parseU64(value: unknown, profile: string, field: string): bigint {
  try {
    if (typeof value !== 'string' && typeof value !== 'number') throw new Error();
    const v = BigInt(value);
    if (v < 0n || v > 0xffff_ffff_ffff_ffffn) throw new Error();
    return v;
  } catch {
    fail(profile, field, `must be an unsigned 64-bit integer (number or decimal string), got ${JSON.stringify(value)}`);
  }
}

function nonNegative(value: unknown, profile: string, field: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) fail(profile, field, `must be a number >= 0, got ${JSON.stringify(value)}`);
  return value;
}

function bounded(value: unknown, profile: string, field: string, max: number): number {
  const v = nonNegative(value, profile, field);
  if (v > max) fail(profile, field, `must be at most ${max}, got ${v}`);
  return v;
}

function parseArc(arc: unknown, profile: string, field: string): { from: MigrationState; to: MigrationState } {
  const parts = typeof arc === 'string' ? arc.split('>') : [];
  if (parts.length !== 2 || !isMigrationState(parts[0]) || !isMigrationState(parts[1]) || parts[0] === parts[1])
    fail(profile, field, `must name a single arc as "from>to" with state names (e.g. "running-p2p>pre-copy-p2p"), got ${JSON.stringify(arc)}`);
  return { from: parts[0], to: parts[1] };
}

export function validateProfile(input: unknown): MockProfile {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw new VfioError('ERR_VFIO_PROFILE', 'mock profile must be a JSON object');
  const o = input as Record<string, unknown>;
  const name = o.name;
  if (typeof name !== 'string' || !/^[a-z0-9][a-z0-9._-]*$/.test(name)) throw new VfioError('ERR_VFIO_PROFILE', `mock profile: name must be a lowercase identifier, got ${JSON.stringify(name)}`);
  for (const key of Object.keys(o)) if (!schema().known.has(key)) fail(name, key, 'is not a profile field (see mock-device/README.md)');
  if (o.driver !== undefined && o.driver !== 'generic') return validateMttyProfile(name, o);
  if (o.ports !== undefined) fail(name, 'ports', 'is only used by the "mtty" driver personality');

  if (!Array.isArray(o.flags)) fail(name, 'flags', 'must be an array of "stop-copy", "p2p", "pre-copy"');
  const flags = { stopCopy: false, p2p: false, preCopy: false };
  for (const f of o.flags) {
    const key = typeof f === 'string' && Object.hasOwn(MIGRATION_FLAG_NAMES, f) ? MIGRATION_FLAG_NAMES[f] : undefined;
    if (!key) fail(name, 'flags', `has an unknown flag ${JSON.stringify(f)}`);
    flags[key] = true;
  }
  if (!flags.stopCopy) fail(name, 'flags', 'must include "stop-copy" (the uAPI requires VFIO_MIGRATION_STOP_COPY)');

  let defaultArcLatencyMs: number | undefined;
  const arcLatencyMs: MockProfile['arcLatencyMs'] = [];
  if (o.arcLatencyMs !== undefined) {
    if (typeof o.arcLatencyMs !== 'object' || o.arcLatencyMs === null) fail(name, 'arcLatencyMs', 'must be an object of "from>to": ms');
    for (const [arc, ms] of Object.entries(o.arcLatencyMs)) {
      const v = bounded(ms, name, `arcLatencyMs["${arc}"]`, PROFILE_LIMITS.maxDelayMs);
      if (arc === 'default') defaultArcLatencyMs = v;
      else arcLatencyMs.push({ ...parseArc(arc, name, `arcLatencyMs key`), ms: v });
    }
  }

  const faults: MockProfile['faults'] = [];
  if (o.faults !== undefined) {
    if (!Array.isArray(o.faults)) fail(name, 'faults', 'must be an array');
    if (o.faults.length > PROFILE_LIMITS.maxFaults) fail(name, 'faults', `must have at most ${PROFILE_LIMITS.maxFaults} entries`);
    o.faults.forEach((f: unknown, i: number) => {
      const field = `faults[${i}]`;
      if (typeof f !== 'object' || f === null) fail(name, field, 'must be an object');
      const fo = f as Record<string, unknown>;
      for (const k of Object.keys(fo)) if (!['arc', 'errno', 'intoError', 'times'].includes(k)) fail(name, `${field}.${k}`, 'is not a fault field (arc, errno, intoError, times)');
      const arc = parseArc(fo.arc, name, `${field}.arc`);
      const errnoName = fo.errno;
      if (typeof errnoName !== 'string' || !Object.hasOwn(osConstants.errno, errnoName)) fail(name, `${field}.errno`, `must be an errno name like "EIO", got ${JSON.stringify(errnoName)}`);
      const times = fo.times === undefined ? -1 : fo.times;
      if (typeof times !== 'number' || !Number.isInteger(times) || (times < 1 && times !== -1)) fail(name, `${field}.times`, 'must be a positive integer');
      if (fo.intoError !== undefined && typeof fo.intoError !== 'boolean') fail(name, `${field}.intoError`, 'must be a boolean');
      faults.push({ ...arc, errno: errnoName, intoError: fo.intoError === true, times });
    });
  }

  // Every scalar field of the table: its input read and parsed by kind, or its default.
  for (const [group, members] of schema().groups) {
    const g = o[group];
    if (g === undefined) continue;
    const keys = members.map((f) => f.input.split('.')[1]!);
    if (typeof g !== 'object' || g === null || Array.isArray(g)) fail(name, group, `must be an object { ${keys.join(', ')} }`);
    for (const k of Object.keys(g)) if (!keys.includes(k)) fail(name, `${group}.${k}`, `is not a field (${keys.join(', ')})`);
    for (const f of members) if (f.required && (g as Record<string, unknown>)[f.input.split('.')[1]!] === undefined) fail(name, f.input, 'is required');
  }
  if (o.reinit !== undefined && !flags.preCopy) fail(name, 'reinit', 'needs the "pre-copy" flag (a REINIT happens during PRE_COPY)');
  const scalars: Record<string, unknown> = {};
  for (const f of schema().fields) {
    if (!f.input) continue;
    const [group, key] = f.input.split('.');
    const raw = f.input === 'arcLatencyMs.default' ? defaultArcLatencyMs : key === undefined ? o[group!] : (o[group!] as Record<string, unknown> | undefined)?.[key];
    if (raw === undefined) {
      if (f.required && key === undefined) fail(name, f.input, 'is required');
      if (f.default !== null) scalars[f.name] = f.default;
      continue;
    }
    scalars[f.name] = parseScalar(f, raw, name);
  }
  const profile = {
    name,
    description: typeof o.description === 'string' ? o.description : '',
    flags,
    ...scalars,
    arcLatencyMs,
    faults,
  } as MockProfile;
  // The limits and the rules between fields: the addon's, which the device enforces.
  try {
    mockNative().checkMockProfile(toNativeProfile(profile));
  } catch (err) {
    const e = err as { code?: string; message?: string };
    if (e.code !== 'ERR_VFIO_PROFILE' && e.code !== 'ERR_VFIO_BAD_ARGUMENT') throw err;
    // Named as the profile's JSON names it (reinitAfterPrecopyMs is reinit.afterPrecopyMs).
    const message = String(e.message).replace(/^mock profile: /, '').replace(/^\w+/, (n) => schema().fields.find((f) => f.name === n && f.input)?.input ?? n);
    throw new VfioError('ERR_VFIO_PROFILE', `mock profile "${name}": ${message}`, { cause: err });
  }
  // 0 means the whole state.
  if (profile.dirtyWorkingSetBytes === 0) profile.dirtyWorkingSetBytes = profile.stateBytes;
  return profile;
}

/** One scalar input by its kind (mock_device.h): syntax here, ranges in the addon. */
function parseScalar(f: NativeMockProfileSchema['fields'][number], raw: unknown, profile: string): number | boolean | bigint {
  switch (f.kind) {
    case 'bytes':
    case 'rate':
      return parseByteSize(raw, profile, f.input);
    case 'ms':
      return nonNegative(raw, profile, f.input);
    case 'bool':
      if (typeof raw !== 'boolean') fail(profile, f.input, 'must be a boolean');
      return raw;
    case 'offset':
      if (typeof raw !== 'number' || !Number.isSafeInteger(raw) || raw < 0) fail(profile, f.input, 'must be a byte offset (integer >= 0)');
      return raw;
    case 'u64':
      return parseU64(raw, profile, f.input);
  }
}

// The mtty personality (mock-device/mtty_mock.h): the real driver's fixed
// behaviour; only the port count is configurable. The sizes are reported as
// the stream's: 36 bytes of state per port.
function validateMttyProfile(name: string, o: Record<string, unknown>): MockProfile {
  if (o.driver !== 'mtty') fail(name, 'driver', `must be "generic" or "mtty", got ${JSON.stringify(o.driver)}`);
  for (const key of Object.keys(o)) if (!['name', 'description', 'flags', 'driver', 'ports'].includes(key)) fail(name, key, 'is not used by the "mtty" driver personality (only name, description, flags, driver, ports)');
  const ports = o.ports === undefined ? 2 : o.ports;
  if (ports !== 1 && ports !== 2) fail(name, 'ports', `must be 1 or 2, got ${JSON.stringify(ports)}`);
  if (o.flags !== undefined && (!Array.isArray(o.flags) || [...o.flags].sort().join(',') !== 'p2p,pre-copy,stop-copy'))
    fail(name, 'flags', 'must be ["stop-copy", "p2p", "pre-copy"] for the "mtty" driver personality (its flags are fixed)');
  const defaults = Object.fromEntries(schema().fields.filter((f) => f.input && f.default !== null).map((f) => [f.name, f.default]));
  return {
    ...defaults,
    name, description: typeof o.description === 'string' ? o.description : '', flags: { stopCopy: true, p2p: true, preCopy: true },
    stateBytes: 36 * ports, chunkBytes: 36, dirtyWorkingSetBytes: 36 * ports, arcLatencyMs: [], faults: [], dmaLogging: true, driver: 'mtty', ports,
    // 6.12's mtty has no MIG_PRECOPY_INFOv2 and never re-initialises.
    precopyInfoV2: false,
  } as unknown as MockProfile;
}

/** Names of the shipped profiles. */
export async function listProfiles(): Promise<string[]> {
  const files = await readdir(PROFILES_DIR);
  return files.filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).sort();
}

/**
 * Loads a profile: a shipped profile name, a path to a JSON file, or an
 * object; `overrides` replace fields before validation.
 */
export async function loadProfile(source: string | MockProfileInput, overrides: Partial<MockProfileInput> = {}): Promise<MockProfile> {
  let input: unknown;
  if (typeof source === 'string') {
    // A bare name ("gpu", "faults/corrupt-save") is a shipped profile; anything else is a path.
    const file = /^[a-z0-9][a-z0-9._/-]*$/.test(source) && !source.endsWith('.json') ? path.join(PROFILES_DIR, `${source}.json`) : source;
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      const known = await listProfiles().catch(() => []);
      throw new VfioError('ERR_VFIO_PROFILE', `mock profile "${source}" not found (${(err as Error).message}); shipped profiles: ${known.join(', ')}`, { cause: err });
    }
    try {
      input = JSON.parse(text);
    } catch (err) {
      throw new VfioError('ERR_VFIO_PROFILE', `mock profile ${file} is not valid JSON: ${(err as Error).message}`, { cause: err });
    }
  } else input = source;
  return validateProfile({ ...(input as object), ...overrides });
}

/** The identity of a profile's state layout: a stream saved with one loads only into the same. */
export function profileHash(p: MockProfile): bigint {
  const text = [p.name, p.stateBytes, p.chunkBytes, p.setupBytes, p.stopCopyOnlyBytes].join('|');
  let h = 0xcbf29ce484222325n;
  for (const c of Buffer.from(text)) h = ((h ^ BigInt(c)) * 0x100000001b3n) & 0xffff_ffff_ffff_ffffn;
  return h;
}

export function toNativeProfile(p: MockProfile): NativeMockProfile {
  const scalars = Object.fromEntries(schema().fields.filter((f) => f.input).map((f) => [f.name, (p as unknown as Record<string, unknown>)[f.name]]));
  return {
    ...scalars,
    name: p.name,
    flags: flagsToBits(p.flags),
    arcLatencies: p.arcLatencyMs.map((a) => ({ from: stateToKernel(a.from), to: stateToKernel(a.to), ms: a.ms })),
    faults: p.faults.map((f) => ({ from: stateToKernel(f.from), to: stateToKernel(f.to), errno: osConstants.errno[f.errno as keyof typeof osConstants.errno], intoError: f.intoError, times: f.times })),
    profileHash: profileHash(p),
    ...(p.driver === 'mtty' ? { driver: 'mtty', ports: p.ports } : {}),
  } as NativeMockProfile;
}
