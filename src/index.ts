export * from './vfio/states.js';
export * from './vfio/errors.js';
export * from './vfio/arc-planner.js';
export * from './vfio/device.js';
export * from './vfio/mock-profile.js';
export * from "./vfio/conformance.js";
export { native } from './vfio/native.js';
export * from "./migration/index.js";
