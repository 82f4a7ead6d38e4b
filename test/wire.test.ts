import test from 'ava';
import net from 'node:net';
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { native } from '../src/vfio/native.js';
import { FRAME_HEADER_BYTES, FrameReader, FrameType, FrameWriter, MAX_FRAME_PAYLOAD_BYTES, WIRE_VERSION, encodeFrame, jsonPayload, readFirstFrame, verifyFrame } from '../src/migration/wire.js';
import { MigrationError } from '../src/migration/errors.js';
import { connect, listen, parseUri, secureAccept, slabStats } from '../src/migration/transport.js';
import { loadTlsConfig } from '../src/migration/tls.js';
import { MigrationSource } from '../src/migration/source.js';
import { sourceSide } from './harness.js';

/** Bit-at-a-time CRC32C: slow, obviously right, independent of the addon. */
function referenceCrc32c(data: Uint8Array, previous = 0): number {
  let c = ~previous >>> 0;
  for (const byte of data) {
    c ^= byte;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0x82f63b78 & -(c & 1));
  }
  return ~c >>> 0;
}

test('crc32c matches the RFC 3720 check values', (t) => {
  t.is(native.crc32c(Buffer.from('123456789')), 0xe3069283);
  t.is(native.crc32c(Buffer.alloc(32, 0)), 0x8a9136aa);
  t.is(native.crc32c(Buffer.alloc(32, 0xff)), 0x62a8ab43);
  t.is(native.crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => i))), 0x46dd794e);
  t.is(native.crc32c(Buffer.alloc(0)), 0);
});

test('crc32c agrees with a bit-wise reference at every length and alignment, and continues across pieces', (t) => {
  // Lengths around the three-stream block sizes (3 x 256 and 3 x 8192 bytes) and odd tails.
  const lengths = [1, 7, 8, 9, 255, 767, 768, 769, 1000, 24575, 24576, 24577, 24576 + 768 + 13, 65536, 100_003];
  const base = randomBytes(100_003 + 16);
  for (const n of lengths) {
    for (const offset of [0, 1, 3, 8]) {
      const data = base.subarray(offset, offset + n);
      const want = referenceCrc32c(data);
      t.is(native.crc32c(data), want, `length ${n} at offset ${offset}`);
      const cut = Math.floor(n / 3);
      t.is(native.crc32c(data.subarray(cut), native.crc32c(data.subarray(0, cut))), want, `length ${n} in two pieces`);
    }
  }
});

test('dupSocketFd duplicates a socket and refuses anything else with its errno', async (t) => {
  const { a, b, close } = await socketPair();
  t.teardown(close);
  const fd = (b as unknown as { _handle: { fd: number } })._handle.fd;
  const copy = native.dupSocketFd(fd);
  t.not(copy, fd);
  // The copy is the same connection: what is written to it arrives at the peer.
  const got = new Promise<Buffer>((r) => a.once('data', r));
  writeSync(copy, 'hello');
  t.is((await got).toString(), 'hello');
  closeSync(copy);
  const file = openSync(fileURLToPath(import.meta.url), 'r');
  t.teardown(() => closeSync(file));
  t.throws(() => native.dupSocketFd(file), { code: 'ENOTSOCK', message: /getsockopt/ });
  t.throws(() => native.dupSocketFd(99_999), { code: 'EBADF' });
  t.throws(() => native.dupSocketFd('3' as unknown as number), { instanceOf: TypeError });
});

test('crc32c refuses what is not bytes with a TypeError', (t) => {
  t.throws(() => native.crc32c('text' as unknown as Buffer), { instanceOf: TypeError, message: /Buffer/ });
});

/**
 * A connected pair over loopback TCP: `b` as a plain net.Server gives it
 * ('data' events), or with `migration`, as the migration transport accepts it
 * (slab reads).
 */
async function socketPair(options: { migration?: boolean } = {}): Promise<{ a: net.Socket; b: net.Socket; close: () => void }> {
  let server: net.Server;
  let a: net.Socket;
  let accepted: Promise<net.Socket>;
  if (options.migration) {
    const listening = await listen(parseUri('tcp:127.0.0.1:0'));
    server = listening.server;
    accepted = new Promise<net.Socket>((r) => listening.server.once('accepted', r));
    a = await connect(listening.uri);
  } else {
    server = net.createServer();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    a = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  }
  const b = await accepted;
  return { a, b, close: () => { a.destroy(); b.destroy(); server.close(); } };
}

test('frames cross a real socket intact, in order, whatever the socket cuts them into', async (t) => {
  const { a, b, close } = await socketPair();
  t.teardown(close);
  const writer = new FrameWriter(a);
  const reader = new FrameReader(b);
  const payloads = [Buffer.alloc(0), randomBytes(1), randomBytes(70_000), randomBytes(3 << 20), randomBytes(MAX_FRAME_PAYLOAD_BYTES)];
  const sending = (async () => {
    for (const [i, p] of payloads.entries()) await writer.write(FrameType.SectionData, i, p);
    await writer.write(FrameType.SectionEnd, 9, jsonPayload({ ok: true }));
    a.end();
  })();
  for (const [i, p] of payloads.entries()) {
    const f = await reader.next();
    t.truthy(f);
    t.is(f!.type, FrameType.SectionData);
    t.is(f!.section, i);
    t.is(f!.length, p.length);
    t.true(f!.payload.equals(p), `payload ${i}`);
  }
  const last = await reader.next();
  t.is(last!.type, FrameType.SectionEnd);
  t.deepEqual(JSON.parse(last!.payload.toString()), { ok: true });
  t.is(await reader.next(), null);
  await sending;
  t.is(writer.bytesWritten, reader.bytesRead);
});

test.serial('over TLS, frames of every size cross intact and in order, a direct write stays between frames, and no write encrypts more than a piece at once', async (t) => {
  // PSK: no certificates needed; the sockets are the ones a migration uses (connect, listen + secureAccept).
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vfio-wire-tls-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const keys = path.join(dir, 'keys.psk');
  writeFileSync(keys, `qemu:${randomBytes(32).toString('hex')}\n`);
  // What each write of the source's socket hands to OpenSSL (a TLS write encrypts its buffer whole, on the event loop); in place before the socket exists.
  const { _write: write, _writev: writev } = net.Socket.prototype;
  let largestWrite = 0;
  const source = (s: net.Socket) => (s as { encrypted?: boolean }).encrypted && !(s as { isServer?: boolean }).isServer;
  net.Socket.prototype._write = function (this: net.Socket, chunk: Buffer, encoding: BufferEncoding, cb: (err?: Error | null) => void) {
    if (source(this)) largestWrite = Math.max(largestWrite, chunk.length);
    return write.call(this, chunk, encoding, cb);
  };
  net.Socket.prototype._writev = function (this: net.Socket, chunks: { chunk: Buffer; encoding: BufferEncoding }[], cb: (err?: Error | null) => void) {
    if (source(this)) largestWrite = Math.max(largestWrite, chunks.reduce((n, c) => n + c.chunk.length, 0));
    return writev!.call(this, chunks, cb);
  };
  t.teardown(() => {
    Object.assign(net.Socket.prototype, { _write: write, _writev: writev });
  });
  const listening = await listen(parseUri('tcp:127.0.0.1:0'), { tls: true });
  t.teardown(() => listening.server.close());
  const raw = new Promise<net.Socket>((r) => listening.server.once('accepted', r));
  const [a, b] = await Promise.all([connect(listening.uri, undefined, await loadTlsConfig({ psk: keys }, 'source')), raw.then(async (s) => secureAccept(s, await loadTlsConfig({ psk: keys }, 'destination')))]);
  t.teardown(() => {
    a.destroy();
    b.destroy();
  });
  const writer = new FrameWriter(a);
  const reader = new FrameReader(b);
  const K = 1 << 10;
  // Around a TLS record (16 KiB) and a write piece (256 KiB), and the largest frame.
  const sizes = [0, 1, 20, 16 * K - 1, 16 * K, 16 * K + 1, 256 * K - 1, 256 * K + 16 * K - 1, 256 * K + 16 * K + 1, (3 << 20) + 5, MAX_FRAME_PAYLOAD_BYTES];
  const payloads = sizes.map((n) => randomBytes(n));
  const direct = Buffer.concat(encodeFrame(FrameType.Heartbeat, 7));
  const sending = (async () => {
    const queued: Promise<void>[] = [];
    for (const [i, p] of payloads.entries()) {
      // Not awaited: frames pile up behind the socket, as a migration's do.
      queued.push(writer.write(FrameType.SectionData, i, p));
      // As the source answers a Ping: straight to the socket, between two frames.
      if (i % 3 === 2) a.write(direct);
    }
    await Promise.all(queued);
    a.end();
  })();
  for (const [i, p] of payloads.entries()) {
    const f = await reader.next();
    t.is(f!.type, FrameType.SectionData);
    t.is(f!.section, i);
    t.true(f!.payload.equals(p), `payload ${i} (${p.length} bytes)`);
    if (i % 3 === 2) {
      const h = await reader.next();
      t.is(h!.type, FrameType.Heartbeat);
      t.is(h!.section, 7);
    }
  }
  t.is(await reader.next(), null);
  await sending;
  t.true(largestWrite > 0);
  t.true(largestWrite < (256 + 16) * K, `largest TLS write ${largestWrite} bytes`);
});

/** A header edited by a test, with its header checksum made right again (the edit itself is what is tested). */
function resealed(frame: Buffer): Buffer {
  frame.writeUInt32BE(native.crc32c(frame.subarray(0, 16)), 16);
  return frame;
}

test('a flipped section id, type or length is caught by the header checksum before any payload is awaited', async (t) => {
  const good = Buffer.concat(encodeFrame(FrameType.SectionData, 1, randomBytes(4096)));
  for (const [what, offset] of [['type', 5], ['section', 7], ['length', 10], ['payload checksum', 13], ['header checksum', 17]] as const) {
    const bad = Buffer.from(good);
    bad[offset]! ^= 0x04;
    // Only the header is sent: a reader that trusted a flipped length would wait for its payload.
    await t.throwsAsync(readRaw(bad.subarray(0, FRAME_HEADER_BYTES)), { code: 'ERR_MIGRATION_PROTOCOL', message: /header checksum mismatch/ }, what);
  }
});

/** Sends raw bytes and returns what the reader makes of them. */
async function readRaw(bytes: Buffer): Promise<unknown> {
  const { a, b, close } = await socketPair();
  try {
    const reader = new FrameReader(b);
    a.end(bytes);
    return await reader.next();
  } finally {
    close();
  }
}

test('a flipped payload bit, a bad magic, an oversize length or a cut frame is a typed protocol error', async (t) => {
  const good = Buffer.concat(encodeFrame(FrameType.SectionData, 1, randomBytes(4096)));
  const flipped = Buffer.from(good);
  flipped[FRAME_HEADER_BYTES + 100]! ^= 0x10;
  await t.throwsAsync(readRaw(flipped), { instanceOf: MigrationError, code: 'ERR_MIGRATION_PROTOCOL', message: /checksum mismatch/ });
  const magic = Buffer.from(good);
  magic.writeUInt32BE(0x12345678, 0);
  await t.throwsAsync(readRaw(magic), { code: 'ERR_MIGRATION_PROTOCOL', message: /magic/ });
  const oversize = Buffer.from(good.subarray(0, FRAME_HEADER_BYTES));
  oversize.writeUInt32BE(MAX_FRAME_PAYLOAD_BYTES + 1, 8);
  await t.throwsAsync(readRaw(oversize), { code: 'ERR_MIGRATION_PROTOCOL', message: /header checksum mismatch/ });
  await t.throwsAsync(readRaw(resealed(oversize)), { code: 'ERR_MIGRATION_PROTOCOL', message: /exceeds/ });
  const version = Buffer.from(good);
  version.writeUInt8(99, 4);
  await t.throwsAsync(readRaw(version), { code: 'ERR_MIGRATION_INCOMPATIBLE', message: new RegExp(`wire version 99, this side ${WIRE_VERSION}`) });
  await t.throwsAsync(readRaw(good.subarray(0, good.length - 1)), { code: 'ERR_MIGRATION_CONNECTION', message: /inside a frame/ });
  await t.throwsAsync(readRaw(good.subarray(0, 5)), { code: 'ERR_MIGRATION_PROTOCOL', message: /inside a frame header/ });
  t.throws(() => encodeFrame(FrameType.SectionData, 0, Buffer.alloc(MAX_FRAME_PAYLOAD_BYTES + 1)), { code: 'ERR_MIGRATION_PROTOCOL' });
});

test.serial('slab reads: frames stay intact until released while slabs are reused under them', async (t) => {
  const { a, b, close } = await socketPair({ migration: true });
  t.teardown(close);
  const before = slabStats();
  const writer = new FrameWriter(a);
  const reader = new FrameReader(b);
  // ~160 MiB in frames of 1 B to 1 MiB, each payload's CRC known up front.
  const sizes = Array.from({ length: 320 }, (_, i) => (i % 7 === 0 ? 1 + i : (1 << 20) - ((i * 7919) % 4096)));
  const expected: number[] = [];
  const sending = (async () => {
    for (const [i, n] of sizes.entries()) {
      const p = randomBytes(n);
      expected.push(native.crc32c(p));
      await writer.write(FrameType.SectionData, i % 3, p);
    }
    a.end();
  })();
  // Hold up to 24 frames before checking and releasing them: slabs must not be reused under a held frame.
  const held: { index: number; frame: Awaited<ReturnType<FrameReader['next']>> }[] = [];
  let checked = 0;
  let bad = 0;
  const settle = (count: number) => {
    while (held.length > count) {
      const { index, frame } = held.shift()!;
      let crc = 0;
      for (const part of frame!.parts) crc = native.crc32c(part, crc);
      if (crc !== expected[index]) bad++;
      checked++;
      frame!.release();
      frame!.release(); // idempotent
    }
  };
  for (let index = 0; ; index++) {
    const frame = await reader.next();
    if (!frame) break;
    held.push({ index, frame });
    settle((index * 13) % 24);
  }
  settle(0);
  await sending;
  t.is(checked, sizes.length);
  t.is(bad, 0, 'no payload changed before its release');
  const after = slabStats();
  t.true(after.reused - before.reused > 10, `slabs reused: ${after.reused - before.reused}`);
  t.true(after.allocated - before.allocated < 24, `slabs allocated: ${after.allocated - before.allocated}`);
});

test('deferred data checksums: section data arrives unverified for its loader, control frames are still checked here', async (t) => {
  const data = randomBytes(100_000);
  const good = Buffer.concat([...encodeFrame(FrameType.SectionData, 2, data), ...encodeFrame(FrameType.SectionEnd, 2, Buffer.from('{}'))]);
  const read = async (bytes: Buffer) => {
    const { a, b, close } = await socketPair();
    try {
      const reader = new FrameReader(b, { deferDataChecksums: true });
      a.end(bytes);
      return [await reader.next(), await reader.next().catch((e: unknown) => e)] as const;
    } finally {
      close();
    }
  };
  const [dataFrame, control] = await read(good);
  t.false(dataFrame!.verified);
  t.is(dataFrame!.checksum, native.crc32c(data));
  t.notThrows(() => verifyFrame(dataFrame!));
  t.true(dataFrame!.verified);
  t.is((control as { type: FrameType }).type, FrameType.SectionEnd);

  const bad = Buffer.from(good);
  bad[FRAME_HEADER_BYTES + 777]! ^= 0x80; // in the data payload
  const [badData] = await read(bad);
  t.throws(() => verifyFrame(badData!), { code: 'ERR_MIGRATION_PROTOCOL', message: /checksum mismatch in a SectionData frame of section 2/ });

  const badControl = Buffer.from(good);
  badControl[badControl.length - 1]! ^= 0x01; // in the control payload
  const [, err] = await read(badControl);
  t.true(err instanceof MigrationError && /checksum mismatch in a SectionEnd frame/.test(err.message), 'control frames are verified by the reader');
});

test.serial('an accepted connection reads nothing until a reader attaches: a peer cannot fill memory at its own pace', async (t) => {
  const { a, b, close } = await socketPair({ migration: true });
  t.teardown(close);
  const before = slabStats();
  const writer = new FrameWriter(a);
  const total = 48;
  const sending = (async () => {
    for (let i = 0; i < total; i++) await writer.write(FrameType.SectionData, 0, Buffer.alloc(1 << 20, i));
  })();
  sending.catch(() => {}); // awaited at the end; a failed assertion must not leave it unhandled
  await new Promise((r) => setTimeout(r, 300));
  // Only the kernel's socket buffers hold anything: the sender is held back.
  t.true(a.writableLength > 8 << 20, `sender still holds ${a.writableLength} bytes`);
  t.true(slabStats().allocated - before.allocated <= 1, 'no slabs filled for an unread connection');
  const reader = new FrameReader(b);
  for (let i = 0; i < total; i++) {
    const f = await reader.next();
    t.is(f!.payload[0], i);
    f!.release();
  }
  await sending;
});

test.serial('a first frame is read into memory of its own size and not one byte more: no slab until a reader attaches, the rest intact after it', async (t) => {
  const { a, b, close } = await socketPair({ migration: true });
  t.teardown(close);
  const before = slabStats();
  const writer = new FrameWriter(a);
  const payloads = Array.from({ length: 6 }, (_, i) => randomBytes(100_000 + i));
  await writer.writeMessage(FrameType.ChannelHello, { migrationId: 'm', index: 1 });
  for (const [i, p] of payloads.entries()) await writer.write(FrameType.SectionData, i, p);
  await new Promise((r) => setTimeout(r, 100));
  const first = await readFirstFrame(b);
  t.is(first.type, FrameType.ChannelHello);
  t.deepEqual(JSON.parse(first.payload.toString()), { migrationId: 'm', index: 1 });
  await new Promise((r) => setTimeout(r, 100));
  const mid = slabStats();
  t.is(mid.allocated + mid.reused, before.allocated + before.reused, 'no slab before a reader attaches');
  const reader = new FrameReader(b);
  for (const [i, p] of payloads.entries()) {
    const f = await reader.next();
    t.is(f!.section, i);
    t.true(f!.payload.equals(p), `frame ${i} intact`);
  }
});

test('a first frame that is not a Hello or ChannelHello, or larger than its limit, is refused before its payload is read', async (t) => {
  const { a, b, close } = await socketPair({ migration: true });
  t.teardown(close);
  const header = Buffer.concat(encodeFrame(FrameType.Hello, 0, Buffer.alloc(0)));
  header.writeUInt32BE(2 << 20, 8); // a 2 MiB Hello, none of it sent
  a.write(resealed(header));
  await t.throwsAsync(readFirstFrame(b), { code: 'ERR_MIGRATION_PROTOCOL', message: /Hello frame of 2097152 bytes exceeds its 1048576-byte limit/ });
  const other = await socketPair({ migration: true });
  t.teardown(other.close);
  other.a.write(Buffer.concat(encodeFrame(FrameType.Commit, 0)));
  await t.throwsAsync(readFirstFrame(other.b), { code: 'ERR_MIGRATION_PROTOCOL', message: /must start with Hello or ChannelHello, not Commit/ });
  const cut = await socketPair({ migration: true });
  t.teardown(cut.close);
  cut.a.end(Buffer.concat(encodeFrame(FrameType.Hello, 0, jsonPayload({ a: 1 }))).subarray(0, 20));
  await t.throwsAsync(readFirstFrame(cut.b), { code: 'ERR_MIGRATION_CONNECTION' });
});

test('a discarding reader drops what arrives, frees it and never holds the sender back', async (t) => {
  const { a, b, close } = await socketPair({ migration: true });
  t.teardown(close);
  const reader = new FrameReader(b);
  const writer = new FrameWriter(a);
  await writer.write(FrameType.SectionData, 0, randomBytes(1000));
  t.is((await reader.next())!.length, 1000);
  reader.discard();
  t.is(await reader.next(), null);
  // 64 MiB, far past every buffer: the writes complete because the bytes are read and dropped.
  for (let i = 0; i < 64; i++) await writer.write(FrameType.SectionData, 0, Buffer.alloc(1 << 20));
  await new Promise((r) => setTimeout(r, 50));
  t.false(reader.backlogged);
  t.true(reader.bytesArrived > 32 << 20, `${reader.bytesArrived} bytes arrived and were dropped`);
});

test('a heartbeat is one header-only frame, written only into an idle stream', async (t) => {
  const { a, b, close } = await socketPair();
  t.teardown(close);
  const writer = new FrameWriter(a);
  const reader = new FrameReader(b);
  writer.heartbeat();
  const f = await reader.next();
  t.is(f!.type, FrameType.Heartbeat);
  t.is(f!.length, 0);
  t.is(writer.bytesWritten, FRAME_HEADER_BYTES);
  // Behind a backlog a heartbeat says nothing the queued bytes do not: none is queued.
  b.pause();
  void writer.write(FrameType.SectionData, 0, Buffer.alloc(4 << 20)).catch(() => {});
  // Loopback TCP can take tens of MiB into kernel buffers (tcp_rmem reaches
  // 32 MiB): the 4 MiB frame alone left the stream empty now and then. Fill
  // until the stream itself queues bytes.
  for (let i = 0; i < 32 && a.writableLength <= 64 << 10; i++) a.write(Buffer.alloc(4 << 20));
  t.true(a.writableLength > 64 << 10, 'the stream queues bytes');
  const queued = writer.bytesWritten;
  writer.heartbeat();
  t.is(writer.bytesWritten, queued);
});

test('a destination speaking another wire version is refused by the source with ERR_MIGRATION_INCOMPATIBLE, whatever its answer says', async (t) => {
  // A destination one version ahead: its answer's header carries WIRE_VERSION + 1 (magic and version keep their offsets in every version).
  const file = `/tmp/vfio-wire-version-${process.pid}.sock`;
  rmSync(file, { force: true });
  const server = net.createServer((s) => {
    s.once('data', () => {
      const answer = Buffer.concat(encodeFrame(FrameType.HelloAck, 0, jsonPayload({ wireVersion: WIRE_VERSION + 1 })));
      answer.writeUInt8(WIRE_VERSION + 1, 4);
      s.end(answer);
    });
  });
  await new Promise<void>((resolve) => server.listen(file, resolve));
  t.teardown(() => server.close());
  const side = await sourceSide({ mock: [['nic-vf', 1]] });
  t.teardown(() => side.close());
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm });
  const err = await t.throwsAsync(src.migrate(`unix:${file}`), { instanceOf: MigrationError });
  t.is(err?.code, 'ERR_MIGRATION_INCOMPATIBLE', err?.message);
  t.regex(err!.message, new RegExp(`wire version ${WIRE_VERSION + 1}, this side ${WIRE_VERSION}`));
  t.true(side.vm.running);
});
