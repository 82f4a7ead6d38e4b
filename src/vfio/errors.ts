// Typed errors. Every failure of the device API is a VfioError with a stable
// `code`; kernel failures carry the errno name, the ioctl, the requested arc
// and the device state read back after the failure.
import type { MigrationState } from './states.js';

export type VfioErrorCode =
  | 'EINVAL' | 'ENOTTY' | 'EBADF' | 'EIO' | 'ENODEV' | 'ENOMSG' | 'EBUSY' | 'ENOENT' | 'EPERM'
  | 'EACCES' | 'ENOMEM' | 'ENOSYS' | 'EFAULT' | 'EAGAIN' | 'ETIMEDOUT' | 'EOPNOTSUPP' | 'EUNKNOWN'
  | 'ERR_VFIO_CLOSED'
  | 'ERR_VFIO_BAD_ARGUMENT'
  | 'ERR_VFIO_UNSUPPORTED_STATE'
  | 'ERR_VFIO_NO_DATA_SESSION'
  | 'ERR_VFIO_PROFILE'
  | 'ABORT_ERR'
  | (string & {});

export interface VfioErrorDetails {
  errno?: number;
  operation?: string;
  arc?: { from: MigrationState | 'unknown'; to: MigrationState };
  stateAfter?: MigrationState | 'unknown';
  device?: string;
  cause?: unknown;
}

export class VfioError extends Error {
  override readonly name = 'VfioError';
  readonly code: VfioErrorCode;
  readonly errno?: number;
  readonly operation?: string;
  readonly arc?: { from: MigrationState | 'unknown'; to: MigrationState };
  readonly stateAfter?: MigrationState | 'unknown';
  readonly device?: string;

  constructor(code: VfioErrorCode, message: string, details: VfioErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.code = code;
    this.errno = details.errno;
    this.operation = details.operation;
    this.arc = details.arc;
    this.stateAfter = details.stateAfter;
    this.device = details.device;
  }
}

/** Wraps an error thrown by the addon (which carries code/errno/operation). */
export function fromNative(err: unknown, details: VfioErrorDetails = {}): VfioError {
  if (err instanceof VfioError) return err;
  const e = err as { code?: string; errno?: number; operation?: string; message?: string };
  const code = typeof e?.code === 'string' ? e.code : 'EUNKNOWN';
  let message = e?.message ?? String(err);
  if (details.device) message = `${details.device}: ${message}`;
  if (details.arc) message += ` during ${details.arc.from} -> ${details.arc.to}`;
  if (details.stateAfter) message += `; device is now ${details.stateAfter}`;
  return new VfioError(code, message, {
    errno: e?.errno,
    operation: e?.operation,
    ...details,
    cause: err,
  });
}
