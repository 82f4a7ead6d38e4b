// Property tests of the protocol module: random and mutated frames through
// the frame reader, random and mutated control messages through the
// validators. Typed errors only, never a hang, memory bounded; a single
// flipped bit anywhere in a frame is caught.
import test from 'ava';
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import fc from 'fast-check';
import { FRAME_HEADER_BYTES, type Frame, FrameReader, FrameType, MAX_FRAME_PAYLOAD_BYTES, WIRE_VERSION, encodeFrame, verifyFrame } from '../src/migration/wire.js';
import { DESTINATION_TABLE, MESSAGE_SCHEMAS, type MessageType, SOURCE_TABLE, destinationMeaning, makeFrame, messagePayload, parseMessage, sourceMeaning, validateMessage } from '../src/migration/protocol/index.js';
import { MigrationError } from '../src/migration/errors.js';
import { DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS } from '../src/migration/params.js';

/** Inputs fed to the reader and the validators by the tests below (at least 100,000 in all). */
let inputs = 0;

/** A stream that hands over given chunks, then ends: the reader sees what a socket would give it. */
class ChunkStream extends EventEmitter {
  #paused = false;
  isPaused(): boolean {
    return this.#paused;
  }
  pause(): this {
    this.#paused = true;
    return this;
  }
  resume(): this {
    this.#paused = false;
    return this;
  }
}

const HANG = Symbol('hang');

/**
 * Every frame the reader gives for `bytes` (cut at `cuts`), then its end:
 * null (clean end) or the error. Everything is already buffered, so each
 * next() must settle without any I/O: one that does not is a hang.
 */
async function readAll(bytes: Buffer, cuts: number[], options: { deferDataChecksums?: boolean } = {}): Promise<{ frames: Frame[]; end: unknown }> {
  const stream = new ChunkStream();
  const reader = new FrameReader(stream as unknown as Duplex, options);
  let at = 0;
  for (const cut of [...cuts.filter((c) => c > 0 && c < bytes.length)].sort((a, b) => a - b).concat(bytes.length)) {
    if (cut > at) stream.emit('data', bytes.subarray(at, cut));
    at = Math.max(at, cut);
  }
  stream.emit('end');
  const frames: Frame[] = [];
  for (let i = 0; ; i++) {
    if (i > bytes.length / FRAME_HEADER_BYTES + 1) throw new Error('more frames than the bytes can hold');
    let next: Frame | null | typeof HANG;
    try {
      next = await Promise.race([reader.next(), new Promise<typeof HANG>((resolve) => setImmediate(resolve, HANG))]);
    } catch (err) {
      return { frames, end: err };
    }
    if (next === HANG) throw new Error('the reader hung on a stream that had ended');
    if (next === null) return { frames, end: null };
    frames.push(next);
  }
}

const TYPES = Object.values(FrameType).filter((v): v is FrameType => typeof v === 'number');
const frameSpec = fc.record({
  type: fc.constantFrom(...TYPES),
  section: fc.integer({ min: 0, max: 65535 }),
  payload: fc.oneof({ weight: 4, arbitrary: fc.uint8Array({ maxLength: 64 }) }, { weight: 1, arbitrary: fc.uint8Array({ minLength: 1000, maxLength: 5000 }) }),
});
type FrameSpec = { type: FrameType; section: number; payload: Uint8Array };
const encode = (specs: FrameSpec[]) => Buffer.concat(specs.flatMap((f) => encodeFrame(f.type, f.section, Buffer.from(f.payload))));
const isTyped = (err: unknown, codes = ['ERR_MIGRATION_PROTOCOL', 'ERR_MIGRATION_INCOMPATIBLE', 'ERR_MIGRATION_CONNECTION']) => err instanceof MigrationError && codes.includes(err.code);

test.serial('valid frames come out intact and in order, whatever the stream cuts them into (30,000 streams)', async (t) => {
  const runs = 30_000;
  await fc.assert(
    fc.asyncProperty(fc.array(frameSpec, { minLength: 1, maxLength: 4 }), fc.array(fc.nat({ max: 20_000 }), { maxLength: 6 }), fc.boolean(), async (specs, cuts, defer) => {
      const { frames, end } = await readAll(encode(specs), cuts, { deferDataChecksums: defer });
      if (end !== null) return false;
      if (frames.length !== specs.length) return false;
      return frames.every((f, i) => {
        verifyFrame(f);
        return f.type === specs[i]!.type && f.section === specs[i]!.section && f.payload.equals(Buffer.from(specs[i]!.payload));
      });
    }),
    { numRuns: runs },
  );
  inputs += runs;
  t.pass();
});

test.serial('one flipped bit anywhere in a frame, header included, is caught: a typed error, the frames before it intact, never the flipped one (40,000 streams)', async (t) => {
  const runs = 40_000;
  await fc.assert(
    fc.asyncProperty(fc.array(frameSpec, { minLength: 1, maxLength: 3 }), fc.nat(), fc.nat({ max: 7 }), fc.array(fc.nat({ max: 20_000 }), { maxLength: 4 }), fc.boolean(), async (specs, where, bit, cuts, defer) => {
      const bytes = encode(specs);
      const at = where % bytes.length;
      bytes[at]! ^= 1 << bit;
      // The frame the bit is in.
      let start = 0;
      let hit = 0;
      for (; hit < specs.length; hit++) {
        const size = FRAME_HEADER_BYTES + specs[hit]!.payload.length;
        if (at < start + size) break;
        start += size;
      }
      const { frames, end } = await readAll(bytes, cuts, { deferDataChecksums: defer });
      // Deferred section data is checked by its loader (here verifyFrame): the flip is caught there.
      for (const [i, f] of frames.entries()) {
        try {
          verifyFrame(f);
        } catch (err) {
          return isTyped(err, ['ERR_MIGRATION_PROTOCOL']) && i === hit && f.type === FrameType.SectionData && defer;
        }
        if (i >= hit) return false; // the flipped frame (or one after it) passed every check
      }
      return isTyped(end) && frames.length === hit && frames.every((f, i) => f.payload.equals(Buffer.from(specs[i]!.payload)));
    }),
    { numRuns: runs },
  );
  inputs += runs;
  t.pass();
});

test.serial('every single bit of a Hello, a heartbeat and a data frame flipped in turn is caught (exhaustive)', async (t) => {
  const frames = [
    Buffer.concat(encodeFrame(FrameType.Hello, 0, Buffer.from(JSON.stringify({ hello: 'x'.repeat(40) })))),
    Buffer.concat(encodeFrame(FrameType.Heartbeat, 0)),
    Buffer.concat(encodeFrame(FrameType.SectionData, 7, Buffer.alloc(100, 0xa5))),
  ];
  let flips = 0;
  for (const good of frames) {
    for (let bit = 0; bit < good.length * 8; bit++) {
      const bad = Buffer.from(good);
      bad[bit >> 3]! ^= 1 << (bit & 7);
      const { frames: got, end } = await readAll(bad, []);
      t.true(got.length === 0 && isTyped(end, ['ERR_MIGRATION_PROTOCOL', 'ERR_MIGRATION_INCOMPATIBLE']), `bit ${bit} of a ${FrameType[good.readUInt8(5)]} frame`);
      flips++;
    }
  }
  inputs += flips;
  t.log(`${flips} single-bit flips, each caught`);
});

test.serial('random bytes and truncated frames are a typed error or a clean end, never a hang, with memory bounded (20,000 streams)', async (t) => {
  const runs = 20_000;
  const rssBefore = process.memoryUsage().rss;
  await fc.assert(
    fc.asyncProperty(
      fc.oneof(
        fc.uint8Array({ maxLength: 200 }),
        // A well-formed header promising up to the maximum payload, and a few bytes of it.
        fc.tuple(frameSpec, fc.nat({ max: 100 })).map(([f, keep]) => {
          const b = encode([f]);
          return b.subarray(0, Math.min(b.length - 1, FRAME_HEADER_BYTES + keep));
        }),
        // A valid frame followed by garbage.
        fc.tuple(frameSpec, fc.uint8Array({ minLength: 1, maxLength: 64 })).map(([f, junk]) => Buffer.concat([encode([f]), junk])),
      ),
      fc.array(fc.nat({ max: 300 }), { maxLength: 4 }),
      async (bytes, cuts) => {
        const { end } = await readAll(Buffer.from(bytes), cuts);
        return end === null || isTyped(end);
      },
    ),
    { numRuns: runs },
  );
  inputs += runs;
  const grewMiB = (process.memoryUsage().rss - rssBefore) / 2 ** 20;
  t.log(`RSS grew ${grewMiB.toFixed(1)} MiB over ${runs} hostile streams`);
  // A reader that allocated what headers promise (up to 8 MiB each) would grow by gigabytes.
  t.true(grewMiB < 256, `RSS grew ${grewMiB.toFixed(1)} MiB`);
  t.is(MAX_FRAME_PAYLOAD_BYTES, 8 << 20);
});

/** A valid message of each type (every field present), as the peers send them. */
const VALID: { [T in MessageType]: unknown } = {
  [FrameType.Hello]: { wireVersion: WIRE_VERSION, migrationId: 'm-1', channels: 2, sections: [{ id: 'nic0', kind: 'vfio', compat: 'mock:nic-vf' }], capabilities: { ...DEFAULT_CAPABILITIES }, parameters: { ...DEFAULT_PARAMETERS } },
  [FrameType.ChannelHello]: { migrationId: 'm-1', index: 1 },
  [FrameType.HelloAck]: { wireVersion: WIRE_VERSION },
  [FrameType.Error]: { code: 'ERR_MIGRATION_DEVICE', message: 'it broke', notRunning: true },
  [FrameType.Cancel]: { reason: 'cancelled by the user', code: 'ERR_MIGRATION_CANCELLED' },
  [FrameType.LoadReport]: { sections: [{ section: 0, arcs: [{ arc: 'stop>running-p2p', step: 'resume-p2p', ms: 3, basis: 'measured' }], loadMsPerMiB: 0.5 }], receivedBytes: 100, loadedBytes: 50 },
  [FrameType.InitialLoaded]: { section: 1 },
  [FrameType.Switchover]: { abortAfterMs: 1500, sentAfterStopMs: 2.5 },
  [FrameType.Running]: { digests: ['ab', null], loadMs: 10, resumeMs: 2, readyWorkMs: 4, resumeWorkMs: 1.5, exchangeArcsMs: 3 },
  [FrameType.Ping]: { seq: 0 },
  [FrameType.Pong]: { seq: 2 },
  [FrameType.SectionEnd]: {},
  [FrameType.SwitchoverAck]: { renewals: 1 },
  [FrameType.ReadyToRun]: undefined,
  [FrameType.Commit]: undefined,
  [FrameType.EndOfStream]: undefined,
  [FrameType.InitialSent]: undefined,
  [FrameType.InitialRenewed]: undefined,
  [FrameType.Heartbeat]: undefined,
};
const MESSAGE_TYPES = Object.keys(MESSAGE_SCHEMAS).map(Number) as MessageType[];
const JSON_TYPES = MESSAGE_TYPES.filter((m) => VALID[m] !== undefined);

/** Every path to a value inside a JSON value: [keys]. */
function paths(v: unknown, prefix: (string | number)[] = []): (string | number)[][] {
  if (typeof v !== 'object' || v === null) return [prefix];
  const own = Array.isArray(v) ? v.map((x, i) => paths(x, [...prefix, i])) : Object.entries(v).map(([k, x]) => paths(x, [...prefix, k]));
  return [prefix, ...own.flat()];
}

function setAt(root: unknown, path: (string | number)[], value: unknown, remove = false): unknown {
  if (path.length === 0) return value;
  const copy = structuredClone(root) as Record<string | number, unknown>;
  let at = copy;
  for (const k of path.slice(0, -1)) at = at[k] as Record<string | number, unknown>;
  const last = path[path.length - 1]!;
  if (remove) {
    if (Array.isArray(at)) at.splice(Number(last), 1);
    else delete at[last];
  } else Object.defineProperty(at, last, { value, enumerable: true, writable: true, configurable: true }); // an own "__proto__" too, as JSON.parse makes it
  return copy;
}

test.serial('valid messages pass and round-trip through a frame (every type)', (t) => {
  for (const type of MESSAGE_TYPES) {
    const payload = messagePayload(type, VALID[type] as never);
    const frame = makeFrame(type, 0, payload.length ? [payload] : [], { checksum: 0, verified: true });
    t.deepEqual(parseMessage(type, frame), VALID[type] ?? {}, FrameType[type]);
  }
});

test.serial('random JSON and mutated messages are accepted or refused with ERR_MIGRATION_PROTOCOL naming the field, never anything else (50,000 messages)', async (t) => {
  const runs = 25_000;
  // Random values of any shape, for every message type.
  fc.assert(
    fc.property(fc.constantFrom(...MESSAGE_TYPES), fc.jsonValue({ maxDepth: 4 }), (type, value) => {
      try {
        validateMessage(type, value);
        return true;
      } catch (err) {
        return isTyped(err, ['ERR_MIGRATION_PROTOCOL']) && (err as Error).message.startsWith(FrameType[type]!);
      }
    }),
    { numRuns: runs },
  );
  // A valid message with one value replaced, removed or added: refused naming where, or (same type, in range) accepted.
  let refused = 0;
  fc.assert(
    fc.property(
      fc.constantFrom(...JSON_TYPES),
      fc.nat(),
      fc.oneof(fc.jsonValue({ maxDepth: 2 }), fc.constant(undefined)),
      fc.boolean(),
      fc.string({ maxLength: 12 }),
      (type, pick, value, add, extraKey) => {
        const valid = VALID[type];
        const all = paths(valid);
        const path = all[pick % all.length]!;
        let mutated: unknown;
        let named: string;
        const adding = add && path.length > 0 && typeof valid === 'object';
        if (adding) {
          // An extra field beside an existing one (objects only).
          const parent = path.slice(0, -1);
          const holder = parent.reduce<unknown>((o, k) => (o as Record<string | number, unknown>)[k], valid);
          if (typeof holder !== 'object' || holder === null || Array.isArray(holder) || Object.hasOwn(holder, extraKey)) return true;
          mutated = setAt(valid, [...parent, extraKey], value ?? 1);
          named = FrameType[type]! + parent.map((k) => (typeof k === 'number' ? `[${k}]` : `.${k}`)).join('');
        } else {
          mutated = value === undefined ? setAt(valid, path, undefined, true) : setAt(valid, path, value);
          named = FrameType[type]!;
        }
        try {
          validateMessage(type, mutated);
          return !adding;
        } catch (err) {
          refused++;
          return isTyped(err, ['ERR_MIGRATION_PROTOCOL']) && (err as Error).message.startsWith(named);
        }
      },
    ),
    { numRuns: runs },
  );
  inputs += 2 * runs;
  t.true(refused > runs / 2, `${refused} of ${runs} mutations refused`);
});

test.serial('a message field of the wrong type is named: Hello.parameters.downtime-limit: expected a number', (t) => {
  const hello = structuredClone(VALID[FrameType.Hello]) as { parameters: Record<string, unknown>; sections: unknown[] };
  hello.parameters['downtime-limit'] = 'fast';
  t.throws(() => validateMessage(FrameType.Hello, hello), { code: 'ERR_MIGRATION_PROTOCOL', message: 'Hello.parameters.downtime-limit: expected a number, got string "fast"' });
  hello.parameters['downtime-limit'] = 0;
  t.throws(() => validateMessage(FrameType.Hello, hello), { code: 'ERR_MIGRATION_PROTOCOL', message: /^Hello\.parameters: parameter "downtime-limit" must be a number between 1 and/ });
  t.throws(() => validateMessage(FrameType.LoadReport, { ...(VALID[FrameType.LoadReport] as object), sections: [{ section: 0, arcs: [{ arc: 'a', step: 'resume', ms: 1, basis: 'guessed' }], loadMsPerMiB: null }] }), {
    message: /^LoadReport\.sections\[0\]\.arcs\[0\]\.basis: expected one of "measured"/,
  });
  t.throws(() => validateMessage(FrameType.ChannelHello, { migrationId: 'm', index: 1, admin: true }), { message: 'ChannelHello.admin: unknown field' });
  const empty = makeFrame(FrameType.Commit, 0, [Buffer.from('{}')], { checksum: 0, verified: true });
  t.throws(() => parseMessage(FrameType.Commit, empty), { code: 'ERR_MIGRATION_PROTOCOL', message: 'Commit: expected no payload, got 2 bytes' });
});

test.serial('the end-of-migration tables: each side refuses a frame its phase has no meaning for', (t) => {
  // The source commits only on ReadyToRun after its switchover; nothing but Running (or an Error) ends it after the commit.
  t.is(sourceMeaning('switchover', FrameType.ReadyToRun), 'ready');
  t.throws(() => sourceMeaning('precopy', FrameType.ReadyToRun), { code: 'ERR_MIGRATION_PROTOCOL', message: /unexpected ReadyToRun frame from the destination in the precopy phase/ });
  t.throws(() => sourceMeaning('switchover', FrameType.Running), { code: 'ERR_MIGRATION_PROTOCOL' });
  t.is(sourceMeaning('committed', FrameType.Running), 'running');
  t.is(sourceMeaning('committed', FrameType.Error), 'failed-after-commit');
  t.is(sourceMeaning('precopy', FrameType.Error), 'failed-before-commit');
  t.is(sourceMeaning('done', FrameType.Error), 'late');
  // The destination runs the VM only on a Commit after its ReadyToRun; a Cancel after the commit changes nothing.
  t.throws(() => destinationMeaning('loading', FrameType.Commit), { code: 'ERR_MIGRATION_PROTOCOL', message: /unexpected Commit frame from the source in the loading phase/ });
  t.is(destinationMeaning('ready', FrameType.Commit), 'commit');
  t.is(destinationMeaning('ready', FrameType.Cancel), 'cancelled');
  t.is(destinationMeaning('committed', FrameType.Cancel), 'late');
  t.throws(() => destinationMeaning('ready', FrameType.SectionData), { code: 'ERR_MIGRATION_PROTOCOL' });
  t.throws(() => destinationMeaning('switchover', FrameType.Switchover), { code: 'ERR_MIGRATION_PROTOCOL' });
  // Each side's frames only: the destination never takes a destination's frame, and the reverse.
  for (const phase of Object.keys(DESTINATION_TABLE) as (keyof typeof DESTINATION_TABLE)[])
    for (const type of [FrameType.HelloAck, FrameType.Running, FrameType.ReadyToRun, FrameType.Error]) t.throws(() => destinationMeaning(phase, type), undefined, `${phase} ${FrameType[type]}`);
  for (const phase of ['handshake', 'precopy', 'switchover', 'committed'] as const)
    for (const type of [FrameType.Commit, FrameType.Cancel, FrameType.SectionData, FrameType.Switchover]) t.throws(() => sourceMeaning(phase, type), undefined, `${phase} ${FrameType[type]}`);
  t.truthy(SOURCE_TABLE.done[FrameType.Heartbeat]);
});

test.serial('the property tests fed at least 100,000 frames and messages', (t) => {
  // Serial tests: this one, declared last, runs after the others.
  t.log(`${inputs} inputs`);
  t.true(inputs >= 100_000, `${inputs} inputs`);
});
