// Kernel-lab entry: proves the addon on the real kernel VFIO migration driver
// (samples/vfio-mdev/mtty.c). Runs in the qemu guest as `node /lab/lab.mjs`
// (started by /init, payload from run.sh --repo-payload) with two mtty
// instances described in KLAB_MDEVS, and prints ONE JSON result line:
//   { ok, entry: "lab", kernel, checks: [{ name, ok, detail, ms }], passed,
//     failed, trace: { kernel, mdevType, ports, trace }, traceDiff, ... }
// `ok` is true only if every check passed. The checks:
//   - the conformance suite through both open paths (cdev + iommufd, and
//     group + container), one lab check per conformance check;
//   - the other ways to name a device (auto by UUID, sysfs path);
//   - a save on one instance restored on the other through the addon's data
//     streams (Readable piped into Writable), checked byte for byte, and a
//     corrupted stream rejected with the driver's error;
//   - the error paths: blocked arc, precopy info outside PRE_COPY, truncated
//     resume, oversize resume write, with the device state after each;
//   - the behaviour trace (src/vfio/behaviour-trace.ts) on the real driver,
//     equal to the same sequence on the mock's mtty personality run here,
//     and equal to the committed fixture when the payload carries it.
import fs from 'node:fs';
import os from 'node:os';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';

const T0 = performance.now();
const { VfioDevice } = await import('/lab/dist/src/index.js');
const { runConformance, CHECK_NAMES, openMockDevice } = await import('/lab/dist/src/testing.js');
const { runBehaviourTrace, diffTraces } = await import('/lab/dist/src/vfio/behaviour-trace.js');

let mdevs = [];
try { mdevs = JSON.parse(process.env.KLAB_MDEVS ?? '[]'); } catch { /* checked below */ }
const mdevType = process.env.KLAB_MTTY_TYPE || mdevs[0]?.type || 'mtty-2';
const ports = mdevType === 'mtty-1' ? 1 : 2;
const streamBytes = 24 + 36 * ports;

const checks = [];
async function check(name, fn) {
  const t0 = performance.now();
  let ok = false;
  let detail;
  try {
    detail = await fn();
    ok = true;
  } catch (err) {
    detail = err?.code ? `${err.code}: ${err.message}` : String(err?.message ?? err);
  }
  checks.push({ name, ok, detail: detail === undefined ? '' : String(detail), ms: Math.round(performance.now() - t0) });
  process.stderr.write(`[lab] ${ok ? 'pass' : 'FAIL'} ${name}: ${detail}\n`);
  return ok;
}
function expect(cond, message) {
  if (!cond) throw new Error(message);
}
async function expectCode(p, code, what) {
  try {
    await p;
  } catch (err) {
    expect(err?.code === code, `${what}: expected ${code}, got ${err?.code} (${err?.message})`);
    return err;
  }
  throw new Error(`${what}: expected ${code}, but it succeeded`);
}

const open = (i, via) => VfioDevice.openKernel({ path: via === 'cdev' ? mdevs[i].cdev : mdevs[i].sysfs, via, id: `mtty${i}-${via}` });
const openMtty = (seed) => openMockDevice({ profile: { name: 'mtty', driver: 'mtty', ports, flags: ['stop-copy', 'p2p', 'pre-copy'] }, seed });

/** Opens the devices, runs `fn` with them, and closes them whatever happens. */
async function withDevices(openers, fn) {
  const devices = [];
  try {
    for (const openDevice of openers) devices.push(await openDevice());
    return await fn(...devices);
  } finally {
    for (const d of devices) await d.close();
  }
}

async function saveStream(dev) {
  // running -> stop-copy in one SET (walks running-p2p, stop), then read to the end.
  const s = await dev.setState('stop-copy');
  expect(s, 'running -> stop-copy returned no data fd');
  const parts = [];
  for (;;) {
    const r = await s.read(4096);
    if (r.kind !== 'data') break;
    parts.push(r.bytes);
  }
  await dev.setState('running');
  await s.close();
  return Buffer.concat(parts);
}

const conformance = {};
const setupOk = await check('setup: two mtty instances with cdev and group', async () => {
  expect(!process.env.KLAB_SETUP_ERROR, `setup error: ${process.env.KLAB_SETUP_ERROR}`);
  expect(mdevs.length >= 2, `need 2 mdev instances, got ${mdevs.length}`);
  for (const m of mdevs.slice(0, 2)) expect(m.cdev && m.group && m.sysfs && !m.error, `instance ${m.uuid}: ${JSON.stringify(m)}`);
  return `${mdevs.length} x ${mdevType}: ${mdevs.map((m) => `${m.cdev} ${m.group}`).join(', ')}`;
});

if (setupOk) {
  // --- 1. conformance through both open paths ------------------------------------
  for (const via of ['cdev', 'group']) {
    let report;
    const ran = await check(`conformance[${via}]: suite runs`, async () => {
      report = await runConformance({ name: `mtty-${via}`, open: (role) => open(role === 'primary' ? 0 : 1, via) });
      return `${report.passed} passed, ${report.failed} failed, ${report.skipped} skipped`;
    });
    conformance[via] = report ?? null;
    for (const name of CHECK_NAMES) {
      const c = report?.checks.find((x) => x.name === name);
      await check(`conformance[${via}]: ${name}`, async () => {
        expect(ran && c, 'not run');
        expect(c.status === 'pass', c.detail);
        return c.detail;
      });
    }
  }

  // --- 2. other ways to name a device ---------------------------------------------------
  await check('open: auto by mdev UUID takes the cdev path; group by sysfs path', async () => {
    const seen = [];
    for (const [path, via, want] of [[mdevs[0].uuid, 'auto', 'cdev'], [mdevs[0].sysfs, 'auto', 'cdev'], [mdevs[0].uuid, 'group', 'group'], [mdevs[0].cdev, 'auto', 'cdev']]) {
      const d = await VfioDevice.openKernel({ path, via });
      try {
        expect(d.openPath === want, `${path} via ${via}: opened through ${d.openPath}, expected ${want}`);
        expect((await d.getState()) === 'running', 'not running');
        seen.push(`${via}(${path.startsWith('/') ? path : 'uuid'})->${d.openPath}`);
      } finally {
        await d.close();
      }
    }
    await expectCode(VfioDevice.openKernel({ path: mdevs[0].cdev, via: 'group' }), 'EINVAL', 'group path with a cdev node');
    await expectCode(VfioDevice.openKernel({ path: '/sys/devices/virtual/mtty/mtty/00000000-0000-0000-0000-000000000000', via: 'auto' }), 'ENOENT', 'unknown device');
    return seen.join(', ');
  });

  await check('open: a second open of an open device is refused, the first keeps working', async () => {
    const d = await open(0, 'cdev');
    try {
      const e = await VfioDevice.openKernel({ path: mdevs[0].sysfs, via: 'group' }).then(async (d2) => { await d2.close(); return null; }, (err) => err);
      const state = await d.getState();
      expect(state === 'running', `first device: ${state}`);
      return e ? `second open (group) failed with ${e.code}: ${e.message}` : 'second open through the group succeeded (the kernel allows it)';
    } finally {
      await d.close();
    }
  });

  // --- 3. save on one, restore on the other, through the data streams --------------------
  // 6.12 has no VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 (feature 12): the opt-in
  // is refused (ENOTTY/EINVAL: resolved false, no error), and the save/restore
  // below runs after that attempt, as the engine's fallback does.
  let precopyInfoV2 = null;
  await check('precopy-info-v2: the 6.12 mtty refuses the PRECOPY_INFOv2 opt-in (resolves false), and precopy info then never reports REINIT', async () => {
    return withDevices([() => open(0, 'cdev')], async (a) => {
      precopyInfoV2 = await a.enablePrecopyInfoV2();
      expect(precopyInfoV2 === false, `enablePrecopyInfoV2() resolved ${precopyInfoV2} on the 6.12 mtty`);
      const save = await a.setState('pre-copy');
      const info = await a.precopyInfo(save);
      expect(info.reinit === false, 'REINIT reported without an opt-in');
      await a.setState('running');
      return `refused (resolved false); precopy info ${info.initialBytes}/${info.dirtyBytes}, reinit ${info.reinit}`;
    });
  });

  await check('migrate: pre-copy + stop-copy stream from mtty0 restored on mtty1 via Readable -> Writable', async () => {
    return withDevices([() => open(0, 'cdev'), () => open(1, 'group')], async (a, b) => {
      // The opt-in attempt first (refused on 6.12): the save/restore must work after it.
      const optedIn = await a.enablePrecopyInfoV2();
      expect(optedIn === false, `enablePrecopyInfoV2() resolved ${optedIn}`);
      await a.reset();
      await b.reset();
      const before = await saveStream(a);
      expect(before.length === streamBytes, `source stream is ${before.length} bytes, expected ${streamBytes}`);
      await b.setState('stop');
      const resume = await b.setState('resuming');
      expect(resume, 'stop -> resuming returned no data fd');
      const save = await a.setState('pre-copy');
      expect(save, 'running -> pre-copy returned no data fd');
      const info = await a.precopyInfo();
      // PRE_COPY: read to the temporary end (mtty: read() returns 0 after the
      // header), then STOP_COPY on the same fd through the Readable. The SET
      // is not issued while a read is in flight: a 0-byte read is classified
      // by the state last seen, so a concurrent SET could turn it into "end".
      const seen = [];
      const ws = resume.createWriteStream();
      let drained = 0;
      for (;;) {
        const r = await save.read(4096);
        if (r.kind !== 'data') { drained++; break; }
        seen.push(r.bytes);
        await new Promise((res, rej) => ws.write(r.bytes, (err) => (err ? rej(err) : res())));
      }
      await a.setState('stop-copy');
      const tap = new Transform({ transform(chunk, _e, cb) { seen.push(chunk); cb(null, chunk); } });
      await pipeline(save.createReadStream({ chunkBytes: 4096 }), tap, ws);
      const sent = Buffer.concat(seen);
      expect(sent.length === streamBytes, `${sent.length} bytes went through, expected ${streamBytes}`);
      expect(sent.equals(before), 'the pre-copy + stop-copy stream differs from a plain stop-copy save');
      await a.setState('stop');
      await b.setState('stop');
      await b.setState('running');
      expect((await b.getState()) === 'running', 'destination not running');
      const after = await saveStream(b);
      expect(after.equals(sent), 'the destination saves different bytes than it was given');
      await a.setState('running');
      return `after a refused PRECOPY_INFOv2 opt-in: precopy info on entry ${info.initialBytes}/${info.dirtyBytes} (reinit ${info.reinit}); ${sent.length} bytes (${drained} temporary end(s) in pre-copy); destination re-saves the same ${after.length} bytes`;
    });
  });

  await check('migrate: a corrupted stream is rejected with the driver\'s error', async () => {
    return withDevices([() => open(0, 'cdev'), () => open(1, 'cdev')], async (a, b) => {
      await a.reset();
      await b.reset();
      await b.setState('stop');
      const resume = await b.setState('resuming');
      await a.setState('stop');
      const save = await a.setState('stop-copy');
      let offset = 0;
      const corrupt = new Transform({
        transform(chunk, _e, cb) {
          const c = Buffer.from(chunk);
          if (offset === 0) c[3] ^= 0xff; // a byte of the magic
          offset += c.length;
          cb(null, c);
        },
      });
      const err = await expectCode(pipeline(save.createReadStream({ chunkBytes: 4096 }), corrupt, resume.createWriteStream()), 'EFAULT', 'write of a stream with a bad magic');
      const state = await b.getState();
      expect(state === 'resuming', `destination in ${state} after the rejected write`);
      // mtty stores the bytes of the rejected write and never re-checks the
      // header: the complete-but-rejected stream still loads on resuming -> stop.
      const after = await b.setState('stop').then(() => 'resuming -> stop then succeeds (bytes of the rejected write were kept)', (e) => `resuming -> stop then fails with ${e.code}`);
      await b.reset();
      await a.setState('running');
      return `write failed with ${err.code}, destination stays resuming; ${after}`;
    });
  });

  // --- 4. error paths ----------------------------------------------------------------------
  await check('errors: stop-copy -> pre-copy is refused (EINVAL), device stays in stop-copy', async () => {
    return withDevices([() => open(0, 'cdev')], async (a) => {
      await a.reset();
      const s = await a.setState('stop-copy');
      const e = await expectCode(a.setState('pre-copy'), 'EINVAL', 'stop-copy -> pre-copy');
      expect(e.stateAfter === 'stop-copy', `stateAfter ${e.stateAfter}`);
      expect((await a.getState()) === 'stop-copy', 'state changed');
      const r = await s.read(4096);
      expect(r.kind === 'data' && r.bytes.length === streamBytes, 'the data fd stopped working after the refused SET');
      await a.setState('running');
      return `EINVAL, stateAfter ${e.stateAfter}; the stop-copy fd still delivers ${streamBytes} bytes`;
    });
  });

  await check('errors: precopy info outside PRE_COPY (EINVAL in stop-copy and in running; ENOTTY on a resume fd)', async () => {
    return withDevices([() => open(0, 'cdev')], async (a) => {
      await a.reset();
      const s = await a.setState('pre-copy');
      const inPre = await a.precopyInfo(s);
      await a.setState('stop-copy');
      await expectCode(a.precopyInfo(s), 'EINVAL', 'precopy info in stop-copy');
      await a.setState('running');
      await expectCode(a.precopyInfo(s), 'EINVAL', 'precopy info in running on the old fd');
      await a.setState('stop');
      const r = await a.setState('resuming');
      await expectCode(a.precopyInfo(r), 'ENOTTY', 'precopy info on a resume fd');
      const st = await a.getState();
      await a.reset();
      return `in pre-copy ${inPre.initialBytes}/${inPre.dirtyBytes}; stop-copy EINVAL; running EINVAL; resume fd ENOTTY (device ${st})`;
    });
  });

  await check('errors: a truncated resume fails at resuming -> stop (EINVAL), device stays resuming, completing it succeeds', async () => {
    return withDevices([() => open(0, 'cdev'), () => open(1, 'cdev')], async (a, b) => {
      await a.reset();
      await b.reset();
      const stream = await saveStream(a);
      await b.setState('stop');
      const r = await b.setState('resuming');
      await r.write(stream.subarray(0, stream.length - 1));
      const e = await expectCode(b.setState('stop'), 'EINVAL', 'resuming -> stop with a truncated stream');
      expect(e.stateAfter === 'resuming', `stateAfter ${e.stateAfter}`);
      await r.write(stream.subarray(stream.length - 1));
      await b.setState('stop');
      expect((await b.getState()) === 'stop', 'retry did not reach stop');
      await b.setState('running');
      return `EINVAL with ${stream.length - 1}/${stream.length} bytes, stateAfter ${e.stateAfter}; after the last byte resuming -> stop succeeds`;
    });
  });

  await check('errors: an oversize resume write is refused (ENOMEM), nothing consumed, device stays resuming', async () => {
    return withDevices([() => open(0, 'cdev'), () => open(1, 'cdev')], async (a, b) => {
      await a.reset();
      await b.reset();
      const stream = await saveStream(a);
      await b.setState('stop');
      const r = await b.setState('resuming');
      await expectCode(r.write(Buffer.concat([stream, Buffer.alloc(1)])), 'ENOMEM', 'write of stream + 1 byte');
      const st = await b.getState();
      expect(st === 'resuming', `device in ${st}`);
      await r.write(stream);
      await b.setState('running');
      return `ENOMEM for ${stream.length + 1} bytes, device ${st}; the ${stream.length}-byte stream then loads`;
    });
  });
}

// --- 5. behaviour trace: real driver vs the mock's mtty personality ---------------------------
let kernelTrace = null;
let mockTrace = null;
let traceDiff = [];
let fixtureDiff = null;
if (setupOk) {
  await check('trace: the behaviour-trace sequence runs on the real driver', async () => {
    await withDevices([() => open(0, 'cdev'), () => open(1, 'cdev')], async (a, b) => {
      kernelTrace = await runBehaviourTrace(a, b);
    });
    return `${kernelTrace.steps.length} steps`;
  });
  await check('trace: the mock mtty personality produces the same trace as the real driver', async () => {
    await withDevices([() => openMtty(0), () => openMtty(0)], async (a, b) => {
      mockTrace = await runBehaviourTrace(a, b);
    });
    expect(kernelTrace, 'no kernel trace');
    traceDiff = diffTraces(kernelTrace, mockTrace, ['kernel', 'mock']);
    expect(traceDiff.length === 0, `${traceDiff.length} step(s) differ; first: ${traceDiff[0]}`);
    return `${mockTrace.steps.length} steps identical`;
  });
  const fixturePath = '/lab/extra/mtty-kernel-trace.json';
  if (fs.existsSync(fixturePath)) {
    await check('trace: the real driver still matches the committed fixture (test/fixtures/mtty-kernel-trace.json)', async () => {
      const fx = JSON.parse(fs.readFileSync(fixturePath, 'utf8'));
      expect(kernelTrace, 'no kernel trace');
      if (fx.mdevType !== mdevType) return `fixture is for ${fx.mdevType}, this run uses ${mdevType}: not compared`;
      fixtureDiff = diffTraces(fx.trace, kernelTrace, ['fixture', 'kernel']);
      expect(fixtureDiff.length === 0, `${fixtureDiff.length} step(s) differ; first: ${fixtureDiff[0]}`);
      return `equal to the fixture recorded on ${fx.kernel}`;
    });
  }
}

const failed = checks.filter((c) => !c.ok).length;
const result = {
  ok: checks.length > 0 && failed === 0,
  entry: 'lab',
  kernel: { release: os.release(), version: os.version() },
  node: process.version,
  mdevType,
  passed: checks.length - failed,
  failed,
  checks,
  conformance,
  trace: kernelTrace ? { kernel: os.release(), mdevType, ports, trace: kernelTrace } : null,
  traceDiff,
  fixtureDiff,
  labMs: Math.round(performance.now() - T0),
  uptimeSeconds: Number(fs.readFileSync('/proc/uptime', 'utf8').split(' ')[0]),
};
console.log(JSON.stringify(result));
