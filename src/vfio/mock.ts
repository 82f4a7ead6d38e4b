// Mock devices: a profile validated here, a backend built by the mock addon
// (mock-device/, loaded on first use), opened with the production addon's
// device machinery. Reached from 'vfio-migration/testing' and the CLI's
// --mock only.
import { VfioDevice, openBackendDevice, type OpenMockOptions } from './device.js';
import { fromNative } from './errors.js';
import { loadProfile, toNativeProfile } from './mock-profile.js';
import { mockNative } from './mock-native.js';

let mockCounter = 0;

/**
 * Opens a kernel-free mock device: the same VfioDevice API, the same uAPI
 * state machine (the kernel's arc table), deterministic content from `seed`.
 */
export async function openMockDevice(options: OpenMockOptions): Promise<VfioDevice> {
  const profile = await loadProfile(options.profile, options.overrides);
  const seed = BigInt(options.seed ?? ++mockCounter);
  const id = options.id ?? `${profile.name}-${seed}`;
  let handle;
  try {
    handle = new (mockNative().MockHandle)(toNativeProfile(profile), seed);
  } catch (err) {
    throw fromNative(err, { device: id });
  }
  const mock = handle;
  return openBackendDevice(mock, { id, profile, mockInfo: () => mock.info() });
}
