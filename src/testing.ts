/// <reference types="node" preserve="true" />
// 'vfio-migration/testing': what a VMM needs to test its embedding without
// hardware: mock devices and their profiles, the uAPI conformance suite, and
// a synthetic guest RAM and VM. Every name is listed on purpose
// (test/package.test.ts checks the list against the installed package).
// The mock device is its own addon (mock-device/), loaded by the first
// openMockDevice(): importing the main entry point never loads it.
export { openMockDevice } from './vfio/mock.js';
export type { OpenMockOptions } from './vfio/device.js';
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
