// Every control message of the protocol: its schema (the runtime validator)
// and its type, inferred from the schema. Frames without a payload are
// validated too (a payload where none belongs is a protocol error).
import { MigrationError } from '../errors.js';
import { type ArcEstimate, SWITCHOVER_STEPS, type SectionDescription } from '../handler.js';
import { DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS, type MigrationCapabilities, type MigrationParameters, mergeCapabilities, mergeParameters } from '../params.js';
import { type Frame, FrameType, MAX_CONTROL_PAYLOAD_BYTES } from './frame.js';
import { type Infer, type Schema, array, boolean, nullable, number, object, oneOf, optional, protocolError, refine, string } from './schema.js';

const migrationId = string({ minLength: 1, maxLength: 128 });
const section = number({ integer: true, min: 0, max: 65535 });
const ms = number({ min: 0 });
const bytes = number({ min: 0 });

/** Every known capability, a boolean; the combination checked as the source checks its own. */
const capabilities: Schema<MigrationCapabilities> = refine(
  object(Object.fromEntries(Object.keys(DEFAULT_CAPABILITIES).map((k) => [k, boolean()])) as Record<keyof MigrationCapabilities, Schema<boolean>>),
  (c) => problemOf(() => mergeCapabilities(DEFAULT_CAPABILITIES, c)),
);
/** Every known parameter, a number within the range the source itself accepts. */
const parameters: Schema<MigrationParameters> = refine(
  object(Object.fromEntries(Object.keys(DEFAULT_PARAMETERS).map((k) => [k, number()])) as Record<keyof MigrationParameters, Schema<number>>),
  (p) => problemOf(() => mergeParameters(DEFAULT_PARAMETERS, p)),
);

function problemOf(check: () => unknown): string | null {
  try {
    check();
    return null;
  } catch (err) {
    return (err as Error).message;
  }
}

const sectionDescription = object({
  id: string({ maxLength: 256 }),
  kind: string({ minLength: 1, maxLength: 64 }),
  compat: string({ maxLength: 4096 }),
});

const arcEstimate = object({
  arc: string({ maxLength: 64 }),
  step: oneOf(SWITCHOVER_STEPS),
  ms: nullable(ms),
  basis: oneOf(['measured', 'probed', 'learned', 'assumed'] as const),
});

/** Whether an arc estimate may go into a LoadReport (a handler's glitch is left out rather than failing the migration). */
export function isSendableArcEstimate(a: unknown): boolean {
  try {
    arcEstimate.parse(a, 'arc');
    return true;
  } catch {
    return false;
  }
}

/** An empty payload: the frame type says it all. */
const empty: Schema<Record<string, never>> = {
  expected: 'no payload',
  parse: () => ({}),
};

export const MESSAGE_SCHEMAS = {
  [FrameType.Hello]: object({
    wireVersion: number({ integer: true, min: 0, max: 255 }),
    migrationId,
    channels: number({ integer: true, min: 1, max: 64 }),
    sections: array(sectionDescription, { maxLength: 65535 }),
    capabilities,
    parameters,
  }),
  [FrameType.ChannelHello]: object({
    migrationId,
    index: number({ integer: true, min: 1, max: 63 }),
    /** Over TLS: the channel binding (hex HMAC-SHA256, see tls.ts channelBinding), proof that it comes from the main channel's source. */
    binding: optional(string({ minLength: 64, maxLength: 64 })),
  }),
  [FrameType.HelloAck]: object({ wireVersion: number({ integer: true, min: 0, max: 255 }) }),
  [FrameType.Error]: object({
    code: string({ minLength: 1, maxLength: 64 }),
    message: string({ maxLength: 65536 }),
    /** The destination runs nothing (the source may resume the VM). */
    notRunning: optional(boolean()),
    /** ERR_MIGRATION_TLS: why (tls.ts TlsReason). */
    reason: optional(string({ maxLength: 64 })),
  }),
  [FrameType.Cancel]: object({ reason: string({ maxLength: 65536 }), code: optional(string({ maxLength: 64 })) }),
  [FrameType.LoadReport]: object({
    /** Per section: the resume arcs as the destination knows them (measured, learned or assumed) and its load rate. */
    sections: array(object({ section, arcs: array(arcEstimate, { maxLength: 64 }), loadMsPerMiB: nullable(ms) }), { maxLength: 65535 }),
    /** Section data bytes that have arrived there (beyond them, data is still on its way). */
    receivedBytes: bytes,
    /** Section data bytes loaded into the devices so far (between them and receivedBytes, data waits for its device). */
    loadedBytes: bytes,
  }),
  [FrameType.InitialLoaded]: object({ section }),
  [FrameType.Switchover]: object({
    /** downtime-limit + switchover-limit with switchover-abort, else 0. */
    abortAfterMs: ms,
    /** From the VM's stop to this frame's send, on the source's monotonic clock (never a wall clock: hosts' clocks differ). */
    sentAfterStopMs: ms,
  }),
  /**
   * `readyWorkMs`: from the end of the last stream to ReadyToRun; `resumeWorkMs`:
   * from the Commit to this message; `exchangeArcsMs`: of both, the device arcs
   * (finish, resume-p2p, resume steps). The source keeps the rest, and the
   * exchanges' transit, as the switchover's control cost.
   */
  [FrameType.Running]: object({ digests: array(nullable(string({ maxLength: 256 })), { maxLength: 65535 }), loadMs: ms, resumeMs: ms, readyWorkMs: ms, resumeWorkMs: ms, exchangeArcsMs: ms }),
  [FrameType.Ping]: object({ seq: number({ integer: true, min: 0, max: 2 ** 31 }) }),
  [FrameType.Pong]: object({ seq: number({ integer: true, min: 0, max: 2 ** 31 }) }),
  [FrameType.SectionEnd]: object({}),
  /**
   * Reusable switchover-ack (as QEMU 11.1's): `renewals` is how many
   * InitialRenewed frames the destination had taken when every section's
   * initial bytes were loaded, so that the source never takes an ACK sent
   * before its last renewal arrived for one that covers it.
   */
  [FrameType.SwitchoverAck]: object({ renewals: number({ integer: true, min: 0, max: 2 ** 31 }) }),
  [FrameType.ReadyToRun]: empty,
  [FrameType.Commit]: empty,
  [FrameType.EndOfStream]: empty,
  [FrameType.InitialSent]: empty,
  [FrameType.InitialRenewed]: empty,
  [FrameType.Heartbeat]: empty,
} satisfies Record<Exclude<FrameType, FrameType.SectionData>, Schema<unknown>>;

export type MessageType = keyof typeof MESSAGE_SCHEMAS;
export type MessageOf<T extends MessageType> = Infer<(typeof MESSAGE_SCHEMAS)[T]>;

export type HelloMessage = MessageOf<FrameType.Hello>;
export type ChannelHelloMessage = MessageOf<FrameType.ChannelHello>;
export type HelloAckMessage = MessageOf<FrameType.HelloAck>;
export type ErrorMessage = MessageOf<FrameType.Error>;
export type CancelMessage = MessageOf<FrameType.Cancel>;
export type LoadReportMessage = MessageOf<FrameType.LoadReport>;
export type InitialLoadedMessage = MessageOf<FrameType.InitialLoaded>;
export type SwitchoverMessage = MessageOf<FrameType.Switchover>;
export type RunningMessage = MessageOf<FrameType.Running>;
export type PingMessage = MessageOf<FrameType.Ping>;

// The inferred types must stay what the rest of the code means by them.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const sameTypes: [Same<MessageOf<FrameType.LoadReport>['sections'][number]['arcs'][number], ArcEstimate>, Same<HelloMessage['sections'][number], SectionDescription>, Same<HelloMessage['parameters'], MigrationParameters>, Same<HelloMessage['capabilities'], MigrationCapabilities>] = [true, true, true, true];
void sameTypes;

/** Validates a JSON value as the message of `type` (ERR_MIGRATION_PROTOCOL naming the field). */
export function validateMessage<T extends MessageType>(type: T, value: unknown): MessageOf<T> {
  return (MESSAGE_SCHEMAS[type] as Schema<MessageOf<T>>).parse(value, FrameType[type]);
}

/**
 * The frame's message, validated: its type must be `type`, its payload (if
 * the type has one) bounded JSON of that message's shape. Never trusts the
 * peer: every failure is ERR_MIGRATION_PROTOCOL saying what and where.
 */
export function parseMessage<T extends MessageType>(type: T, frame: Frame): MessageOf<T> {
  if (frame.type !== type) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `expected a ${FrameType[type]} frame, got ${FrameType[frame.type] ?? `type ${frame.type}`}`);
  const schema = MESSAGE_SCHEMAS[type] as Schema<MessageOf<T>>;
  if (schema === (empty as Schema<unknown>)) {
    if (frame.length !== 0) throw protocolError(FrameType[type], `expected no payload, got ${frame.length} bytes`);
    return schema.parse(undefined, FrameType[type]);
  }
  if (frame.length > MAX_CONTROL_PAYLOAD_BYTES) throw protocolError(FrameType[type], `a control payload of ${frame.length} bytes exceeds ${MAX_CONTROL_PAYLOAD_BYTES}`);
  let value: unknown;
  try {
    value = JSON.parse(frame.payload.toString('utf8'));
  } catch {
    throw protocolError(FrameType[type], 'the payload is not valid JSON');
  }
  return schema.parse(value, FrameType[type]);
}

/** A message's payload as it goes on the wire (validated first: this side never sends what the peer must refuse). */
export function messagePayload<T extends MessageType>(type: T, message: MessageOf<T>): Buffer {
  const value = validateMessage(type, message);
  return MESSAGE_SCHEMAS[type] === (empty as Schema<unknown>) ? Buffer.alloc(0) : Buffer.from(JSON.stringify(value));
}
