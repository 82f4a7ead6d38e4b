// Frames over a byte stream (TCP, unix socket, later TLS): reading with
// backpressure and checksums taken as bytes arrive, writing with backpressure,
// a connection's first frame. The frame format itself is in protocol/frame.ts.
// The main channel carries control frames both ways (the reverse direction is
// the return path); extra channels carry device data only.
import { native } from '../vfio/native.js';
import type { Duplex } from 'node:stream';
import { MigrationError } from './errors.js';
import { type DirectChunks, directChunks } from './transport.js';
import { type MessageOf, type MessageType, messagePayload } from './protocol/messages.js';
import { FRAME_HEADER_BYTES, type Frame, FrameType, MAX_CONTROL_PAYLOAD_BYTES, MAX_FRAME_PAYLOAD_BYTES, checksumMismatch, decodeHeader, encodeFrame, makeFrame } from './protocol/frame.js';

export * from './protocol/frame.js';

/** A raw JSON payload (tests and tools craft hostile ones; the protocol sends messagePayload()). */
export function jsonPayload(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

/**
 * Reads frames from a stream. `next()` resolves with the next frame, or null
 * at a clean end of stream; a bad magic, header, length or checksum, or an
 * end of stream inside a frame, is an ERR_MIGRATION_PROTOCOL error (another
 * wire version ERR_MIGRATION_INCOMPATIBLE). Reading
 * pauses while nobody asks for frames, so a slow loader backs up the sender.
 */
export class FrameReader {
  #stream: Duplex;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #ended = false;
  #error: Error | null = null;
  #wake: (() => void) | null = null;
  /** Bytes taken as frames. */
  bytesRead = 0;
  /** Bytes that have arrived from the peer (frames taken or still buffered here). */
  bytesArrived = 0;

  // Checksums are taken as chunks arrive, while the kernel's copy is still in
  // this core's cache (a pass over cold bytes later costs several times
  // more); #takeFrame compares them with the headers.
  #scanHeader = Buffer.alloc(FRAME_HEADER_BYTES);
  #scanHeaderBytes = 0;
  /** Payload bytes of the frame being scanned still to come; -1 while in a header. */
  #scanPayloadLeft = -1;
  #scanCrc = 0;
  /** A header with an impossible length: frame bounds are lost, #peekHeader reports it. */
  #scanLost = false;
  /** CRC32C of each scanned frame's payload (null: deferred), in stream order, until its frame is taken. */
  #scannedCrcs: (number | null)[] = [];
  /** The payload being scanned is a SectionData one whose check is deferred. */
  #scanDeferred = false;

  /** Gives consumed bytes back to the socket's slabs (slab reads only). */
  #releasePart: ((part: Buffer) => void) | undefined;

  /** Past this many buffered bytes the socket is paused (backpressure to the sender). */
  static readonly MAX_BUFFERED_BYTES = 16 << 20;

  /** Arrived bytes nobody has taken yet: the consumer, not the peer, holds the stream up. */
  get backlogged(): boolean {
    return this.#buffered >= FrameReader.MAX_BUFFERED_BYTES / 2;
  }

  #discarding = false;

  /**
   * From now on every byte is dropped as it arrives (its memory released at
   * once) and reading never pauses: a peer still sending into a connection
   * that failed here neither fills memory nor gets a reset before it has read
   * what this side said last (the unread report would be lost with it).
   */
  discard(): void {
    if (this.#discarding) return;
    this.#discarding = true;
    for (const c of this.#chunks.splice(0)) this.#releasePart?.(c);
    this.#buffered = 0;
    this.#scannedCrcs = [];
    this.#scanLost = true;
    if (this.#stream.isPaused() && !this.#ended) this.#stream.resume();
    this.#notify();
  }

  /** SectionData payloads are not checksummed here: their consumer does it (see Frame.verified). */
  readonly deferDataChecksums: boolean;

  constructor(stream: Duplex, options: { deferDataChecksums?: boolean } = {}) {
    this.#stream = stream;
    this.deferDataChecksums = options.deferDataChecksums ?? false;
    // 'data' hands over the socket's chunks as they are; read() would
    // concatenate everything buffered into one new Buffer each time. An
    // accepted migration socket hands them over directly (slab reads).
    const onChunk = (chunk: Buffer) => {
      this.bytesArrived += chunk.length;
      if (this.#discarding) {
        this.#releasePart?.(chunk);
        return;
      }
      this.#scan(chunk);
      this.#chunks.push(chunk);
      this.#buffered += chunk.length;
      if (this.#buffered > FrameReader.MAX_BUFFERED_BYTES) stream.pause();
      this.#notify();
    };
    const direct = (stream as { [directChunks]?: DirectChunks })[directChunks];
    if (direct) {
      this.#releasePart = direct.release;
      direct.attach(onChunk);
    } else stream.on('data', onChunk);
    stream.on('end', () => {
      this.#ended = true;
      this.#notify();
    });
    stream.on('close', () => {
      this.#ended = true;
      this.#notify();
    });
    stream.on('error', (err) => {
      this.#error = err;
      this.#notify();
    });
  }

  #scan(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length && !this.#scanLost) {
      if (this.#scanPayloadLeft < 0) {
        const n = Math.min(FRAME_HEADER_BYTES - this.#scanHeaderBytes, chunk.length - at);
        chunk.copy(this.#scanHeader, this.#scanHeaderBytes, at, at + n);
        this.#scanHeaderBytes += n;
        at += n;
        if (this.#scanHeaderBytes < FRAME_HEADER_BYTES) return;
        this.#scanHeaderBytes = 0;
        const length = this.#scanHeader.readUInt32BE(8);
        if (length > MAX_FRAME_PAYLOAD_BYTES) {
          this.#scanLost = true;
          return;
        }
        this.#scanCrc = 0;
        this.#scanDeferred = this.deferDataChecksums && this.#scanHeader.readUInt8(5) === FrameType.SectionData;
        if (length === 0) this.#scannedCrcs.push(this.#scanDeferred ? null : 0);
        else this.#scanPayloadLeft = length;
      } else {
        const n = Math.min(this.#scanPayloadLeft, chunk.length - at);
        if (!this.#scanDeferred) this.#scanCrc = native.crc32c(at === 0 && n === chunk.length ? chunk : chunk.subarray(at, at + n), this.#scanCrc);
        this.#scanPayloadLeft -= n;
        at += n;
        if (this.#scanPayloadLeft === 0) {
          this.#scannedCrcs.push(this.#scanDeferred ? null : this.#scanCrc);
          this.#scanPayloadLeft = -1;
        }
      }
    }
  }

  #notify(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  async #fill(bytes: number): Promise<boolean> {
    while (this.#buffered < bytes) {
      if (this.#discarding) return false;
      if (this.#error) throw new MigrationError('ERR_MIGRATION_CONNECTION', `connection failed: ${this.#error.message}`, { cause: this.#error });
      if (this.#ended) return false;
      if (this.#stream.isPaused()) this.#stream.resume();
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
    return true;
  }

  /** The next `bytes` as the buffered pieces they are in (no copy). */
  #takeParts(bytes: number): Buffer[] {
    const parts: Buffer[] = [];
    let left = bytes;
    while (left > 0) {
      const c = this.#chunks[0]!;
      if (c.length <= left) {
        parts.push(c);
        this.#chunks.shift();
        left -= c.length;
      } else {
        parts.push(c.subarray(0, left));
        this.#chunks[0] = c.subarray(left);
        left = 0;
      }
    }
    this.#consumed(bytes);
    return parts;
  }

  #consumed(bytes: number): void {
    this.#buffered -= bytes;
    this.bytesRead += bytes;
    if (this.#buffered < FrameReader.MAX_BUFFERED_BYTES / 2 && this.#stream.isPaused() && !this.#ended) this.#stream.resume();
  }

  #take(bytes: number): Buffer {
    let out: Buffer;
    const first = this.#chunks[0]!;
    if (first.length >= bytes) {
      out = first.subarray(0, bytes);
      if (first.length === bytes) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(bytes);
    } else {
      out = Buffer.allocUnsafe(bytes);
      let at = 0;
      while (at < bytes) {
        const c = this.#chunks[0]!;
        const n = Math.min(c.length, bytes - at);
        c.copy(out, at, 0, n);
        at += n;
        this.#releasePart?.(n === c.length ? c : c.subarray(0, n));
        if (n === c.length) this.#chunks.shift();
        else this.#chunks[0] = c.subarray(n);
      }
    }
    this.#consumed(bytes);
    return out;
  }

  async next(): Promise<Frame | null> {
    if (!(await this.#fill(FRAME_HEADER_BYTES))) {
      if (this.#discarding) return null;
      if (this.#buffered > 0) throw new MigrationError('ERR_MIGRATION_PROTOCOL', 'the stream ended inside a frame header');
      return null;
    }
    const length = this.#peekHeader();
    if (!(await this.#fill(FRAME_HEADER_BYTES + length))) {
      if (this.#discarding) return null;
      throw new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection closed inside a frame');
    }
    return this.#takeFrame();
  }

  /** The next frame if it is already buffered whole, else null (never waits). */
  nextIfBuffered(): Frame | null {
    if (this.#discarding || this.#buffered < FRAME_HEADER_BYTES) return null;
    const length = this.#peekHeader();
    if (this.#buffered < FRAME_HEADER_BYTES + length) return null;
    return this.#takeFrame();
  }

  /** Validates the buffered header and returns its payload length (the header stays buffered). */
  #peekHeader(): number {
    const first = this.#chunks[0]!;
    const h = first.length >= FRAME_HEADER_BYTES ? first : Buffer.concat(this.#chunks).subarray(0, FRAME_HEADER_BYTES);
    return decodeHeader(h).length;
  }

  /** Takes a whole buffered frame (header checked by #peekHeader) and verifies its checksum. */
  #takeFrame(): Frame {
    const h = this.#take(FRAME_HEADER_BYTES);
    const type = h.readUInt8(5) as FrameType;
    const section = h.readUInt16BE(6);
    const length = h.readUInt32BE(8);
    const expectedCrc = h.readUInt32BE(12);
    // A view into a slab (a copied header is not): the header is read, give it back.
    this.#releasePart?.(h);
    const parts = length ? this.#takeParts(length) : [];
    // A whole buffered frame has been scanned (the scan sees every byte first).
    const crc = this.#scannedCrcs.shift();
    if (crc === null) return makeFrame(type, section, parts, { checksum: expectedCrc, verified: false }, this.#releasePart);
    if (crc !== expectedCrc) throw checksumMismatch(type, section);
    return makeFrame(type, section, parts, { checksum: expectedCrc, verified: true }, this.#releasePart);
  }
}

/** Writes frames with backpressure: resolves when the stream can take more. */
export class FrameWriter {
  #stream: Duplex;
  bytesWritten = 0;
  #aborted: Error | null = null;
  /** Rejecters of writes waiting for 'drain'. */
  #waiting = new Set<(err: Error) => void>();

  /** A TLS socket (its writes are encrypted: see pacedTlsWrites). */
  readonly #encrypted: boolean;

  constructor(stream: Duplex) {
    this.#stream = stream;
    this.#encrypted = (stream as { encrypted?: unknown }).encrypted === true;
  }

  /**
   * Every write waiting for the stream, and every later one, fails with
   * `err` at once (the stream itself is left as it is: its owner may still
   * end it with a last frame).
   */
  abort(err: Error): void {
    if (this.#aborted) return;
    this.#aborted = err;
    for (const reject of [...this.#waiting]) reject(err);
  }

  async write(type: FrameType, section: number, payload?: Buffer, crc32c?: number): Promise<void> {
    if (this.#aborted) throw this.#aborted;
    const parts = encodeFrame(type, section, payload, crc32c);
    let ok = true;
    // Over TLS a frame's header and payload go to the socket as one batch: its header then shares a record with the payload (see pacedTlsWrites).
    const batch = this.#encrypted && parts.length > 1;
    if (batch) this.#stream.cork();
    try {
      for (const p of parts) {
        ok = this.#stream.write(p);
        this.bytesWritten += p.length;
      }
    } finally {
      if (batch) this.#stream.uncork();
    }
    if (!ok && !this.#stream.destroyed) {
      await new Promise<void>((resolve, reject) => {
        const done = (err?: Error) => {
          this.#stream.off('drain', onDrain);
          this.#stream.off('close', onClose);
          this.#stream.off('error', onError);
          this.#waiting.delete(done);
          if (err) reject(err);
          else resolve();
        };
        const onDrain = () => done();
        const onClose = () => done(new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection closed while sending'));
        const onError = (e: Error) => done(new MigrationError('ERR_MIGRATION_CONNECTION', `connection failed: ${e.message}`, { cause: e }));
        this.#stream.on('drain', onDrain);
        this.#stream.on('close', onClose);
        this.#stream.on('error', onError);
        this.#waiting.add(done);
      });
    }
    if (this.#aborted) throw this.#aborted;
    if (this.#stream.destroyed) throw new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection is closed');
  }

  /** A control message, validated before it goes (this side never sends what the peer must refuse). */
  writeMessage<T extends MessageType>(type: T, message: MessageOf<T>): Promise<void> {
    return this.write(type, 0, messagePayload(type, message));
  }

  /**
   * Says "alive" without waiting: only into an idle stream (behind queued
   * bytes it says nothing the bytes do not, and a stuck peer must not make
   * heartbeats pile up). Never splits a frame: frames are written whole.
   */
  heartbeat(): void {
    if (this.#aborted || this.#stream.destroyed || this.#stream.writableEnded || this.#stream.writableLength > HEARTBEAT_MAX_QUEUED_BYTES) return;
    this.#stream.write(HEARTBEAT_FRAME);
    this.bytesWritten += HEARTBEAT_FRAME.length;
  }
}

const HEARTBEAT_FRAME = Buffer.concat(encodeFrame(FrameType.Heartbeat, 0));
const HEARTBEAT_MAX_QUEUED_BYTES = 64 << 10;

/** Largest first frame a destination reads from a connection that has not identified itself, by type. */
export const MAX_FIRST_FRAME_BYTES: Partial<Record<FrameType, number>> = {
  [FrameType.Hello]: MAX_CONTROL_PAYLOAD_BYTES,
  [FrameType.ChannelHello]: 4096,
};

/**
 * Reads a connection's first frame and not one byte more, into memory of its
 * exact size (no slab, no stream buffer): a Hello or ChannelHello within its
 * size limit (MAX_FIRST_FRAME_BYTES), checksum verified. Anything else is a
 * typed error (ERR_MIGRATION_PROTOCOL, ERR_MIGRATION_INCOMPATIBLE for another wire version) before its
 * payload is read; a connection that ends first is ERR_MIGRATION_CONNECTION.
 */
export async function readFirstFrame(socket: Duplex, budget?: { reserve(bytes: number): boolean; unreserve(bytes: number): void }): Promise<Frame> {
  const h = await readExactly(socket, FRAME_HEADER_BYTES);
  // Its own limit per type, below: the type is checked before the length.
  const { type, section, length, checksum } = decodeHeader(h, 0xffffffff);
  const max = MAX_FIRST_FRAME_BYTES[type];
  if (max === undefined) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `a connection must start with Hello or ChannelHello, not ${FrameType[type] ?? `frame type ${type}`}`);
  if (length > max) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `a ${FrameType[type]} frame of ${length} bytes exceeds its ${max}-byte limit`);
  // A shared budget bounds what all connections read before they identified themselves.
  if (budget && !budget.reserve(length)) throw new MigrationError('ERR_MIGRATION_BUSY', 'too many handshakes in progress: try again');
  let payload: Buffer;
  try {
    payload = length ? await readExactly(socket, length) : Buffer.alloc(0);
  } finally {
    budget?.unreserve(length);
  }
  if (native.crc32c(payload) !== checksum) throw checksumMismatch(type, section);
  return makeFrame(type, section, length ? [payload] : [], { checksum, verified: true });
}

/** Exactly `bytes` from a stream that has no reader yet: direct reads of that size where the transport has them. */
function readExactly(socket: Duplex, bytes: number): Promise<Buffer> {
  const direct = (socket as { [directChunks]?: DirectChunks })[directChunks];
  if (direct) return direct.readExactly(bytes);
  // Elsewhere (a socket without slab reads): through the stream's own buffer.
  return new Promise<Buffer>((resolve, reject) => {
    const done = (err: Error | null, b?: Buffer) => {
      socket.off('readable', onReadable);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.off('error', onError);
      if (err) reject(err);
      else resolve(b!);
    };
    const onReadable = () => {
      const b = socket.read(bytes) as Buffer | null;
      if (b) done(null, b);
    };
    const onEnd = () => done(new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection closed before its first frame was complete'));
    const onError = (e: Error) => done(new MigrationError('ERR_MIGRATION_CONNECTION', `connection failed: ${e.message}`, { cause: e }));
    socket.on('readable', onReadable);
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('error', onError);
    onReadable();
  });
}
