/// <reference types="node" preserve="true" />
// 'vfio-migration/testing': what a VMM needs to test its embedding without
// hardware: mock devices and their profiles, the uAPI conformance suite, and
// a synthetic guest RAM and VM. Every name is listed on purpose
// (test/package.test.ts checks the list against the installed package).
import { VfioDevice, type OpenMockOptions } from './vfio/device.js';

/**
 * Opens a kernel-free mock device: the same VfioDevice API, the same uAPI
 * state machine (the kernel's arc table), deterministic content from `seed`.
 */
export function openMockDevice(options: OpenMockOptions): Promise<VfioDevice> {
  return VfioDevice.openMock(options);
}
export type { OpenMockOptions };
export { listProfiles, loadProfile, validateProfile, PROFILES_DIR, type ByteSize, type MockFault, type MockProfile, type MockProfileInput } from './vfio/mock-profile.js';
export {
  runConformance,
  CHECK_NAMES,
  type CheckName,
  type CheckResult,
  type CheckStatus,
  type ConformanceOptions,
  type ConformanceReport,
  type ConformanceTarget,
} from './vfio/conformance.js';
export { RamHandler, type RamOptions } from './migration/ram-handler.js';
export { SyntheticVm } from './migration/vm.js';
