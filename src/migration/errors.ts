// Typed migration errors; `code` says what failed, the message says why.
export type MigrationErrorCode =
  | 'ERR_MIGRATION_PROTOCOL'
  | 'ERR_MIGRATION_VERSION'
  | 'ERR_MIGRATION_CONNECTION'
  | 'ERR_MIGRATION_INCOMPATIBLE'
  | 'ERR_MIGRATION_CANCELLED'
  | 'ERR_MIGRATION_DEVICE'
  | 'ERR_MIGRATION_DESTINATION'
  | 'ERR_MIGRATION_BAD_PARAMETER'
  | 'ERR_MIGRATION_BAD_URI'
  | 'ERR_MIGRATION_STATE'
  | 'ERR_MIGRATION_SWITCHOVER_ABORTED'
  /** The destination runs (or is setting up) another migration: try again later. */
  | 'ERR_MIGRATION_BUSY'
  /** The peer sent nothing (not even a heartbeat) for the peer timeout: stopped, gone or cut off. */
  | 'ERR_MIGRATION_PEER_TIMEOUT'
  /** The connection failed after the source committed: the VM may run on the destination, so the source stays stopped (resumeOnSource() once it is known not to). */
  | 'ERR_MIGRATION_OUTCOME_UNKNOWN'
  /** TLS refused a peer (or this end): `reason` says why (unknown-ca, expired, hostname-mismatch, not-authorized, plaintext-refused, psk-mismatch, ...). */
  | 'ERR_MIGRATION_TLS';

export class MigrationError extends Error {
  override readonly name = 'MigrationError';
  readonly code: MigrationErrorCode;

  constructor(code: MigrationErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }
}

export function describeError(err: unknown): { code: string; message: string; reason?: string } {
  const e = err as { code?: unknown; message?: unknown; reason?: unknown };
  const d = { code: typeof e?.code === 'string' ? e.code : 'ERR_UNKNOWN', message: typeof e?.message === 'string' ? e.message : String(err) };
  // ERR_MIGRATION_TLS says why in `reason` (what the peer is told too).
  return d.code === 'ERR_MIGRATION_TLS' && typeof e.reason === 'string' ? { ...d, reason: e.reason } : d;
}
