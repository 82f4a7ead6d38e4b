// Nothing a caller does through the addon may abort or hang the process:
// the reproductions of issue 11, each in the form that crashed or hung before.
// Calls that used to abort run in a child process, so a regression fails the
// test instead of killing the test runner.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { VfioError } from '../src/vfio/errors.js';
import { PROFILE_LIMITS, loadProfile, toNativeProfile, validateProfile } from '../src/vfio/mock-profile.js';
import { native, type NativeDeviceHandle } from '../src/vfio/native.js';
import { mockNative } from '../src/vfio/mock-native.js';
import { stateToKernel } from '../src/vfio/states.js';
import { openFdCount } from './helpers.js';
import { openMockDevice } from '../src/vfio/mock.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = (p: string) => pathToFileURL(path.resolve(here, '..', p)).href;
const scratch = mkdtempSync(path.join(tmpdir(), 'addon-hardening-'));
let scripts = 0;

/** Runs an ES module snippet in a child node (same addon, same env); `NATIVE`, `MOCKADDON`, `MOCKDEVICE`, `DEVICE`, `PROFILE` are import URLs. */
function child(code: string, opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; shell?: string } = {}): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }> {
  const file = path.join(scratch, `child-${++scripts}.mjs`);
  writeFileSync(file, code.replaceAll('MOCKADDON', dist('src/vfio/mock-native.js')).replaceAll('NATIVE', dist('src/vfio/native.js')).replaceAll('MOCKDEVICE', dist('src/vfio/mock.js')).replaceAll('DEVICE', dist('src/vfio/device.js')).replaceAll('PROFILE', dist('src/vfio/mock-profile.js')));
  const [cmd, args] = opts.shell ? ['bash', ['-c', `${opts.shell}; exec "${process.execPath}" "${file}"`]] : [process.execPath, [file]];
  return new Promise((resolve) => {
    execFile(cmd, args as string[], { timeout: opts.timeoutMs ?? 60_000, env: { ...process.env, ...opts.env } }, (err, stdout, stderr) => {
      const e = err as (NodeJS.ErrnoException & { code?: number | string; signal?: string }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, signal: e?.signal ?? null, stdout, stderr });
    });
  });
}

/** The raw binding's open of a validated profile (overrides applied first). */
async function rawMock(overrides: Record<string, unknown> = {}, profile = 'minimal'): Promise<NativeDeviceHandle> {
  const h = new native.NativeDevice();
  await h.openBackend(new (mockNative().MockHandle)(toNativeProfile(await loadProfile(profile, overrides)), 1n));
  return h;
}

async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (err) {
    return String((err as { code?: unknown }).code);
  }
  return 'resolved';
}

/** Settles within `ms` or reports that it hung. */
async function settlesWithin<T>(p: Promise<T>, ms: number): Promise<'settled' | 'hung'> {
  return Promise.race([p.then(() => 'settled' as const, () => 'settled' as const), sleep(ms).then(() => 'hung' as const)]);
}

test('a DMA report whose bitmap would not fit is a typed error, not std::bad_alloc on a worker (SIGABRT)', async (t) => {
  const r = await child(`
    import { openMockDevice } from 'MOCKDEVICE';
    const dev = await openMockDevice({ profile: 'minimal', overrides: { dmaLogging: true } });
    await dev.dmaLoggingStart(4096, [{ iova: 0, length: 1 << 20 }]);
    const out = [];
    for (const [iova, length, page] of [[0n, 2n ** 62n, 4096], [0n, 2n ** 64n - 1n, 4096], [0n, 2n ** 64n - 1n, 1]]) {
      try { await dev.dmaLoggingReport(iova, length, page); out.push('resolved'); } catch (e) { out.push(e.code); }
    }
    const ok = await dev.dmaLoggingReport(0, 1 << 20, 4096);
    out.push(ok.length);
    await dev.close();
    console.log(JSON.stringify(out));
  `);
  t.is(r.code, 0, r.stderr);
  t.deepEqual(JSON.parse(r.stdout), ['ERR_VFIO_BAD_ARGUMENT', 'ERR_VFIO_BAD_ARGUMENT', 'ERR_VFIO_BAD_ARGUMENT', 32]);
});

test('the raw binding refuses a profile the addon cannot run (chunkBytes -1 aborted on the first read)', async (t) => {
  const r = await child(`
    import { native } from 'NATIVE';
    import { mockNative } from 'MOCKADDON';
    import { loadProfile, toNativeProfile } from 'PROFILE';
    const { MockHandle } = mockNative();
    const good = toNativeProfile(await loadProfile('minimal'));
    const out = [];
    for (const bad of [{ chunkBytes: -1 }, { chunkBytes: 0 }, { chunkBytes: 1e30 }, { chunkBytes: NaN }, { chunkBytes: 100 },
                       { stateBytes: 2 ** 53 }, { stateBytes: -4096 }, { defaultArcLatencyMs: 1e9 }, { defaultArcLatencyMs: Infinity },
                       { loadMsPerMiB: 1e12 }, { maxBytesPerSec: 1 }, { corruptSaveAtByte: 1e300 }, { flags: 1.5 },
                       { faults: [{ from: 9, to: 1, errno: 5, intoError: false, times: -1 }] }, { arcLatencies: [{ from: 1, to: 2, ms: -1 }] }]) {
      const h = new native.NativeDevice();
      try { await h.openBackend(new MockHandle({ ...good, ...bad }, 1n)); out.push('opened'); } catch (e) { out.push(e.code); }
      await h.close();
    }
    const h = new native.NativeDevice();
    await h.openBackend(new MockHandle(good, 1n));
    await h.setState(2 /* stop */);
    const s = await h.setState(3 /* stop-copy */);
    const r = await h.readData(s.id, 1 << 20);
    out.push(r.bytes.length > 0);
    await h.close();
    console.log(JSON.stringify(out));
  `);
  t.is(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as unknown[];
  t.is(out[0], 'ERR_VFIO_PROFILE', 'chunkBytes -1');
  t.true(out.slice(0, -1).every((c) => c === 'ERR_VFIO_PROFILE' || c === 'ERR_VFIO_BAD_ARGUMENT'), String(out));
  t.is(out.at(-1), true, 'a valid profile still reads');
});

test('profile limits: 64 GiB in 64-byte chunks is refused with a clear error; the largest valid profile opens in bounded memory off the event loop', async (t) => {
  const huge = { name: 'huge', flags: ['stop-copy'], stateBytes: '64GiB', chunkBytes: 64 };
  const err = t.throws(() => validateProfile(huge), { instanceOf: VfioError });
  t.is(err?.code, 'ERR_VFIO_PROFILE');
  t.regex(err!.message, /at most 4194304 chunks \(use a larger chunkBytes\)/);
  t.is(PROFILE_LIMITS.maxChunks, 2 ** 22);
  for (const [field, value, re] of [
    ['arcLatencyMs', { default: 1e9 }, /arcLatencyMs\["default"\] must be at most 60000/],
    ['arcLatencyMs', { 'running>stop': 60_001 }, /must be at most 60000/],
    ['loadInitialMs', 1e9, /loadInitialMs must be at most 60000/],
    ['loadMsPerMiB', 5000, /loadMsPerMiB must be at most 1000/],
    ['maxBytesPerSec', 1, /maxBytesPerSec must be 0 \(no cap\) or at least 65536/],
    ['setupBytes', '1TiB', /setupBytes must be at most/],
  ] as const) t.throws(() => validateProfile({ name: 'x', flags: ['stop-copy'], stateBytes: 4096, [field]: value }), { code: 'ERR_VFIO_PROFILE', message: re } as never, field);

  // The largest valid one: 2^22 chunks of 16 KiB. Built on the control thread:
  // an immediate queued right after the call runs before the open completes.
  const largest = { ...huge, flags: ['stop-copy' as const], name: 'largest', chunkBytes: '16KiB' };
  const rssBefore = process.memoryUsage().rss;
  const order: string[] = [];
  const opening = openMockDevice({ profile: largest }).then((d) => (order.push('opened'), d));
  setImmediate(() => order.push('immediate'));
  const dev = await opening;
  t.deepEqual(order, ['immediate', 'opened'], 'the event loop turned while the mock was built');
  t.true(process.memoryUsage().rss - rssBefore < 256 * 2 ** 20, `rss grew ${(process.memoryUsage().rss - rssBefore) / 2 ** 20} MiB`);
  t.is(await dev.getState(), 'running');
  await dev.close();
});

test('an allocation failure on a worker is ERR_VFIO_NOMEM (under a memory limit it aborted)', async (t) => {
  // A 127 MiB bitmap (within the addon's 128 MiB cap) under an address-space
  // limit 64 MiB above what the warmed-up process uses. (Not in the sanitizer
  // run: ASan's operator new reports a failed allocation instead of throwing.)
  const r = await child(`
    import { execFileSync } from 'node:child_process';
    import { readFileSync } from 'node:fs';
    import { openMockDevice } from 'MOCKDEVICE';
    const dev = await openMockDevice({ profile: 'minimal', overrides: { dmaLogging: true } });
    await dev.dmaLoggingStart(4096, [{ iova: 0, length: 1 << 20 }]);
    await dev.dmaLoggingReport(0n, 1n << 20n, 4096);
    const vm = Number(/VmSize:\\s+(\\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;
    execFileSync('prlimit', ['--pid=' + process.pid, '--as=' + (vm + 64 * 2 ** 20)]);
    const out = [];
    try { await dev.dmaLoggingReport(0n, 127n * 8n * 4096n * 2n ** 20n, 4096); out.push('resolved'); } catch (e) { out.push(e.code, e.errno); }
    out.push(await dev.getState());
    await dev.close();
    console.log(JSON.stringify(out));
  `);
  t.is(r.code, 0, r.stderr);
  t.deepEqual(JSON.parse(r.stdout), ['ERR_VFIO_NOMEM', 12, 'running']);
});

test('every numeric argument is checked before any conversion: typed errors for NaN, negatives, fractions, huge values', async (t) => {
  const h = await rawMock({ dmaLogging: true });
  const bad = [NaN, -1, 1.5, Infinity, 1e300, 2 ** 64, -0.5];
  for (const v of bad) {
    t.is(await codeOf(() => h.setState(v)), 'ERR_VFIO_BAD_ARGUMENT', `setState(${v})`);
    t.is(await codeOf(() => h.readData(v, 10)), 'ERR_VFIO_BAD_ARGUMENT', `readData(${v})`);
    t.is(await codeOf(() => h.dmaLoggingReport(v, 4096, 4096)), 'ERR_VFIO_BAD_ARGUMENT', `dmaLoggingReport(${v})`);
    t.is(await codeOf(() => h.dmaLoggingStart(v, [{ iova: 0, length: 4096 }])), 'ERR_VFIO_BAD_ARGUMENT', `dmaLoggingStart(${v})`);
    t.is(await codeOf(() => h.closeSession(v)), 'ERR_VFIO_BAD_ARGUMENT', `closeSession(${v})`);
    t.is(await codeOf(() => native.nextState(v, 1, 7)), 'ERR_VFIO_BAD_ARGUMENT', `nextState(${v})`);
  }
  t.is(await codeOf(() => h.dmaLoggingReport(-1n, 4096n, 4096n)), 'ERR_VFIO_BAD_ARGUMENT');
  t.is(await codeOf(() => h.dmaLoggingReport(2n ** 64n, 4096n, 4096n)), 'ERR_VFIO_BAD_ARGUMENT');
  t.is(await codeOf(() => h.dmaLoggingStart(4096, [null as never])), 'ERR_VFIO_BAD_ARGUMENT');
  t.is(await codeOf(() => h.setState('2' as never)), 'ERR_VFIO_BAD_ARGUMENT');
  await h.setState(stateToKernel('stop'));
  const s = (await h.setState(stateToKernel('stop-copy')))!;
  for (const v of [NaN, 0, -1, 1.5, Infinity]) t.is(await codeOf(() => h.readData(s.id, v)), 'ERR_VFIO_BAD_ARGUMENT', `maxBytes ${v}`);
  t.is((await h.readData(s.id, 2 ** 40))!.bytes.length > 0, true, 'a huge maxBytes reads at most 16 MiB');
  t.is(await codeOf(() => h.dmaLoggingReport(0, 4096, 0)), 'EINVAL', 'page size 0 is the kernel\'s EINVAL');
  await h.close();
});

// Loaded on the main thread first, or only in the workers (then Node unloads
// both addons when the last worker exits, while their detached data threads
// still finish the jobs in flight: a segfault before each addon pinned itself).
for (const mainLoadsFirst of [true, false])
test(`after a worker_thread that loaded the addon exits, devices on the main thread still close (a process-global teardown flag hung close()); ${mainLoadsFirst ? 'main thread loaded the addons first' : 'only the workers loaded them, with jobs in flight'}`, async (t) => {
  const r = await child(`
    import { Worker } from 'node:worker_threads';
    ${mainLoadsFirst ? "await (await (await import('MOCKDEVICE')).openMockDevice({ profile: 'serial' })).close();" : ''}
    const body = \`(async () => {
      const { openMockDevice } = await import('MOCKDEVICE');
      const dev = await openMockDevice({ profile: 'serial', overrides: { arcLatencyMs: { default: 200 } } });
      const keep = await openMockDevice({ profile: 'nic-vf', overrides: { stateBytes: '1MiB', dirtyWorkingSetBytes: '256KiB' } });
      await keep.setState('stop');
      const resume = await keep.setState('resuming');
      void resume.write(Buffer.alloc(1 << 20)).catch(() => {});   // in flight, holding Buffer references
      void dev.setState('stop').catch(() => {});                  // in flight, sleeping 200 ms
      if (process.env.CLOSE_FIRST) await dev.close();
      process.exit(0);
    })();\`;
    for (const closeFirst of ['', '1', '']) {
      await new Promise((resolve, reject) => {
        const w = new Worker(body, { eval: true, env: { ...process.env, CLOSE_FIRST: closeFirst } });
        w.on('error', reject);
        w.on('exit', resolve);
      });
    }
    const { openMockDevice } = await import('MOCKDEVICE');
    const dev = await openMockDevice({ profile: 'serial' });
    await dev.setState('stop');
    const closed = await Promise.race([dev.close().then(() => 'closed'), new Promise((r) => setTimeout(() => r('hung'), 10000))]);
    console.log(closed);
    process.exit(0);
  `);
  t.is(r.code, 0, `exit ${r.code} signal ${(r as { signal?: string }).signal ?? ''}: ${r.stderr}`);
  t.is(r.stdout.trim(), 'closed');
});

test('one owner for every data fd: close() racing an in-flight SET, ended sessions, and no raw fd numbers from JS', async (t) => {
  const fdsBefore = openFdCount();
  // close() while the SET that opens a data fd is still running: the new fd is closed too.
  for (let i = 0; i < 10; i++) {
    const h = await rawMock({ arcLatencyMs: { default: 5 } });
    await h.setState(stateToKernel('stop'));
    const set = h.setState(stateToKernel('stop-copy'));
    const closing = h.close();
    const outcome = await codeOf(set);
    t.true(outcome === 'resolved' || outcome === 'ERR_VFIO_CLOSED', outcome);
    await closing;
    t.deepEqual(h.openDataFds(), [], 'no data fd listed open after close()');
  }
  // Ended sessions give their fd back at once: 200 stop-copy/running cycles leave no fd behind.
  const dev = await openMockDevice({ profile: 'serial' });
  const inCycle = openFdCount();
  for (let i = 0; i < 200; i++) {
    const s = (await dev.stepTo('stop-copy'))!;
    t.is(dev.openDataFds().length, 1);
    await dev.stepTo('running');
    t.false(s.valid);
    t.is((await t.throwsAsync(s.read(10), { instanceOf: VfioError }))?.code, 'ENODEV', 'an ended session answers as a stale kernel fd');
  }
  await sleep(20); // the last close runs on the data thread
  t.deepEqual(dev.openDataFds(), []);
  t.true(openFdCount() <= inCycle, `fds: ${inCycle} -> ${openFdCount()}`);
  // A closed session is ERR_VFIO_CLOSED; an fd number is not a session.
  const s = (await dev.stepTo('stop-copy'))!;
  await s.close();
  t.is((await t.throwsAsync(s.read(10), { instanceOf: VfioError }))?.code, 'ERR_VFIO_CLOSED');
  t.is((await t.throwsAsync(dev.precopyInfo(s), { instanceOf: VfioError }))?.code, 'ERR_VFIO_CLOSED');
  await dev.close();
  t.is((await t.throwsAsync(s.read(1), { instanceOf: VfioError }))?.code, 'ERR_VFIO_CLOSED');

  const h = await rawMock();
  await h.setState(stateToKernel('stop'));
  const ref = (await h.setState(stateToKernel('stop-copy')))!;
  t.true(ref.id >= 1 && ref.fd >= 0);
  const other = openFdCount() + 100;
  for (const fd of [0, 1, 2, ref.fd, other]) {
    if (fd === ref.id) continue;
    t.is(await codeOf(() => h.readData(fd, 10)), 'ERR_VFIO_BAD_ARGUMENT', `readData(${fd}) is not a session`);
    t.is(await codeOf(() => h.writeData(fd, Buffer.alloc(1))), 'ERR_VFIO_BAD_ARGUMENT', `writeData(${fd})`);
  }
  await h.closeSession(ref.id);
  t.is(await codeOf(() => h.readData(ref.id, 10)), 'ERR_VFIO_CLOSED');
  await h.close();
  t.is(await codeOf(() => h.getState()), 'ERR_VFIO_CLOSED');
  await sleep(20);
  t.true(openFdCount() <= fdsBefore, `fds: ${fdsBefore} -> ${openFdCount()}`);
});

test('close() interrupts a device sleeping through the longest valid arc latency; stepTo then rejects with ERR_VFIO_CLOSED', async (t) => {
  const dev = await openMockDevice({ profile: 'serial', overrides: { arcLatencyMs: { default: 60_000 } } });
  const step = dev.stepTo('stop');
  await sleep(50);
  t.is(await settlesWithin(dev.close(), 10_000), 'settled', 'close() waited for the 60 s arc');
  t.is(await codeOf(step), 'ERR_VFIO_CLOSED');
  // And through the slowest valid rate cap on the data thread (4 MiB at 64 KiB/s: 64 s).
  const slow = await openMockDevice({ profile: 'nic-vf', overrides: { stateBytes: '8MiB', dirtyWorkingSetBytes: '1MiB', maxBytesPerSec: 65536 } });
  await slow.setState('stop');
  const save = (await slow.setState('stop-copy'))!;
  const read = save.read(4 << 20);
  await sleep(50);
  t.is(await settlesWithin(slow.close(), 10_000), 'settled');
  t.is(await settlesWithin(read, 1000), 'settled');
});

test('openBackend takes only a carrier the mock addon made, once: look-alikes, a tampered factory and a second open are typed errors', async (t) => {
  const { MockHandle } = mockNative();
  const profile = toNativeProfile(await loadProfile('minimal'));
  const fresh = () => new native.NativeDevice();
  // Look-alikes: no type tag, so never read as a factory.
  for (const fake of [undefined, null, 42, {}, { factory: {} }, Object.create(new MockHandle(profile, 1n))]) {
    const h = fresh();
    t.is(await codeOf(() => h.openBackend(fake as never)), 'ERR_VFIO_BAD_ARGUMENT', String(fake));
    await h.close();
  }
  // The factory cannot be swapped for another value (read-only, not configurable).
  const carrier = new MockHandle(profile, 1n);
  const original = carrier.factory;
  t.throws(() => Object.defineProperty(carrier, 'factory', { value: {} }), { instanceOf: TypeError });
  t.is(carrier.factory, original);
  // mockInfo() before the open is a typed error; one device per carrier.
  t.is(await codeOf(() => carrier.info()), 'ERR_VFIO_BAD_ARGUMENT');
  const a = fresh();
  await a.openBackend(carrier);
  t.is(await a.getState(), 2 /* running */);
  const b = fresh();
  t.is(await codeOf(() => b.openBackend(carrier)), 'EBUSY');
  await b.close();
  t.is(typeof carrier.info().digest, 'string');
  await a.close();
  // A bad profile is refused where the carrier is made, before any device exists.
  t.is(await codeOf(() => new MockHandle({ ...profile, chunkBytes: 100 }, 1n)), 'ERR_VFIO_PROFILE');
  t.throws(() => (MockHandle as unknown as (p: unknown, s: bigint) => unknown)(profile, 1n), { instanceOf: TypeError });
});
