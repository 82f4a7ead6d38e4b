// The CLI as a user runs it: real processes, real sockets, exit codes and
// what lands on stdout and stderr.
import test from 'ava';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { CLI } from './harness.js';
import { onJsonLines } from '../src/json-lines.js';
import { PROFILES_DIR } from '../src/vfio/mock-profile.js';

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function collect(p: ChildProcess): Promise<Run> {
  let stdout = '';
  let stderr = '';
  p.stdout!.on('data', (d) => (stdout += d));
  p.stderr!.on('data', (d) => (stderr += d));
  return new Promise((resolve) => p.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })));
}

function run(args: string[]): Promise<Run> {
  return collect(spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }));
}

let sockets = 0;
const socketPath = () => `/tmp/vfio-cli-test-${process.pid}-${++sockets}.sock`;

/** The last `{"result": ...}` line of a --json run. */
function resultOf(r: Run): Record<string, unknown> | null {
  const lines = r.stdout.trim().split('\n').filter((l) => l.startsWith('{"result"'));
  return lines.length ? (JSON.parse(lines.at(-1)!) as { result: Record<string, unknown> }).result : null;
}

/** `incoming` in the background (one-shot unless `once` is false), resolved once it listens. */
async function incoming(args: string[], { once = true } = {}): Promise<{ uri: string; path: string; proc: ChildProcess; done: Promise<Run> }> {
  const file = socketPath();
  const proc = spawn(process.execPath, [CLI, 'incoming', '--listen', `unix:${file}`, '--json', '--arc-history', 'none', ...(once ? ['--once'] : []), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const done = collect(proc);
  await new Promise<void>((resolve, reject) => {
    onJsonLines(proc.stdout!, (o) => {
      if (o.listening) resolve();
    });
    void done.then((r) => reject(new Error(`incoming exited (${r.code}) before listening: ${r.stderr}`)));
  });
  return { uri: `unix:${file}`, path: file, proc, done };
}

for (const args of [['--help'], ['-h'], ['help'], ['migrate', '--help'], ['incoming', '-h']]) {
  test(`CLI: ${args.join(' ')} prints the usage and exits 0`, async (t) => {
    const r = await run(args);
    t.is(r.code, 0, r.stderr);
    t.regex(r.stdout, /^usage:\n {2}vfio-migrate incoming --listen/);
    t.regex(r.stdout, /--on-stall wait\|raise\|cancel/);
    t.regex(r.stdout, /--timeout-ms <ms>/);
    t.is(r.stderr, '');
  });
}

test('CLI: no command prints the usage on stderr and exits 2; an unknown command is a usage error', async (t) => {
  const none = await run([]);
  t.is(none.code, 2);
  t.regex(none.stderr, /^usage:/);
  t.is(none.stdout, '');
  const unknown = await run(['migrat']);
  t.is(unknown.code, 2);
  t.regex(unknown.stderr, /^vfio-migrate: ERR_USAGE: unknown command "migrat"/);
});

// Each bad value: exit 2, one line "vfio-migrate: CODE: message" on stderr
// naming the option, nothing on stdout (no migration was attempted).
const badValues: { args: string[]; code: string; message: RegExp }[] = [
  { args: ['migrate', '--to', 'http://127.0.0.1:1'], code: 'ERR_MIGRATION_BAD_URI', message: /--to: "http:\/\/127\.0\.0\.1:1": expected tcp:host:port or unix:path/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1'], code: 'ERR_MIGRATION_BAD_URI', message: /--to: "tcp:127\.0\.0\.1": expected tcp:host:port/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:99999'], code: 'ERR_MIGRATION_BAD_URI', message: /port of 0-65535/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:0'], code: 'ERR_MIGRATION_BAD_URI', message: /port 0 can be listened on, not connected to/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--channels', '0'], code: 'ERR_USAGE', message: /--channels must be an integer from 1 to 64, got "0"/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--channels', 'abc'], code: 'ERR_USAGE', message: /--channels must be an integer from 1 to 64, got "abc"/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--channels', '2.5'], code: 'ERR_USAGE', message: /--channels must be an integer/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--timeout-ms', 'abc'], code: 'ERR_USAGE', message: /--timeout-ms must be an integer from 1 to 2147483647, got "abc"/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--timeout-ms', '9999999999'], code: 'ERR_USAGE', message: /--timeout-ms must be an integer from 1 to 2147483647/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--progress-ms=0'], code: 'ERR_USAGE', message: /--progress-ms must be an integer/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--on-stall', 'panic'], code: 'ERR_USAGE', message: /--on-stall must be wait, raise or cancel, got "panic"/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--cap', 'warp-drive=on'], code: 'ERR_MIGRATION_BAD_PARAMETER', message: /--cap: unknown capability "warp-drive"/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--param', 'downtime-limit=soon'], code: 'ERR_MIGRATION_BAD_PARAMETER', message: /--param: parameter "downtime-limit" must be a number/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--param', 'downtime-limit'], code: 'ERR_USAGE', message: /--param downtime-limit: expected name=value/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--via', 'magic'], code: 'ERR_USAGE', message: /--via must be auto, cdev or group/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--mock-overrides', '[1]'], code: 'ERR_USAGE', message: /--mock-overrides must be a JSON object/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--ram', 'lots'], code: 'ERR_VFIO_PROFILE', message: /--ram/ },
  { args: ['migrate', '--mock', 'serial'], code: 'ERR_USAGE', message: /migrate needs --to <uri>/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1'], code: 'ERR_USAGE', message: /no devices: give --mock, --device or --ram/ },
  { args: ['incoming', '--listen', 'tcp:127.0.0.1'], code: 'ERR_MIGRATION_BAD_URI', message: /--listen: "tcp:127\.0\.0\.1"/ },
  { args: ['incoming', '--listen', 'unix:/tmp/x.sock', '--seed', 'x'], code: 'ERR_USAGE', message: /--seed must be an integer/ },
  { args: ['migrate', '--to', 'tcp:127.0.0.1:1', '--bogus'], code: 'ERR_USAGE', message: /Unknown option '--bogus'/ },
  { args: ['profiles', 'extra'], code: 'ERR_USAGE', message: /profiles: unexpected argument "extra"/ },
];

for (const { args, code, message } of badValues) {
  test(`CLI: ${args.join(' ')} is a usage error (${code}, exit 2)`, async (t) => {
    // Devices given where the case is not about them, so only the value under test is wrong.
    const withDevices = args.includes('--mock') || args.includes('--ram') || message.source.includes('no devices') ? args : [...args, '--mock', 'serial'];
    const r = await run([...withDevices, '--arc-history', 'none']);
    t.is(r.code, 2, r.stderr);
    const first = r.stderr.split('\n')[0]!;
    t.true(first.startsWith(`vfio-migrate: ${code}: `), first);
    t.regex(first, message);
    t.is(r.stdout, '', 'nothing is attempted, so there is no result');
  });
}

test('CLI: both ends report a failed migration the same way: a result with the error on stdout, "vfio-migrate: CODE: message" on stderr, exit 1', async (t) => {
  // Different devices on the two ends: refused in the handshake, on both sides.
  const dest = await incoming(['--mock', 'nic-vf']);
  const src = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', 'none', '--mock', 'serial']);
  const dst = await dest.done;
  for (const [side, r] of [['source', src], ['destination', dst]] as const) {
    t.is(r.code, 1, `${side}: ${r.stderr}`);
    t.regex(r.stderr, /^vfio-migrate: ERR_MIGRATION_INCOMPATIBLE: .*section 0/m, side);
    const result = resultOf(r);
    t.is((result?.error as { code?: string } | undefined)?.code, 'ERR_MIGRATION_INCOMPATIBLE', side);
    t.is(result?.status, 'failed', side);
  }
  // Without --json the result is the same object, pretty-printed.
  const dest2 = await incoming(['--mock', 'nic-vf']);
  const text = await run(['migrate', '--to', dest2.uri, '--arc-history', 'none', '--mock', 'serial']);
  await dest2.done;
  t.regex(text.stdout, /^result: \{\n/m);
  t.regex(text.stderr, /^vfio-migrate: ERR_MIGRATION_INCOMPATIBLE: /m);
});

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  test(`CLI: ${signal} on an idle incoming removes its unix socket, so the next one can listen on the same path`, async (t) => {
    const first = await incoming(['--mock', 'serial']);
    t.true(existsSync(first.path));
    first.proc.kill(signal);
    const r = await first.done;
    t.is(r.code, signal === 'SIGINT' ? 130 : 143, r.stderr);
    t.false(existsSync(first.path), 'the socket file is gone');
    t.is(resultOf(r)?.status, 'cancelled');
    t.regex(r.stderr, new RegExp(`^vfio-migrate: ERR_MIGRATION_CANCELLED: interrupted by ${signal}`, 'm'));
    // The same path again: listens (no EADDRINUSE), and migrates.
    const file = first.path;
    const proc = spawn(process.execPath, [CLI, 'incoming', '--listen', `unix:${file}`, '--json', '--once', '--arc-history', 'none', '--mock', 'serial'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const done = collect(proc);
    await new Promise<void>((resolve) => onJsonLines(proc.stdout!, (o) => o.listening && resolve()));
    const src = await run(['migrate', '--to', `unix:${file}`, '--json', '--arc-history', 'none', '--on-stall', 'raise', '--mock', 'serial']);
    t.is(src.code, 0, src.stderr);
    t.is((await done).code, 0);
    t.false(existsSync(file));
  });
}

test('CLI: SIGINT during a migration cancels it: the VM runs on the source again, exit 130', async (t) => {
  // A slow device (4 MiB/s of 32 MiB) keeps the migration busy long enough to interrupt.
  const slow = ['--mock', 'nic-vf', '--mock-overrides', '{"maxBytesPerSec":"4MiB"}'];
  const dest = await incoming(slow);
  const proc = spawn(process.execPath, [CLI, 'migrate', '--to', dest.uri, '--json', '--arc-history', 'none', ...slow], { stdio: ['ignore', 'pipe', 'pipe'] });
  const done = collect(proc);
  await new Promise<void>((resolve) =>
    onJsonLines(proc.stdout!, (o) => {
      if (o.event === 'MIGRATION' && (o.data as { status: string }).status === 'active') resolve();
    }),
  );
  proc.kill('SIGINT');
  const r = await done;
  t.is(r.code, 130, r.stderr);
  const result = resultOf(r);
  t.is(result?.status, 'cancelled');
  t.true(result?.vmRunning);
  t.deepEqual((result?.deviceStates as { state: string }[]).map((d) => d.state), ['running']);
  t.regex(r.stderr, /^vfio-migrate: ERR_MIGRATION_CANCELLED: interrupted by SIGINT/m);
  t.not((await dest.done).code, 0);
});

test('CLI: --timeout-ms cancels a migration that has not completed in time', async (t) => {
  const slow = ['--mock', 'nic-vf', '--mock-overrides', '{"maxBytesPerSec":"4MiB"}'];
  const dest = await incoming(slow);
  const r = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', 'none', '--timeout-ms', '300', ...slow]);
  t.is(r.code, 1, r.stderr);
  const result = resultOf(r);
  t.is(result?.status, 'cancelled');
  t.true(result?.vmRunning);
  t.regex(r.stderr, /^vfio-migrate: ERR_MIGRATION_CANCELLED: did not complete within 300 ms \(--timeout-ms\)/m);
  t.not((await dest.done).code, 0);
});

test('CLI: the destination reports a source that cancels as cancelled, with the reason', async (t) => {
  // A downtime-limit of 1 ms cannot be met: the source stalls and (--on-stall
  // cancel) gives up while its link is idle, so its Cancel is what the
  // destination reads. (With data in flight: the next test.)
  const quiet = ['--mock', 'nic-vf', '--mock-overrides', '{"dirtyBytesPerSec":0}']; // nothing left to send once its initial bytes went
  const dest = await incoming(quiet);
  const src = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', 'none', '--param', 'downtime-limit=1', '--param', 'stall-iterations=2', '--on-stall', 'cancel', ...quiet]);
  t.is(resultOf(src)?.status, 'cancelled', src.stderr);
  const r = await dest.done;
  t.is(r.code, 1);
  const result = resultOf(r);
  t.is(result?.status, 'cancelled');
  t.is((result?.error as { code: string }).code, 'ERR_MIGRATION_CANCELLED');
  t.regex(r.stderr, /^vfio-migrate: ERR_MIGRATION_CANCELLED: the source cancelled: stalled/m);
});

for (const channels of [1, 3]) {
  test(`CLI: a source that cancels with data in flight (${channels} channel${channels > 1 ? 's' : ''}, bandwidth-capped) is reported by the destination as cancelled, every round`, async (t) => {
    // 2 x 64 MiB at 16 MiB/s cannot make it in 1.5 s: the cancel comes while
    // frames are on every channel. The source's Cancel goes behind what its
    // main channel has queued, its data channels close at once, and the
    // destination waits for the main channel's word before it blames them.
    const devices = ['--mock', 'nic-vf:2', '--mock-overrides', '{"stateBytes":"64MiB"}'];
    for (let round = 0; round < 3; round++) {
      const dest = await incoming(devices);
      const src = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', 'none', '--channels', String(channels), '--param', `max-bandwidth=${16 << 20}`, '--timeout-ms', '1500', ...devices]);
      t.is(resultOf(src)?.status, 'cancelled', src.stderr);
      t.true((resultOf(src)?.transferredBytes as number) > 1 << 20, 'data was on its way');
      const r = await dest.done;
      const result = resultOf(r);
      t.is(result?.status, 'cancelled', `round ${round}: ${r.stderr}`);
      t.is((result?.error as { code: string } | undefined)?.code, 'ERR_MIGRATION_CANCELLED', `round ${round}: ${r.stderr}`);
      t.regex(r.stderr, /^vfio-migrate: ERR_MIGRATION_CANCELLED: the source cancelled: did not complete within 1500 ms/m, `round ${round}`);
    }
  });
}

test('CLI: incoming keeps listening after failed migrations (refused, cancelled) and exits 0 once one completes; --once gives up after the first', async (t) => {
  const devices = ['--mock', 'serial', '--ram', '64MiB'];
  const dest = await incoming(devices, { once: false });
  // Refused in the handshake: other devices.
  const refused = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', 'none', '--mock', 'nic-vf']);
  t.is(refused.code, 1, refused.stderr);
  // Cancelled mid-transfer: 64 MiB at 4 MiB/s cannot make it in 300 ms.
  const cancelled = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', 'none', '--param', `max-bandwidth=${4 << 20}`, '--timeout-ms', '300', ...devices]);
  t.is(cancelled.code, 1, cancelled.stderr);
  t.is(resultOf(cancelled)?.status, 'cancelled');
  // The same devices take the next migration, and it loads every byte right.
  // (--on-stall raise: converging is not what this test is about.)
  const ok = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', 'none', '--on-stall', 'raise', ...devices]);
  t.is(ok.code, 0, ok.stderr);
  const digests = resultOf(ok)?.digests as { match: boolean | null }[];
  t.is(digests.length, 2);
  t.true(digests.every((d) => d.match === true));
  const r = await dest.done;
  t.is(r.code, 0, r.stderr);
  const results = r.stdout.trim().split('\n').filter((l) => l.startsWith('{"result"')).map((l) => (JSON.parse(l) as { result: { status: string; error?: { code: string } } }).result);
  t.is(results.length, 3, r.stdout);
  t.deepEqual([results[0]!.status, results[0]!.error?.code], ['failed', 'ERR_MIGRATION_INCOMPATIBLE']);
  // The cancel is reported as such when the Cancel frame wins the race with the data channels' reset (see the report).
  t.true(['cancelled', 'failed'].includes(results[1]!.status), results[1]!.status);
  t.deepEqual([results[2]!.status, results[2]!.error], ['completed', undefined]);
  t.regex(r.stderr, /^vfio-migrate: ERR_MIGRATION_INCOMPATIBLE: /m);
  t.false(existsSync(dest.path));

  const once = await incoming(devices);
  await run(['migrate', '--to', once.uri, '--json', '--arc-history', 'none', '--mock', 'nic-vf']);
  const onceRun = await once.done;
  t.is(onceRun.code, 1);
  t.is(resultOf(onceRun)?.status, 'failed');
});

test('CLI: profiles lists every shipped profile, fault profiles included, each with its description', async (t) => {
  const expected: string[] = [];
  for (const f of await readdir(PROFILES_DIR, { recursive: true })) if (f.endsWith('.json')) expected.push(f.slice(0, -5).split(path.sep).join('/'));
  t.true(expected.some((n) => n.startsWith('faults/')), 'the package ships fault profiles');
  const r = await run(['profiles', '--json']);
  t.is(r.code, 0, r.stderr);
  const listed = r.stdout.trim().split('\n').map((l) => (JSON.parse(l) as { profile: { name: string; fault: boolean; description: string } }).profile);
  t.deepEqual(listed.map((p) => p.name).sort(), expected.sort());
  for (const p of listed) {
    t.true(p.description.length > 20, `${p.name} has a description`);
    t.is(p.fault, p.name.startsWith('faults/'));
  }
  const text = await run(['profiles']);
  t.regex(text.stdout, /^faults\/corrupt-save +Fault profile: /m);
  t.regex(text.stdout, /^nic-vf +A NIC virtual function/m);
});

test('CLI: the arc history file keeps the learned control cost beside the arcs; the next migration counts it, and junk in its place is ignored', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'vfio-cli-history-'));
  const file = path.join(dir, 'arc-history.json');
  const KEY = '@switchover-control-ms';
  const migrateOnce = async () => {
    const dest = await incoming(['--mock', 'serial']);
    const src = await run(['migrate', '--to', dest.uri, '--json', '--arc-history', file, '--mock', 'serial']);
    await dest.done;
    t.is(src.code, 0, src.stderr);
    const passes = src.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { event?: string; data?: { expectedDowntime?: { overheadMs: number; overheadBasis: string } } })
      .filter((o) => o.event === 'MIGRATION_PASS')
      .map((o) => o.data!.expectedDowntime!);
    t.true(passes.length > 0);
    return passes[0]!;
  };
  const saved = async () => JSON.parse(await readFile(file, 'utf8')) as Record<string, Record<string, unknown>>;
  t.is((await migrateOnce()).overheadBasis, 'assumed', 'a first contact assumes it');
  const history = await saved();
  const entries = Object.entries(history[KEY] ?? {});
  t.is(entries.length, 1, JSON.stringify(history));
  const [deviceSet, ms] = entries[0]!;
  t.true(typeof ms === 'number' && ms >= 0 && ms < 10_000, String(ms));
  t.true(Object.keys(history).some((k) => k !== KEY), 'the arcs are saved beside it');
  const again = await migrateOnce();
  t.is(again.overheadBasis, 'learned');
  t.is(again.overheadMs, ms as number);
  // Junk in its place (a hand-edited or corrupt file) teaches nothing.
  for (const junk of ['soon', -4, 1e15]) {
    await writeFile(file, JSON.stringify({ ...history, [KEY]: { [deviceSet]: junk } }));
    t.is((await migrateOnce()).overheadBasis, 'assumed', String(junk));
  }
  await rm(dir, { recursive: true, force: true });
});
