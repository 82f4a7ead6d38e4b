// TLS and authorization on the migration stream, with real processes (the
// CLI's incoming, or test/peer-process.ts for the fault cases) and real
// sockets; the CA and certificates are made with openssl at test time.
// Every refusal is typed on both ends (ERR_MIGRATION_TLS and its reason)
// and comes before any device state changes on the destination.
import test from 'ava';
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import { syncBuiltinESMExports } from 'node:module';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { MigrationSource } from '../src/migration/source.js';
import { MigrationDestination, type IncomingResult } from '../src/migration/destination.js';
import { MigrationError } from '../src/migration/errors.js';
import type { MigrationParameters } from '../src/migration/params.js';
import { type TlsOptions, MigrationTlsError, globMatch, parsePskKeys } from '../src/migration/tls.js';
import { encodeFrame, FrameType, messagePayload } from '../src/migration/protocol/index.js';
import { onJsonLines } from '../src/json-lines.js';
import { parseUri } from '../src/migration/transport.js';
import { native } from '../src/vfio/native.js';
import { CLI, type FaultPhase, assertRolledBack, deviceArgs, onPhase, sourceSide, startPeer, type PeerProcess } from './harness.js';
import { createNetns, openFdCount } from './helpers.js';
import { type TlsFixtures, makeTlsFixtures } from './tls-fixtures.js';

let fx: TlsFixtures;
test.before(async () => {
  fx = await makeTlsFixtures();
});
test.after.always(async () => {
  await fx?.remove();
});

const spec = { mock: [['nic-vf', 2]] as [string, number][], overrides: { stateBytes: '4MiB', arcLatencyMs: { default: 2 } } };
const params: Partial<MigrationParameters> = { 'downtime-limit': 2000 };

interface Dest {
  uri: string;
  proc: ChildProcess;
  events: { event: string; data: Record<string, unknown> }[];
  result: Promise<Record<string, unknown> | null>;
  /** Resolves with the first event (so far or to come) that matches. */
  event(match: (e: { event: string; data: Record<string, unknown> }) => boolean, timeoutMs?: number): Promise<{ event: string; data: Record<string, unknown> }>;
  exitCode: Promise<number | null>;
  stderr(): string;
}

let sockets = 0;

/** The CLI's incoming (one-shot) with `args`, on a unix socket unless `listen` says otherwise. */
async function incoming(t: { teardown(f: () => void): void }, args: string[], listen = `unix:/tmp/vfio-mig-tls-${process.pid}-${++sockets}.sock`, devices = deviceArgs(spec)): Promise<Dest> {
  const proc = spawn(process.execPath, [CLI, 'incoming', '--listen', listen, '--json', '--once', '--arc-history', 'none', ...devices, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => proc.kill('SIGKILL'));
  const events: Dest['events'] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  let resolveResult!: (r: Record<string, unknown> | null) => void;
  const result = new Promise<Record<string, unknown> | null>((r) => (resolveResult = r));
  const uri = await new Promise<string>((resolve, reject) => {
    onJsonLines(proc.stdout!, (o) => {
      if (o.listening) resolve(o.listening as string);
      else if (o.result) resolveResult(o.result as Record<string, unknown>);
      else if (o.event) {
        events.push(o as Dest['events'][number]);
        for (const w of [...waiters]) w();
      }
    });
    proc.on('close', (code) => {
      resolveResult(null);
      for (const w of [...waiters]) w();
      reject(new Error(`incoming exited (${code}) before listening: ${stderr}`));
    });
  });
  const event: Dest['event'] = (match, timeoutMs = 15_000) =>
    new Promise((resolve, reject) => {
      const check = () => {
        const hit = events.find(match);
        if (!hit && proc.exitCode === null) return;
        waiters.delete(check);
        clearTimeout(timer);
        if (hit) resolve(hit);
        else reject(new Error(`destination exited without the event; stderr: ${stderr}`));
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`no such destination event within ${timeoutMs} ms; events: ${JSON.stringify(events).slice(0, 2000)}`));
      }, timeoutMs);
      waiters.add(check);
      check();
    });
  const exitCode = new Promise<number | null>((r) => (proc.exitCode !== null ? r(proc.exitCode) : proc.on('close', (c) => r(c))));
  return { uri, proc, events, result, event, exitCode, stderr: () => stderr };
}

const refused = (reason: string) => (e: { event: string; data: Record<string, unknown> }) => e.event === 'CONNECTION_REFUSED' && e.data.reason === reason;

/** Nothing of a migration happened on the destination: no device changed state, no migration was set up. */
function destinationUntouched(t: { deepEqual(a: unknown, b: unknown, m?: string): void }, d: Dest) {
  t.deepEqual(
    d.events.filter((e) => e.event === 'VFIO_MIGRATION' || e.event === 'MIGRATION'),
    [],
    'no device changed state and no migration was set up on the destination',
  );
}

/** A source migrating with `tls`; resolves with its outcome, and checks the VM and devices run here whatever happened. */
async function migrate(t: { true(v: boolean, m?: string): void; is(a: unknown, b: unknown, m?: string): void }, uri: string, tlsOptions: TlsOptions | undefined, channels = 2) {
  const side = await sourceSide(spec);
  try {
    const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: params, ...(tlsOptions ? { tls: tlsOptions } : {}) });
    try {
      const info = await src.migrate(uri, { channels });
      return { info, err: null as MigrationError | null };
    } catch (err) {
      t.true(side.vm.running, `the VM runs on the source after a refusal (${(err as Error).message})`);
      for (const d of side.devices) t.is(await d.getState(), 'running', 'source devices run');
      return { info: src.query(), err: err as MigrationError };
    }
  } finally {
    await side.close();
  }
}

const destArgs = () => ['--tls-creds', fx.dest, '--tls-authz', `${fx.sourceDn}`, '--tls-authz', 'DNS:backup.example'];
const sourceTls = (over: Partial<TlsOptions> = {}): TlsOptions => ({ creds: fx.source, hostname: 'dest.example', ...over });

test.serial('mutual TLS (x509, authz) on every channel over a unix socket: the migration completes with digests equal, no fd leaked', async (t) => {
  const d = await incoming(t, destArgs());
  const { info, err } = await migrate(t, d.uri, sourceTls(), 3);
  t.is(err, null, err?.message);
  t.is(info.status, 'completed');
  t.true(info.digests!.length === 2 && info.digests!.every((x) => x.match === true), JSON.stringify(info.digests));
  const r = await d.result;
  t.is(r?.status, 'completed');
  t.is(r?.fdsAtEnd, r?.fdsAtStart, 'destination fds');
  t.deepEqual(d.events.filter((e) => e.event === 'CONNECTION_REFUSED'), []);
});

test.serial('CLI both ends: migrate --tls-creds --tls-hostname to incoming --tls-creds --tls-authz completes with digests equal (exit 0)', async (t) => {
  const d = await incoming(t, destArgs());
  const proc = spawn(process.execPath, [CLI, 'migrate', '--to', d.uri, '--json', '--arc-history', 'none', '--channels', '2', '--param', 'downtime-limit=2000', ...deviceArgs(spec), '--tls-creds', fx.source, '--tls-hostname', 'dest.example'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let result: Record<string, unknown> | null = null;
  let stderr = '';
  proc.stderr!.on('data', (b) => (stderr += b));
  onJsonLines(proc.stdout!, (o) => {
    if (o.result) result = o.result as Record<string, unknown>;
  });
  const code = await new Promise<number | null>((r) => proc.on('close', r));
  t.is(code, 0, stderr);
  const r = result as { status?: string; digests?: { match: boolean }[] } | null;
  t.is(r?.status, 'completed');
  t.true(r!.digests!.every((x) => x.match === true));
  t.is((await d.result)?.status, 'completed');
});

test.serial('mutual TLS over tcp checks the destination certificate against the URI host (127.0.0.1 in its SAN) without tls-hostname', async (t) => {
  const d = await incoming(t, ['--tls-creds', fx.dest], 'tcp:127.0.0.1:0');
  const { info, err } = await migrate(t, d.uri, { creds: fx.source }, 2);
  t.is(err, null, err?.message);
  t.is(info.status, 'completed');
  t.true(info.digests!.every((x) => x.match === true));
  t.is((await d.result)?.status, 'completed');
});

test.serial('PSK (QEMU keys file) on every channel: the migration completes with digests equal; a second username of the file is accepted too', async (t) => {
  const d = await incoming(t, ['--tls-psk', fx.psk, '--tls-authz', 'qemu', '--tls-authz', 'backup']);
  const { info, err } = await migrate(t, d.uri, { psk: fx.psk }, 2);
  t.is(err, null, err?.message);
  t.is(info.status, 'completed');
  t.true(info.digests!.every((x) => x.match === true));
  t.is((await d.result)?.status, 'completed');
});

/** A refusal: typed on the source (reason `sourceReason`) and on the destination (CONNECTION_REFUSED with `destReason`), nothing changed there. */
async function refusal(t: Parameters<typeof migrate>[0] & { deepEqual(a: unknown, b: unknown, m?: string): void; log(...a: unknown[]): void }, d: Dest, tlsOptions: TlsOptions | undefined, sourceReason: string, destReason: string) {
  const { err } = await migrate(t, d.uri, tlsOptions);
  t.is(err?.code, 'ERR_MIGRATION_TLS', err?.message);
  t.is((err as MigrationTlsError | null)?.reason, sourceReason, err?.message);
  const e = await d.event(refused(destReason));
  t.log(`source: ${err?.message}\ndestination: ${e.data.message}`);
  t.is(e.data.code, 'ERR_MIGRATION_TLS');
  destinationUntouched(t, d);
}

test.serial('refused: a client certificate from another CA (unknown-ca on both ends)', async (t) => {
  const d = await incoming(t, destArgs());
  await refusal(t, d, sourceTls({ creds: fx.sourceOtherCa }), 'unknown-ca', 'unknown-ca');
});

test.serial('refused: an expired client certificate (expired on both ends)', async (t) => {
  const d = await incoming(t, destArgs());
  await refusal(t, d, sourceTls({ creds: fx.sourceExpired }), 'expired', 'expired');
});

test.serial("refused: the destination's expired certificate (the source says expired; the destination, that the source refused it)", async (t) => {
  const d = await incoming(t, ['--tls-creds', fx.destExpired]);
  await refusal(t, d, sourceTls(), 'expired', 'peer-refused');
});

test.serial("refused: a destination certificate from a CA the source does not trust (unknown-ca at the source)", async (t) => {
  const d = await incoming(t, destArgs());
  await refusal(t, d, sourceTls({ creds: fx.sourceDistrusts }), 'unknown-ca', 'peer-refused');
});

test.serial('refused: a wrong hostname (the certificate is for dest.example)', async (t) => {
  const d = await incoming(t, destArgs());
  await refusal(t, d, sourceTls({ hostname: 'other.example' }), 'hostname-mismatch', 'peer-refused');
});

test.serial('refused: a client identity outside the authz list (same CA, CN=intruder.example)', async (t) => {
  const d = await incoming(t, destArgs());
  await refusal(t, d, sourceTls({ creds: fx.sourceIntruder }), 'not-authorized', 'not-authorized');
});

test.serial('refused: a plaintext source against a TLS destination (plaintext-refused on both ends)', async (t) => {
  const d = await incoming(t, destArgs());
  await refusal(t, d, undefined, 'plaintext-refused', 'plaintext-refused');
});

test.serial('refused: a TLS source against a plaintext destination (the source refuses plaintext; the destination says it is not configured for TLS)', async (t) => {
  const d = await incoming(t, []);
  await refusal(t, d, sourceTls(), 'plaintext-refused', 'tls-not-configured');
});

test.serial('refused: a wrong PSK, and a PSK username the destination does not know (psk-mismatch on both ends)', async (t) => {
  const d = await incoming(t, ['--tls-psk', fx.psk]);
  await refusal(t, d, { psk: fx.pskWrong }, 'psk-mismatch', 'psk-mismatch');
  d.events.length = 0;
  await refusal(t, d, { psk: fx.pskOtherUser, pskUsername: 'mallory' }, 'psk-mismatch', 'psk-mismatch');
});

test.serial('after every kind of refusal the destination still serves: a good source then migrates with digests equal and the destination leaked no fd', async (t) => {
  const d = await incoming(t, destArgs());
  for (const bad of [sourceTls({ creds: fx.sourceOtherCa }), sourceTls({ creds: fx.sourceExpired }), sourceTls({ hostname: 'other.example' }), sourceTls({ creds: fx.sourceIntruder }), undefined])
    t.is((await migrate(t, d.uri, bad)).err?.code, 'ERR_MIGRATION_TLS');
  destinationUntouched(t, d);
  const { info, err } = await migrate(t, d.uri, sourceTls(), 2);
  t.is(err, null, err?.message);
  t.true(info.digests!.every((x) => x.match === true));
  const r = await d.result;
  t.is(r?.status, 'completed');
  t.is(r?.fdsAtEnd, r?.fdsAtStart, 'destination fds');
  // Each refused connection reported (an extra channel the source opened before the refusal reached it, too).
  const reasons = d.events.filter((e) => e.event === 'CONNECTION_REFUSED').map((e) => e.data.reason);
  t.deepEqual([...new Set(reasons)].sort(), ['expired', 'not-authorized', 'peer-refused', 'plaintext-refused', 'unknown-ca']);
});

test.serial('a second TLS source while one migrates over TLS is told ERR_MIGRATION_BUSY; the first completes', async (t) => {
  const d = await incoming(t, destArgs());
  const first = await sourceSide(spec);
  // Slow enough (1 MiB/s) that the second source comes while the first is in precopy.
  const src = new MigrationSource({ handlers: first.handlers, vm: first.vm, parameters: { ...params, 'max-bandwidth': 4 << 20 }, tls: sourceTls() });
  let active!: () => void;
  const isActive = new Promise<void>((r) => (active = r));
  src.on('MIGRATION', (e) => e.status === 'active' && active());
  const running = src.migrate(d.uri, { channels: 2 });
  await isActive;
  const { err } = await migrate(t, d.uri, sourceTls());
  t.is(err?.code, 'ERR_MIGRATION_BUSY', err?.message);
  src.setParameters({ 'max-bandwidth': 0 });
  const info = await running;
  t.is(info.status, 'completed');
  t.true(info.digests!.every((x) => x.match === true));
  await first.close();
  t.is((await d.result)?.status, 'completed');
});

test.serial('channel binding: a third party holding an authorized certificate and the captured migration id cannot attach an extra channel; the migration completes', async (t) => {
  const d = await incoming(t, destArgs());
  // The test knows the migration id in advance (as an eavesdropper on a plaintext stream, or a log reader, would).
  const id = crypto.randomUUID();
  const original = crypto.randomUUID;
  crypto.randomUUID = () => id;
  syncBuiltinESMExports();
  t.teardown(() => {
    crypto.randomUUID = original;
    syncBuiltinESMExports();
  });
  // The third party connects first and claims channel 1, with a made-up binding (and one with none): both parked until the Hello.
  const creds = await Promise.all(['ca-cert.pem', 'client-cert.pem', 'client-key.pem'].map((f) => readFile(path.join(fx.source, f))));
  const intruder = (binding?: string) =>
    new Promise<string>((resolve, reject) => {
      const s = tls.connect({ path: d.uri.slice(5), ca: creds[0], cert: creds[1], key: creds[2], servername: 'dest.example', minVersion: 'TLSv1.3' }, () => {
        s.write(Buffer.concat(encodeFrame(FrameType.ChannelHello, 0, messagePayload(FrameType.ChannelHello, { migrationId: id, index: 1, ...(binding ? { binding } : {}) }))));
      });
      let got = '';
      s.on('data', (b) => (got += b.toString('latin1')));
      s.on('error', reject);
      s.on('close', () => resolve(got));
    });
  const forged = intruder('ab'.repeat(32));
  const bare = intruder();
  // Parked before the real source's Hello: wait until the destination has read both (their TLS is through; a short settle).
  await new Promise((r) => setTimeout(r, 500));
  const { info, err } = await migrate(t, d.uri, sourceTls(), 2);
  t.is(err, null, err?.message);
  t.is(info.status, 'completed');
  t.true(info.digests!.every((x) => x.match === true));
  for (const answer of await Promise.all([forged, bare])) {
    t.regex(answer, /"code":"ERR_MIGRATION_TLS"/);
    t.regex(answer, /"reason":"channel-binding"/);
  }
  t.is(d.events.filter(refused('channel-binding')).length, 2);
  t.is((await d.result)?.status, 'completed');
});

test.serial('a TLS destination serves strangers safely: an idle connection and a stalled TLS handshake are closed at the handshake deadline and leave nothing pending; a good source then migrates', async (t) => {
  const dstSide = await sourceSide(spec);
  dstSide.vm.running = false;
  const dest = new MigrationDestination({ handlers: dstSide.handlers, vm: dstSide.vm, handshakeTimeoutMs: 500, tls: { creds: fx.dest, authz: [fx.sourceDn] } });
  const refusals: { code: string; reason?: string }[] = [];
  dest.on('CONNECTION_REFUSED', (e) => refusals.push(e));
  const uri = await dest.listen('tcp:127.0.0.1:0');
  t.teardown(async () => {
    await dest.close();
    await dstSide.close();
  });
  const { port } = parseUri(uri) as { port: number };
  const idle = net.connect({ host: '127.0.0.1', port });
  // The first bytes of a ClientHello, then nothing.
  const stalled = net.connect({ host: '127.0.0.1', port }, () => stalled.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])));
  const closed = (s: net.Socket) => new Promise<void>((r) => (s.on('error', () => {}), s.once('close', () => r())));
  await Promise.all([closed(idle), closed(stalled)]);
  await new Promise((r) => setTimeout(r, 50));
  t.is(dest.pendingConnections, 0);
  t.deepEqual(refusals.map((r) => `${r.code} ${r.reason}`), ['ERR_MIGRATION_TLS handshake', 'ERR_MIGRATION_TLS handshake']);
  const incoming = dest.incoming();
  const { info, err } = await migrate(t, uri, { creds: fx.source });
  t.is(err, null, err?.message);
  t.true(info.digests!.every((x) => x.match === true));
  t.is((await incoming).status, 'completed');
});

test.serial("without the accepted socket's fd (slab reads unavailable), TLS takes Node's stream path: a migration completes with digests equal and an intruder is still refused", async (t) => {
  const original = native.dupSocketFd;
  let asked = 0;
  (native as { dupSocketFd: (fd: number) => number }).dupSocketFd = () => {
    asked++;
    throw Object.assign(new Error('unavailable in this test'), { code: 'ENOTSUP' });
  };
  t.teardown(() => {
    (native as { dupSocketFd: (fd: number) => number }).dupSocketFd = original;
  });
  const dstSide = await sourceSide(spec);
  dstSide.vm.running = false;
  const dest = new MigrationDestination({ handlers: dstSide.handlers, vm: dstSide.vm, tls: { creds: fx.dest, authz: [fx.sourceDn] } });
  const refusals: { reason?: string }[] = [];
  dest.on('CONNECTION_REFUSED', (e) => refusals.push(e));
  const uri = await dest.listen(`unix:/tmp/vfio-mig-tls-${process.pid}-${++sockets}.sock`);
  t.teardown(async () => {
    await dest.close();
    await dstSide.close();
  });
  const { err: refused } = await migrate(t, uri, sourceTls({ creds: fx.sourceIntruder }));
  t.is((refused as MigrationTlsError | null)?.reason, 'not-authorized', refused?.message);
  const incoming = dest.incoming();
  const { info, err } = await migrate(t, uri, sourceTls(), 3);
  t.is(err, null, err?.message);
  t.true(info.digests!.every((x) => x.match === true));
  t.is((await incoming).status, 'completed');
  t.true(refusals.some((r) => r.reason === 'not-authorized'));
  t.true(asked >= 5, `every connection tried the slab path first (${asked})`);
});

test('authz patterns: globs over the DN and SANs', (t) => {
  t.true(globMatch('CN=*.example,O=Example', 'CN=source.example,O=Example'));
  t.false(globMatch('CN=*.example,O=Example', 'CN=source.example,O=Example,C=GB'));
  t.true(globMatch('DNS:src?.example', 'DNS:src1.example'));
  t.false(globMatch('DNS:src?.example', 'DNS:src12.example'));
  t.true(globMatch('a.b(c)+[d]', 'a.b(c)+[d]'), 'regex characters are literal');
  t.false(globMatch('a.b', 'axb'));
});

test('PSK keys files: username:hexkey lines; malformed, short and duplicate keys are typed config errors', (t) => {
  const keys = parsePskKeys(`# c\nqemu:${'00'.repeat(16)}\n\nother:${'ff'.repeat(32)}\n`, 'f');
  t.deepEqual([...keys.keys()], ['qemu', 'other']);
  for (const bad of ['qemu', `qemu:${'0'.repeat(31)}`, 'qemu:0011', `qemu:${'zz'.repeat(16)}`, `a:${'00'.repeat(16)}\na:${'11'.repeat(16)}`, '']) {
    const err = t.throws(() => parsePskKeys(bad, 'f'), { instanceOf: MigrationTlsError });
    t.is(err?.reason, 'config');
  }
});

test('bad TLS options and credentials are typed errors before anything connects', async (t) => {
  const side = await sourceSide({ mock: [['nic-vf', 1]] });
  t.teardown(() => side.close());
  const make = (tlsOptions: unknown) => new MigrationSource({ handlers: side.handlers, vm: side.vm, tls: tlsOptions as TlsOptions });
  for (const bad of [{}, { creds: fx.source, psk: fx.psk }, { creds: fx.source, authz: ['x'] }, { creds: '' }, { creds: fx.source, bogus: 1 }, 'x']) {
    const err = t.throws(() => make(bad), { instanceOf: MigrationTlsError }, JSON.stringify(bad));
    t.is(err?.reason, 'config');
  }
  // A directory without the source's files; x509 over unix: without a hostname.
  for (const [opts, uri] of [[{ creds: fx.dest, hostname: 'dest.example' }, 'tcp:127.0.0.1:1'], [{ creds: fx.source }, 'unix:/tmp/nowhere.sock']] as const) {
    const err = await t.throwsAsync(make(opts).migrate(uri), { instanceOf: MigrationTlsError });
    t.is(err?.reason, 'config', err?.message);
    t.true(side.vm.running);
  }
  const dest = new MigrationDestination({ handlers: side.handlers, vm: side.vm, tls: { psk: '/nonexistent/keys.psk' } });
  const err = await t.throwsAsync(dest.listen('tcp:127.0.0.1:0'), { instanceOf: MigrationTlsError });
  t.is(err?.reason, 'config');
});

test.serial('CLI: a bad --tls-* value is a usage error (exit 2) before any device opens', async (t) => {
  const runCli = (args: string[]) =>
    new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const p = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      p.stderr!.on('data', (d) => (stderr += d));
      p.on('close', (code) => resolve({ code, stderr }));
    });
  const cases: [string[], RegExp][] = [
    [['incoming', '--listen', 'tcp:127.0.0.1:0', '--mock', 'nic-vf', '--tls-creds', '/nonexistent'], /ERR_MIGRATION_TLS: --tls-creds: cannot read/],
    [['incoming', '--listen', 'tcp:127.0.0.1:0', '--mock', 'nic-vf', '--tls-authz', 'x'], /ERR_USAGE: --tls-authz needs --tls-creds or --tls-psk/],
    [['migrate', '--to', 'tcp:127.0.0.1:1', '--mock', 'nic-vf', '--tls-creds', fx.source, '--tls-psk', fx.psk], /exclude each other/],
    [['migrate', '--to', 'tcp:127.0.0.1:1', '--mock', 'nic-vf', '--tls-creds', fx.source, '--tls-authz', 'x'], /--tls-authz applies to incoming/],
    [['migrate', '--to', 'tcp:127.0.0.1:1', '--mock', 'nic-vf', '--tls-psk', fx.pskOtherUser], /no key for username "qemu"/],
  ];
  for (const [args, re] of cases) {
    const r = await runCli(args);
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.regex(r.stderr, re);
  }
});

// ---- faults over TLS: cancel and SIGKILL of the destination in every phase (as migration.test.ts does in clear) ----

type Phase = FaultPhase;
for (const how of ['cancel', 'kill'] as const) {
  for (const phase of ['setup', 'precopy', 'switchover', 'stop-copy', 'destination-load'] as Phase[]) {
    test.serial(`over TLS: ${how === 'cancel' ? 'cancel' : 'the destination SIGKILLed'} in ${phase}: the source VM runs, devices RUNNING with their state intact, no fds leaked`, async (t) => {
      const nic = { stateBytes: '2MiB', dirtyWorkingSetBytes: '512KiB', arcLatencyMs: { default: 2 }, dirtyBytesPerSec: 0 };
      const pspec = { mock: [['nic-vf', 3]] as [string, number][], overrides: nic, ram: { sizeBytes: 16 << 20, dirtyBytesPerSec: 64 << 20, workingSetBytes: 8 << 20 } };
      const fdsBefore = openFdCount();
      // Destination resuming -> stop takes 400 ms, so the destination-load phase is wide enough to hit.
      const dest = await incoming(t, ['--tls-creds', fx.dest, '--tls-authz', fx.sourceDn], undefined, deviceArgs({ ...pspec, overrides: { ...nic, arcLatencyMs: { default: 2, 'resuming>stop': 400 } } }));
      const side = await sourceSide(pspec);
      const digestsBefore = side.devices.map((d) => d.mockInfo().digest);
      const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: { 'x-assumed-p2p-arc-ms': 5, 'downtime-limit': 2000 }, tls: sourceTls() });
      const fired = onPhase(src, phase, () => (how === 'cancel' ? src.cancel(`test cancel in ${phase}`) : dest.proc.kill('SIGKILL')));
      const err = await t.throwsAsync(src.migrate(dest.uri, { channels: 2 }));
      t.true(fired(), 'the phase was reached');
      await assertRolledBack(t, { src, err, side, digestsBefore, fdsBefore, cancelled: how === 'cancel', destKilled: how === 'kill', dest });
    });
  }
}

// ---- more faults over TLS: the destination serves the next TLS source after a cancel or a killed source; a silent partition ----

const faultSpec = { mock: [['nic-vf', 1]] as [string, number][], overrides: { stateBytes: '32MiB', dirtyWorkingSetBytes: '24MiB', dirtyBytesPerSec: '256MiB', arcLatencyMs: { default: 2 } } };
let port = 4600 + (process.pid % 200);

async function tlsDestinationPeer(t: { teardown(fn: () => void): void }, options: { netns?: string; host?: string } = {}): Promise<{ peer: PeerProcess; uri: string }> {
  const listen = options.host ? `tcp:${options.host}:${++port}` : `unix:/tmp/vfio-mig-tls-peer-${process.pid}-${++port}.sock`;
  const peer = startPeer(['destination', '--listen', listen, '--spec', JSON.stringify(faultSpec), '--options', JSON.stringify({ handshakeTimeoutMs: 3000, tls: { creds: fx.dest, authz: [fx.sourceDn] } })], { netns: options.netns });
  t.teardown(() => {
    peer.proc.kill('SIGCONT');
    peer.proc.kill('SIGKILL');
  });
  const l = await peer.waitFor((o) => !!o.listening);
  return { peer, uri: l.listening as string };
}

async function tlsSource(parameters: Partial<MigrationParameters>, capabilities: Record<string, boolean> = {}) {
  const side = await sourceSide(faultSpec);
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters, capabilities, tls: sourceTls() });
  return { side, src };
}

async function migratesAgainOverTls(t: { is(a: unknown, b: unknown, m?: string): void }, uri: string) {
  const { side, src } = await tlsSource({ 'downtime-limit': 2000 });
  const info = await src.migrate(uri);
  t.is(info.status, 'completed', 'the destination served the next migration over TLS');
  t.is(info.digests?.every((d) => d.match === true), true, 'digests match');
  await side.close();
}

for (const phase of ['precopy', 'switchover'] as const) {
  test.serial(`over TLS: a cancel in ${phase} leaves the VM running on the source; the destination resets and serves the next TLS source`, async (t) => {
    const { peer, uri } = await tlsDestinationPeer(t);
    const { side, src } = await tlsSource({ 'downtime-limit': phase === 'precopy' ? 1 : 2000 });
    if (phase === 'precopy') src.once('MIGRATION_PASS', () => src.cancel('test cancel in precopy'));
    else src.on('MIGRATION', (e) => e.status === 'device' && src.cancel('test cancel at switchover'));
    const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
    t.is(err?.code, 'ERR_MIGRATION_CANCELLED', err?.message);
    t.true(side.vm.running);
    for (const d of side.devices) t.is(await d.getState(), 'running');
    await side.close();
    const r = (await peer.waitFor((o) => !!o.result, 15_000)).result as IncomingResult & { deviceStates: string[]; vmRunning: boolean };
    t.not(r.status, 'completed');
    t.false(r.vmRunning);
    t.deepEqual(r.deviceStates, ['running']);
    await migratesAgainOverTls(t, uri);
  });
}

test.serial('over TLS: the source SIGKILLed in precopy: the destination resets its devices and serves the next TLS source', async (t) => {
  const { peer, uri } = await tlsDestinationPeer(t);
  const source = startPeer(['source', '--to', uri, '--spec', JSON.stringify(faultSpec), '--source', JSON.stringify({ parameters: { 'downtime-limit': 1 }, tls: sourceTls() })]);
  t.teardown(() => source.proc.kill('SIGKILL'));
  await source.waitFor((o) => o.event === 'MIGRATION_PASS');
  source.proc.kill('SIGKILL');
  const r = (await peer.waitFor((o) => !!o.result, 15_000)).result as IncomingResult & { deviceStates: string[]; vmRunning: boolean };
  t.is(r.status, 'failed');
  t.false(r.vmRunning);
  t.deepEqual(r.deviceStates, ['running']);
  await migratesAgainOverTls(t, uri);
});

test.serial('over TLS: a silent partition (veth down) in the switchover: the source gives up within peer-timeout before the commit and resumes the VM', async (t) => {
  const ns = createNetns();
  t.teardown(() => ns.destroy());
  const { uri } = await tlsDestinationPeer(t, { netns: ns.name, host: ns.nsIp });
  const peerTimeoutMs = 1500;
  const { side, src } = await tlsSource({ 'downtime-limit': 2000, 'peer-timeout': peerTimeoutMs });
  let cutAt = 0;
  let committed = false;
  src.on('MIGRATION', (d) => {
    if (d.status !== 'device') return;
    ns.cut();
    cutAt = performance.now();
  });
  src.on('MIGRATION_COMMITTED', () => (committed = true));
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  t.is(err?.code, 'ERR_MIGRATION_PEER_TIMEOUT', err?.message);
  t.false(committed);
  t.true(side.vm.running);
  t.true(performance.now() - cutAt <= peerTimeoutMs + 1000);
  for (const d of side.devices) t.is(await d.getState(), 'running');
  await side.close();
});
