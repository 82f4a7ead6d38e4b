// Loads the mock device's own addon (mock-device/binding.gyp,
// vfio_migration_mock) on first use: only 'vfio-migration/testing' and the
// CLI's --mock get here, so the production path never loads mock code. It
// builds mock backends that the production addon's NativeDevice opens
// (openBackend), so devices, workers and sessions stay one implementation.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import type { NativeBackendCarrier } from './native.js';
import type { MockProfileScalars } from './mock-profile.js';

/** A validated profile in the addon's terms: states and errnos as kernel numbers. */
export interface NativeMockProfile extends MockProfileScalars {
  name: string;
  flags: number;
  arcLatencies: { from: number; to: number; ms: number }[];
  faults: { from: number; to: number; errno: number; intoError: boolean; times: number }[];
  profileHash: bigint;
}

export interface NativeMockInfo {
  seed: bigint;
  digest: string;
  savedDigest: string;
  loadedDigest: string;
  bytesRead: number;
  bytesWritten: number;
  dirtiedChunks: number;
  arcsTaken: number;
  loadBusyMs: number;
}

/** A mock device's handle in the mock addon: the backend carrier for openBackend(), and its test-only counters. */
export interface NativeMockHandle extends NativeBackendCarrier {
  /** After the device opened: digests and counters. */
  info(): NativeMockInfo;
}

/** The mock profile's fields (mock-device/mock_device.h VFIO_MOCK_PROFILE_FIELDS) and limits. */
export interface NativeMockProfileSchema {
  fields: {
    /** The normalised name (MockProfile, NativeMockProfile). */
    name: string;
    /** Where it is in a profile's JSON: "field" or "group.key"; "" = computed, not an input. */
    input: string;
    kind: 'bytes' | 'rate' | 'ms' | 'bool' | 'offset' | 'u64';
    required: boolean;
    /** null: no default (u64 fields: absent = not set). */
    default: number | boolean | null;
    min: number | null;
    max: number | null;
  }[];
  limits: {
    maxStateBytes: number;
    maxChunks: number;
    minChunkBytes: number;
    maxChunkBytes: number;
    maxDelayMs: number;
    maxLoadMsPerMiB: number;
    minMaxBytesPerSec: number;
    maxFaults: number;
  };
}

export interface NativeMockAddon {
  /** Parses and checks the profile (ERR_VFIO_PROFILE, ERR_VFIO_BAD_ARGUMENT); the device is built when the production addon opens it. */
  MockHandle: new (profile: NativeMockProfile, seed: bigint) => NativeMockHandle;
  /** Throws what new MockHandle would for this profile. */
  checkMockProfile(profile: NativeMockProfile): void;
  mockProfileSchema: NativeMockProfileSchema;
}

const require = createRequire(import.meta.url);
// dist/src/vfio -> package root
const mockDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'mock-device');

/** VFIO_MIGRATION_MOCK_ADDON names another build of the mock addon (the sanitizer run's); by default the package's own. */
export const MOCK_ADDON_PATH_ENV = 'VFIO_MIGRATION_MOCK_ADDON';
let loaded: NativeMockAddon | undefined;

/** The mock addon, loaded through node-gyp-build from mock-device/ (its build, or its prebuild) on the first call. */
export function mockNative(): NativeMockAddon {
  if (!loaded) {
    const override = process.env[MOCK_ADDON_PATH_ENV];
    loaded = (override ? require(path.resolve(override)) : require('node-gyp-build')(mockDir)) as NativeMockAddon;
  }
  return loaded;
}
