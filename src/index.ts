/// <reference types="node" preserve="true" />
// The package's main entry point ('vfio-migration'): what a VMM embeds. Every
// name is listed on purpose; the addon binding, the wire format's internals
// and the mock device stay private (mocks, profiles, conformance, synthetic
// RAM and VM are in 'vfio-migration/testing'). test/package.test.ts checks
// this list against the installed package.

// The device API: states and flags, the arc planner, errors, devices.
export { MIGRATION_STATES, isMigrationState, supportedStates, type MigrationState, type MigrationFlags } from './vfio/states.js';
export { planArcs, nextState, type Arc } from './vfio/arc-planner.js';
export { VfioError, type VfioErrorCode, type VfioErrorDetails } from './vfio/errors.js';
export {
  VfioDevice,
  ioctlChannel,
  type DataSession,
  type IoctlTrace,
  type OpenKernelOptions,
  type PrecopyInfo,
  type ReadResult,
  type ReadStreamOptions,
  type StepOptions,
} from './vfio/device.js';

// Migrating: source, destination, the handler interface and the VFIO handler.
export { MigrationSource, type MigrationInfo, type MigrateOptions, type SourceOptions } from './migration/source.js';
export { MigrationDestination, type DestinationOptions, type IncomingOptions, type IncomingResult } from './migration/destination.js';
export type { StateHandler, HandlerContext, SectionDescription, SectionOutput, PendingBytes, DeviceInfo } from './migration/handler.js';
export type { VmControl } from './migration/vm.js';
export { VfioHandler, exportArcHistory, importArcHistory } from './migration/vfio-handler.js';
export { exportSwitchoverHistory, importSwitchoverHistory } from './migration/switchover-history.js';
export { DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS, type MigrationCapabilities, type MigrationParameters } from './migration/params.js';
export { MigrationError, describeError, type MigrationErrorCode } from './migration/errors.js';
export { MigrationTlsError, type TlsOptions, type TlsReason } from './migration/tls.js';
export type {
  AnyMigrationEventRecord,
  HandlerEventName,
  MigrationEventListener,
  MigrationEventMap,
  MigrationEventName,
  MigrationEventRecord,
  MigrationStatus,
  VfioEventState,
} from './migration/events.js';
