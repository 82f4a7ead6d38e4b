// A destination serves strangers safely: real sockets to a destination in
// this process; idle, malformed, hostile and flooding connections each cost
// their own connection only, in bounded memory, and never a migration.
import test from 'ava';
import net from 'node:net';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { MigrationSource } from '../src/migration/source.js';
import { MigrationDestination, type IncomingResult } from '../src/migration/destination.js';
import { MigrationError } from '../src/migration/errors.js';
import { FrameReader, FrameType, WIRE_VERSION, encodeFrame, jsonPayload } from '../src/migration/wire.js';
import { slabStats } from '../src/migration/transport.js';
import { native } from '../src/vfio/native.js';
import { type SourceSide, sourceSide } from './harness.js';
import { onJsonLines } from '../src/json-lines.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const spec = { mock: [['nic-vf', 1]] as [string, number][], overrides: { stateBytes: '2MiB', dirtyWorkingSetBytes: '512KiB', arcLatencyMs: { default: 2 } } };
let sockets = 0;

async function destination(t: { teardown(fn: () => void | Promise<void>): void }, options: { handshakeTimeoutMs?: number; maxPendingConnections?: number; mock?: [string, number][]; overrides?: Record<string, unknown> } = {}) {
  const side = await sourceSide({ ...spec, mock: options.mock ?? spec.mock, overrides: { ...spec.overrides, ...options.overrides } });
  side.vm.running = false;
  const dest = new MigrationDestination({ handlers: side.handlers, vm: side.vm, handshakeTimeoutMs: options.handshakeTimeoutMs, maxPendingConnections: options.maxPendingConnections });
  const uri = await dest.listen(`unix:/tmp/vfio-mig-strangers-${process.pid}-${++sockets}.sock`);
  t.teardown(async () => {
    await dest.close();
    await side.close();
  });
  return { dest, uri, side };
}

async function source(overrides: Record<string, unknown> = {}, parameters: Record<string, number> = { 'downtime-limit': 2000 }): Promise<{ side: SourceSide; src: MigrationSource }> {
  const side = await sourceSide({ ...spec, overrides: { ...spec.overrides, ...overrides } });
  return { side, src: new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters }) };
}

function rawConnect(uri: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(uri.slice('unix:'.length));
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

/** What the destination says on a connection before it closes it: its Error frame, or null. */
async function answerOf(s: net.Socket): Promise<{ code: string; message: string } | null> {
  const reader = new FrameReader(s);
  for (;;) {
    const f = await reader.next().catch(() => null);
    if (!f) return null;
    if (f.type === FrameType.Error) return JSON.parse(f.payload.toString()) as { code: string; message: string };
  }
}

const closed = (s: net.Socket) => new Promise<void>((r) => (s.destroyed ? r() : s.once('close', () => r())));

test.serial('an idle connection neither blocks nor ends a migration; it is closed with a typed error at its handshake deadline', async (t) => {
  const { dest, uri } = await destination(t, { handshakeTimeoutMs: 3000 });
  const idle = await rawConnect(uri);
  const idleAnswer = answerOf(idle);
  const incoming = dest.incoming();
  const { side, src } = await source();
  const info = await src.migrate(uri);
  t.is(info.status, 'completed');
  t.is((await incoming).status, 'completed');
  t.false(idle.destroyed, 'the idle connection is still waiting (its deadline has not passed)');
  const answer = await idleAnswer;
  t.is(answer?.code, 'ERR_MIGRATION_PROTOCOL');
  t.regex(answer!.message, /handshake deadline/);
  await closed(idle);
  await side.close();
});

test.serial('a malformed or hostile first frame costs that connection only: a typed Error frame, then closed; the migration still runs', async (t) => {
  const { dest, uri } = await destination(t);
  const incoming = dest.incoming();
  const hello = (payload: Buffer) => Buffer.concat(encodeFrame(FrameType.Hello, 0, payload));
  const badVersion = hello(jsonPayload({}));
  badVersion.writeUInt8(WIRE_VERSION + 7, 4);
  const huge = hello(Buffer.alloc(0));
  huge.writeUInt32BE(100 << 20, 8); // announces 100 MiB: refused before a byte of it is read
  huge.writeUInt32BE(native.crc32c(huge.subarray(0, 16)), 16); // its header checksum right: the length is what is refused
  const cases: [string, Buffer, string, RegExp][] = [
    ['not a migration stream', Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), 'ERR_MIGRATION_PROTOCOL', /bad frame magic/],
    ['a Hello that is not JSON', hello(Buffer.from('{"migrationId": "x", ')), 'ERR_MIGRATION_PROTOCOL', /valid JSON/],
    ['a Hello of JSON null', hello(jsonPayload(null)), 'ERR_MIGRATION_PROTOCOL', /^Hello: expected an object, got null/],
    ['a Hello without channels', hello(jsonPayload({ migrationId: 'x', wireVersion: WIRE_VERSION, sections: [], capabilities: {}, parameters: {} })), 'ERR_MIGRATION_PROTOCOL', /^Hello\.channels: expected an integer, got nothing/],
    ['data before any hello', Buffer.concat(encodeFrame(FrameType.SectionData, 0, Buffer.alloc(64, 1))), 'ERR_MIGRATION_PROTOCOL', /must start with Hello or ChannelHello/],
    ['a 100 MiB Hello', huge, 'ERR_MIGRATION_PROTOCOL', /exceeds its 1048576-byte limit/],
    ['another wire version', badVersion, 'ERR_MIGRATION_INCOMPATIBLE', /wire version/],
    ['a ChannelHello of JSON null', Buffer.concat(encodeFrame(FrameType.ChannelHello, 0, jsonPayload(null))), 'ERR_MIGRATION_PROTOCOL', /^ChannelHello: expected an object, got null/],
  ];
  for (const [what, bytes, code, message] of cases) {
    const s = await rawConnect(uri);
    const answer = answerOf(s);
    s.write(bytes);
    const a = await answer;
    t.is(a?.code, code, what);
    t.regex(a?.message ?? '', message, what);
    await closed(s);
  }
  t.is(dest.status, 'none', 'no migration started');
  const { side, src } = await source();
  t.is((await src.migrate(uri)).status, 'completed');
  t.is((await incoming).status, 'completed');
  await side.close();
});

test.serial('a ChannelHello before its Hello is only taken by the migration it names: a stranger\'s channel never reaches a device', async (t) => {
  const { dest, uri } = await destination(t, { handshakeTimeoutMs: 1500, mock: [['nic-vf', 2]] });
  // A stranger claims channel 1 of some migration and sends device data on it.
  const stranger = await rawConnect(uri);
  const strangerAnswer = answerOf(stranger);
  stranger.write(Buffer.concat([...encodeFrame(FrameType.ChannelHello, 0, jsonPayload({ migrationId: 'not-yours', index: 1 })), ...encodeFrame(FrameType.SectionData, 0, Buffer.alloc(4096, 0xee))]));
  await sleep(100);
  const incoming = dest.incoming();
  const side = await sourceSide({ ...spec, mock: [['nic-vf', 2]] });
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: { 'downtime-limit': 2000 } });
  const info = await src.migrate(uri, { channels: 2 });
  t.is(info.status, 'completed');
  t.true(info.digests!.every((d) => d.match === true), 'every device holds exactly the source\'s state');
  t.is((await incoming).status, 'completed');
  const answer = await strangerAnswer;
  t.is(answer?.code, 'ERR_MIGRATION_PROTOCOL', 'the stranger is closed at its deadline, never adopted');
  await side.close();
});

test.serial('a second source while a migration runs is told busy (ERR_MIGRATION_BUSY) and keeps its VM; after the first fails the next is served', async (t) => {
  const { dest, uri } = await destination(t);
  const results = dest.serve();
  const first = results.next();
  // downtime-limit 1 ms never converges: the first migration stays in precopy until cancelled.
  const a = await source({}, { 'downtime-limit': 1 });
  const migrating = a.src.migrate(uri);
  migrating.catch(() => {});
  await new Promise<void>((r) => a.src.once('MIGRATION_PASS', () => r()));
  const b = await source();
  const err = await t.throwsAsync(b.src.migrate(uri), { instanceOf: MigrationError });
  t.is(err?.code, 'ERR_MIGRATION_BUSY');
  t.regex(err!.message, /running another migration/);
  t.true(b.side.vm.running);
  t.is(b.side.devices[0]!.mockInfo().arcsTaken, 0, 'no device of the second source changed state');
  a.src.cancel('test');
  await t.throwsAsync(migrating, { code: 'ERR_MIGRATION_CANCELLED' });
  const r1 = (await first).value as IncomingResult;
  t.not(r1.status, 'completed');
  const c = await source();
  const [info, r2] = await Promise.all([c.src.migrate(uri), results.next()]);
  t.is(info.status, 'completed');
  t.is((r2.value as IncomingResult).status, 'completed');
  await Promise.all([a.side.close(), b.side.close(), c.side.close()]);
});

test.serial('a flood of strangers costs bounded memory: no slab before a valid Hello, at most maxPendingConnections held, each reading only its first frame', async (t) => {
  const maxPending = 16;
  const { dest, uri } = await destination(t, { handshakeTimeoutMs: 1500, maxPendingConnections: maxPending });
  const incoming = dest.incoming();
  const slabsBefore = slabStats();
  const memBefore = process.memoryUsage().arrayBuffers;
  // 200 connections from another process, each a ChannelHello followed by 16 MiB.
  const flood = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `import net from 'node:net';
       import { encodeFrame, FrameType, jsonPayload } from ${JSON.stringify(path.resolve(here, '..', 'src', 'migration', 'wire.js'))};
       const hello = Buffer.concat(encodeFrame(FrameType.ChannelHello, 0, jsonPayload({ migrationId: 'flood', index: 1 })));
       const blob = Buffer.alloc(16 << 20, 7);
       let closed = 0, n = 200;
       for (let i = 0; i < n; i++) {
         const s = net.connect(${JSON.stringify(uri.slice('unix:'.length))});
         s.on('error', () => {});
         s.on('close', () => { if (++closed === n) console.log(JSON.stringify({ allClosed: true })); });
         s.write(hello); s.write(blob);
       }
       console.log(JSON.stringify({ sent: n }));`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  t.teardown(() => flood.kill('SIGKILL'));
  const lines: Record<string, unknown>[] = [];
  onJsonLines(flood.stdout!, (o) => lines.push(o));
  while (!lines.some((l) => l.sent)) await sleep(20);
  await sleep(500);
  t.true(dest.pendingConnections <= maxPending, `${dest.pendingConnections} connections pending`);
  const slabs = slabStats();
  t.is(slabs.allocated + slabs.reused - slabsBefore.allocated - slabsBefore.reused, 0, 'no slab taken for a connection that has not identified itself');
  const grownBytes = process.memoryUsage().arrayBuffers - memBefore;
  t.log(`buffer memory grew ${(grownBytes / (1 << 20)).toFixed(1)} MiB under 200 connections each sending 16 MiB`);
  t.true(grownBytes < 32 << 20, `buffer memory grew ${grownBytes} bytes`);
  // Past their deadline every flood connection is closed; then a real source is served.
  while (!lines.some((l) => l.allClosed)) await sleep(50);
  t.is(dest.pendingConnections, 0);
  const { side, src } = await source();
  t.is((await src.migrate(uri)).status, 'completed');
  t.is((await incoming).status, 'completed');
  await side.close();
});
