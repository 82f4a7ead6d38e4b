// The frame codec: a 20-byte header and a payload.
//
//   0  magic     u32  "VFMG"
//   4  version   u8   WIRE_VERSION (magic and version stay at these offsets in every version)
//   5  type      u8   FrameType
//   6  section   u16
//   8  length    u32  payload bytes
//  12  crc32c    u32  of the payload
//  16  hcrc32c   u32  of bytes 0-15: the header, its payload checksum included
//
// The header check covers the payload's CRC, so one chain covers every bit
// of a frame, and a flipped type, section or length is caught as soon as the
// header arrives (a flipped length never makes a reader wait for bytes that
// are not coming). The payload CRC stays a plain CRC32C of the payload, so it
// is still taken where the bytes are hot, on the device's data thread, on both
// ends: the event loop only checksums 16 header bytes per frame.
import { native } from '../../vfio/native.js';
import { MigrationError } from '../errors.js';

export const WIRE_MAGIC = 0x56464d47; // "VFMG"
/**
 * 2: Heartbeat frames, typed refusals (busy). 3: the header checksum (a
 * 20-byte header), validated messages, Ping/Pong, the Switchover frame gives
 * durations instead of the source's wall clock. 4: each arc in a LoadReport
 * names its switchover step.
 */
export const WIRE_VERSION = 5;
export const FRAME_HEADER_BYTES = 20;
/** Largest payload a peer may send in one frame. */
export const MAX_FRAME_PAYLOAD_BYTES = 8 << 20;
/** Largest JSON control payload (hello, reports). */
export const MAX_CONTROL_PAYLOAD_BYTES = 1 << 20;

export enum FrameType {
  // source -> destination
  Hello = 1,
  ChannelHello = 2,
  SectionData = 3,
  SectionEnd = 4, // a section's data is complete (json: section summary)
  Switchover = 5, // the source stopped the VM (json: SwitchoverMessage)
  EndOfStream = 6, // nothing more on this channel
  Cancel = 7, // json: reason, code
  InitialSent = 8, // a section sent all of its initial bytes (switchover-ack)
  Commit = 9, // answers ReadyToRun: the VM is the destination's now; the source never resumes it by itself
  // either direction on the main channel
  Heartbeat = 10, // no payload: the sender is alive (sent when the channel is otherwise idle)
  Pong = 11, // answers Ping at once (json: seq): the destination measures the round trip
  // source -> destination, on the section's channel
  InitialRenewed = 12, // the section's device announced new initial bytes (VFIO_PRECOPY_INFO_REINIT): they follow, then InitialSent again
  // destination -> source (return path)
  HelloAck = 32,
  InitialLoaded = 33, // a section finished loading its initial bytes (json: section)
  SwitchoverAck = 34, // every device loaded its initial bytes
  Running = 35, // the destination VM runs (json: digests, load times)
  Error = 36, // json: code, message
  LoadReport = 37, // json: what the destination learned of its devices' switchover time (LoadReportMessage)
  ReadyToRun = 38, // every device loaded and stopped; nothing runs until the source's Commit
  Ping = 39, // json: seq; the source answers Pong at once
}

export interface Frame {
  type: FrameType;
  section: number;
  length: number;
  /** The payload as it arrived, in socket-sized pieces (no copy). */
  parts: Buffer[];
  /** The payload in one Buffer (joined on first use). */
  readonly payload: Buffer;
  /** The payload's CRC32C as the (checked) header states it. */
  checksum: number;
  /**
   * False for a SectionData frame a reader with `deferDataChecksums` handed
   * over unchecked: its consumer verifies `checksum` before using the bytes
   * (verifyFrame, or a device write that checks them off the event loop).
   */
  verified: boolean;
  /**
   * Done with the payload (and every Buffer taken from it): its memory may
   * be reused for later reads. Optional (unreleased memory is left to the
   * GC); releasing a payload still in use corrupts it. Idempotent.
   */
  release(): void;
}

export function makeFrame(type: FrameType, section: number, parts: Buffer[], check: { checksum: number; verified: boolean }, releasePart?: (part: Buffer) => void): Frame {
  let joined: Buffer | null = null;
  let released = false;
  return {
    type,
    section,
    length: parts.reduce((n, p) => n + p.length, 0),
    parts,
    checksum: check.checksum,
    verified: check.verified,
    get payload() {
      joined ??= parts.length === 1 ? parts[0]! : Buffer.concat(parts);
      return joined;
    },
    release() {
      if (released || !releasePart) return;
      released = true;
      for (const p of parts) releasePart(p);
    },
  };
}

/** `crc32c`, if given, must be the payload's CRC32C (computed where the bytes were hot). */
export function encodeFrame(type: FrameType, section: number, payload: Buffer = Buffer.alloc(0), crc32c?: number): Buffer[] {
  if (payload.length > MAX_FRAME_PAYLOAD_BYTES) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `frame payload of ${payload.length} bytes exceeds ${MAX_FRAME_PAYLOAD_BYTES}`);
  const h = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  h.writeUInt32BE(WIRE_MAGIC, 0);
  h.writeUInt8(WIRE_VERSION, 4);
  h.writeUInt8(type, 5);
  h.writeUInt16BE(section, 6);
  h.writeUInt32BE(payload.length, 8);
  h.writeUInt32BE(crc32c ?? native.crc32c(payload), 12);
  h.writeUInt32BE(native.crc32c(h.subarray(0, 16)), 16);
  return payload.length ? [h, payload] : [h];
}

export interface FrameHeader {
  type: FrameType;
  section: number;
  length: number;
  /** The payload's CRC32C. */
  checksum: number;
}

/**
 * Checks a header (FRAME_HEADER_BYTES) and returns its fields: a bad magic,
 * header checksum, type or length is ERR_MIGRATION_PROTOCOL; another wire
 * version is ERR_MIGRATION_INCOMPATIBLE (checked before the header checksum:
 * another version's header need not have one). `maxLength` bounds the payload.
 */
export function decodeHeader(h: Buffer, maxLength = MAX_FRAME_PAYLOAD_BYTES): FrameHeader {
  const magic = h.readUInt32BE(0);
  if (magic !== WIRE_MAGIC) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `bad frame magic 0x${magic.toString(16)}: not a vfio-migration stream`);
  const version = h.readUInt8(4);
  if (version !== WIRE_VERSION) throw new MigrationError('ERR_MIGRATION_INCOMPATIBLE', `the peer speaks wire version ${version}, this side ${WIRE_VERSION}`);
  const headerCrc = h.readUInt32BE(16);
  if (native.crc32c(h.subarray(0, 16)) !== headerCrc) throw new MigrationError('ERR_MIGRATION_PROTOCOL', 'frame header checksum mismatch (a corrupted or misaligned header)');
  const type = h.readUInt8(5);
  if (!(type in FrameType)) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `unknown frame type ${type}`);
  const length = h.readUInt32BE(8);
  if (length > maxLength) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `a ${FrameType[type]} frame of ${length} bytes exceeds its ${maxLength}-byte limit`);
  return { type, section: h.readUInt16BE(6), length, checksum: h.readUInt32BE(12) };
}

/** Checks an unverified frame's payload against its header's CRC32C (ERR_MIGRATION_PROTOCOL on a mismatch). */
export function verifyFrame(frame: Frame): void {
  if (frame.verified) return;
  let crc = 0;
  for (const p of frame.parts) crc = native.crc32c(p, crc);
  if (crc !== frame.checksum) throw checksumMismatch(frame.type, frame.section);
  frame.verified = true;
}

export function checksumMismatch(type: FrameType, section: number): MigrationError {
  return new MigrationError('ERR_MIGRATION_PROTOCOL', `checksum mismatch in a ${FrameType[type]} frame of section ${section}`);
}
