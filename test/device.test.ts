import test from 'ava';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { VfioDevice } from '../src/vfio/device.js';
import { VfioError } from '../src/vfio/errors.js';
import { native } from '../src/vfio/native.js';
import { MiB, openFdCount } from './helpers.js';
import { openMockDevice } from '../src/vfio/mock.js';

const small = { stateBytes: '1MiB', dirtyWorkingSetBytes: '256KiB' } as const;

test('save through a Readable and restore through a Writable: the destination holds exactly the source state', async (t) => {
  await using src = await openMockDevice({ profile: 'nic-vf', seed: 11 });
  await using dst = await openMockDevice({ profile: 'nic-vf', seed: 12 });
  t.not(src.mockInfo().digest, dst.mockInfo().digest);
  await dst.setState('stop');
  const resume = await dst.setState('resuming');
  const save = await src.setState('pre-copy');
  t.truthy(save && resume);
  const readable = save!.createReadStream();
  let drained = 0;
  readable.on('drained', () => {
    drained++;
    // After the first temporary end of stream, stop the device: the stream then runs to its end.
    if (drained === 1) void src.setState('stop-copy');
  });
  await pipeline(readable, resume!.createWriteStream());
  t.true(drained >= 1);
  await dst.setState('stop');
  t.is(await src.getState(), 'stop-copy');
  t.is(dst.mockInfo().loadedDigest, src.mockInfo().savedDigest);
  t.is(src.mockInfo().digest, src.mockInfo().savedDigest, 'a stopped device does not change');
  await dst.setState('running');
  t.is(dst.mockInfo().seed, src.mockInfo().seed);
});

test('PRE_COPY: ENOMSG at the temporary end, more data once the running device dirties state, precopy info tracks it', async (t) => {
  await using dev = await openMockDevice({ profile: 'nic-vf', overrides: { ...small, dirtyBytesPerSec: '64MiB' } });
  const s = (await dev.setState('pre-copy'))!;
  const first = await dev.precopyInfo();
  t.true(first.initialBytes > 1n << 20n);
  t.is(first.dirtyBytes, 0n);
  let r;
  let total = 0;
  while ((r = await s.read(64 * 1024)).kind === 'data') total += r.bytes.length;
  t.is(r.kind, 'no-data');
  t.true(total >= Number(first.initialBytes));
  const drained = await dev.precopyInfo();
  t.is(drained.initialBytes, 0n);
  await sleep(50);
  const later = await dev.precopyInfo();
  t.true(later.dirtyBytes > 0n, 'a running device re-dirties its state');
  const more = await s.read(MiB);
  t.is(more.kind, 'data');
});

test('STOP_COPY: read returns data, then end (0) repeatedly; the fd is dead once the device leaves', async (t) => {
  await using dev = await openMockDevice({ profile: 'serial' });
  await dev.setState('stop');
  const s = (await dev.setState('stop-copy'))!;
  const size = await dev.stopCopySize();
  let total = 0;
  let r;
  let checksums = 0;
  while ((r = await s.read(1000)).kind === 'data') {
    total += r.bytes.length;
    // The checksum taken on the data thread is the bytes' CRC32C.
    if (r.crc32c === native.crc32c(r.bytes)) checksums++;
    else t.fail(`read ${checksums + 1}: crc32c ${r.crc32c} is not that of its ${r.bytes.length} bytes`);
  }
  t.true(checksums > 1);
  t.is(BigInt(total), size, 'MIG_DATA_SIZE predicted the stream exactly');
  t.is((await s.read(10)).kind, 'end');
  t.is((await s.read(10)).kind, 'end');
  await dev.setState('stop');
  t.false(s.valid);
  const err = await t.throwsAsync(s.read(10), { instanceOf: VfioError });
  t.is(err?.code, 'ENODEV');
});

test('uAPI errnos: precopy info outside PRE_COPY, wrong-direction I/O, a state the flags lack, ERROR', async (t) => {
  await using dev = await openMockDevice({ profile: 'nic-vf', overrides: small });
  t.is((await t.throwsAsync(dev.precopyInfo(), { instanceOf: VfioError }))?.code, 'ERR_VFIO_NO_DATA_SESSION');
  const s = (await dev.setState('pre-copy'))!;
  await dev.setState('stop-copy');
  const e1 = await t.throwsAsync(dev.precopyInfo(s), { instanceOf: VfioError });
  t.is(e1?.code, 'EINVAL');
  t.is(e1?.operation, 'VFIO_MIG_GET_PRECOPY_INFO');
  t.is((await t.throwsAsync(s.write(Buffer.alloc(8)), { instanceOf: VfioError }))?.code, 'ERR_VFIO_BAD_ARGUMENT');
  const e2 = await t.throwsAsync(dev.setState('error'), { instanceOf: VfioError });
  t.is(e2?.code, 'EINVAL');
  t.is(e2?.stateAfter, 'stop-copy');
  t.is(await dev.getState(), 'stop-copy');

  await using serial = await openMockDevice({ profile: 'serial' });
  const e3 = await t.throwsAsync(serial.setState('pre-copy'), { instanceOf: VfioError });
  t.is(e3?.code, 'EINVAL');
  t.is(e3?.stateAfter, 'running');
});

test('a failing arc reports errno, ioctl, arc and the ERROR state it left; only reset leaves ERROR and it loses state', async (t) => {
  await using dev = await openMockDevice({ profile: 'faults/arc-fails-into-error', seed: 5, overrides: { dirtyBytesPerSec: '64MiB' } });
  await sleep(20); // the running device changes its state
  const digestBefore = dev.mockInfo().digest;
  const arcs: string[] = [];
  const err = await t.throwsAsync(dev.stepTo('stop', { onArc: (a) => arcs.push(`${a.from}>${a.to}`) }), { instanceOf: VfioError });
  t.deepEqual(arcs, ['running>running-p2p']);
  t.is(err?.code, 'EIO');
  t.is(err?.errno, 5);
  t.is(err?.operation, 'VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE)');
  t.deepEqual(err?.arc, { from: 'running-p2p', to: 'stop' });
  t.is(err?.stateAfter, 'error');
  t.regex(err!.message, /EIO.*running-p2p -> stop.*device is now error/);
  t.is((await t.throwsAsync(dev.setState('running'), { instanceOf: VfioError }))?.code, 'EINVAL');
  await dev.reset();
  t.is(await dev.getState(), 'running');
  t.not(dev.mockInfo().digest, digestBefore, 'a reset device has lost its state');
});

/** A whole STOP_COPY stream of a mock device with a distinct seed. */
async function savedStream(profile: string, seed: number): Promise<{ stream: Buffer; savedDigest: string | null }> {
  await using src = await openMockDevice({ profile, seed });
  await src.setState('stop');
  const save = (await src.setState('stop-copy'))!;
  const pieces: Buffer[] = [];
  let r;
  while ((r = await save.read(MiB)).kind === 'data') pieces.push(r.bytes);
  return { stream: Buffer.concat(pieces), savedDigest: src.mockInfo().savedDigest };
}

/** Writes `stream` into a fresh device in pieces of the given sizes (cycled). */
async function restoreInPieces(profile: string, stream: Buffer, sizes: number[]): Promise<{ loadedDigest: string | null }> {
  await using dst = await openMockDevice({ profile, seed: 999 });
  await dst.setState('stop');
  const resume = (await dst.setState('resuming'))!;
  for (let at = 0, i = 0; at < stream.length; i++) {
    const n = Math.min(sizes[i % sizes.length]!, stream.length - at);
    await resume.write(stream.subarray(at, at + n));
    at += n;
  }
  await dst.setState('stop');
  return { loadedDigest: dst.mockInfo().loadedDigest };
}

test('a restore cut at any byte (records split across writes, even inside headers) loads exactly; a flipped byte is refused', async (t) => {
  const { stream, savedDigest } = await savedStream('serial', 21);
  t.truthy(savedDigest);
  // 1-byte and 7-byte writes cut every header; 65,537 cuts records at changing offsets.
  for (const sizes of [[1, 7, 39, 41, 4096], [65_537], [40], [stream.length]]) {
    t.is((await restoreInPieces('serial', stream, sizes)).loadedDigest, savedDigest, `pieces of ${sizes.join(', ')} bytes`);
  }
  for (const at of [5, 60, Math.floor(stream.length / 2), stream.length - 3]) {
    const bad = Buffer.from(stream);
    bad[at]! ^= 0x01;
    const err = await t.throwsAsync(restoreInPieces('serial', bad, [33, 1000]), { instanceOf: VfioError }, `byte ${at} flipped`);
    t.is(err?.code, 'EINVAL');
  }
});

test('checked writes: each run is verified on the data thread before it is written; a mismatch is EBADMSG and that run never reaches the device', async (t) => {
  const { stream, savedDigest } = await savedStream('serial', 31);
  const pieces = [stream.subarray(0, 1000), stream.subarray(1000, 5000), stream.subarray(5000)];
  const crc = (bufs: Buffer[]) => bufs.reduce((c, b) => native.crc32c(b, c), 0);
  {
    await using dst = await openMockDevice({ profile: 'serial', seed: 5 });
    await dst.setState('stop');
    const resume = (await dst.setState('resuming'))!;
    await resume.write(pieces, { checksums: [{ parts: 1, crc32c: crc([pieces[0]!]) }, { parts: 2, crc32c: crc([pieces[1]!, pieces[2]!]) }] });
    await dst.setState('stop');
    t.is(dst.mockInfo().loadedDigest, savedDigest!);
  }
  {
    await using dst = await openMockDevice({ profile: 'serial', seed: 6 });
    await dst.setState('stop');
    const resume = (await dst.setState('resuming'))!;
    const err = await t.throwsAsync(resume.write(pieces, { checksums: [{ parts: 1, crc32c: crc([pieces[0]!]) }, { parts: 2, crc32c: crc([pieces[1]!, pieces[2]!]) ^ 1 }] }), { instanceOf: VfioError });
    t.is(err?.code, 'EBADMSG');
    t.regex(err!.message, /crc32c check of data run 1/);
    t.is(dst.mockInfo().bytesWritten, 1000, 'the first run was written, nothing of the second');
  }
  {
    await using dst = await openMockDevice({ profile: 'serial', seed: 7 });
    await dst.setState('stop');
    const resume = (await dst.setState('resuming'))!;
    for (const checksums of [[{ parts: 2, crc32c: 0 }], [{ parts: 0, crc32c: 0 }, { parts: 3, crc32c: 0 }], [{ parts: 3, crc32c: -1 }]])
      await t.throwsAsync(resume.write(pieces, { checksums }), { code: 'ERR_VFIO_BAD_ARGUMENT' });
  }
});

test('a stream from a different device profile is refused with EINVAL before anything loads', async (t) => {
  await using src = await openMockDevice({ profile: 'serial' });
  await using dst = await openMockDevice({ profile: 'minimal' });
  await src.setState('stop');
  const save = (await src.setState('stop-copy'))!;
  const r = await save.read(MiB);
  t.is(r.kind, 'data');
  await dst.setState('stop');
  const resume = (await dst.setState('resuming'))!;
  const err = await t.throwsAsync(resume.write((r as { bytes: Buffer }).bytes), { instanceOf: VfioError });
  t.is(err?.code, 'EINVAL');
  t.is(err?.operation, 'write(data_fd)');
});

test.serial('no fd leaks: devices, sessions and stale fds are all closed by close()', async (t) => {
  const before = openFdCount();
  for (let i = 0; i < 5; i++) {
    const dev = await openMockDevice({ profile: 'nic-vf', overrides: small });
    await dev.setState('pre-copy');
    await dev.setState('stop-copy');
    await dev.setState('stop');
    await dev.setState('resuming');
    t.is(dev.openDataFds().length, 1, 'only the resume fd: the save session ended when the device left its states, and its fd was closed');
    await dev.close();
    await dev.close();
  }
  await sleep(20);
  t.is(openFdCount(), before);
});

test('a closed device refuses calls with ERR_VFIO_CLOSED; Symbol.asyncDispose closes', async (t) => {
  const dev = await openMockDevice({ profile: 'serial' });
  await dev[Symbol.asyncDispose]();
  t.true(dev.closed);
  t.is((await t.throwsAsync(dev.getState(), { instanceOf: VfioError }))?.code, 'ERR_VFIO_CLOSED');
});

test.serial('slow arcs run off the event loop, and arcs of several devices run in parallel', async (t) => {
  const arcMs = 150;
  const devices = await Promise.all(
    Array.from({ length: 8 }, (_, i) => openMockDevice({ profile: 'serial', seed: i, overrides: { arcLatencyMs: { default: arcMs } } })),
  );
  let ticks = 0;
  const timer = setInterval(() => ticks++, 5);
  const t0 = performance.now();
  await Promise.all(devices.map((d) => d.setState('running-p2p')));
  const elapsed = performance.now() - t0;
  clearInterval(timer);
  // On the JS thread a 150 ms ioctl would starve the timer; one after another, 8 would take 1200 ms.
  t.true(ticks >= 5, `timer ticked ${ticks} times during the arcs`);
  t.true(elapsed < 4 * arcMs, `8 parallel arcs took ${elapsed.toFixed(0)} ms`);
  for (const d of devices) t.is(await d.getState(), 'running-p2p');
  await Promise.all(devices.map((d) => d.close()));
});

test('AbortSignal: an aborted walk stops between arcs and says so', async (t) => {
  await using dev = await openMockDevice({ profile: 'nic-vf', overrides: small });
  const pre = AbortSignal.abort('operator cancelled');
  const e1 = await t.throwsAsync(dev.stepTo('stop', { signal: pre }), { instanceOf: VfioError });
  t.is(e1?.code, 'ABORT_ERR');
  t.is(await dev.getState(), 'running');
  const ctl = new AbortController();
  const e2 = await t.throwsAsync(dev.stepTo('stop', { signal: ctl.signal, onArc: () => ctl.abort() }), { instanceOf: VfioError });
  t.is(e2?.code, 'ABORT_ERR');
  t.is(await dev.getState(), 'running-p2p', 'the arc in flight completed, the next one never started');
});

test('destination load cost: the initial-bytes setup time and per-MiB time are spent in the writes', async (t) => {
  // No dirtying: the read loop ends at the first temporary end of stream however slow the reads are (a sanitizer build).
  const loadCost = { stateBytes: '4MiB', setupBytes: '1MiB', stopCopyOnlyBytes: '1MiB', dirtyBytesPerSec: 0, dirtyWorkingSetBytes: '1MiB', loadInitialMs: 120, loadMsPerMiB: 1 } as const;
  await using src = await openMockDevice({ profile: 'gpu', overrides: loadCost });
  await using dst = await openMockDevice({ profile: 'gpu', overrides: loadCost });
  await dst.setState('stop');
  const resume = (await dst.setState('resuming'))!;
  const save = (await src.setState('pre-copy'))!;
  let bytes = 0;
  let r;
  while ((r = await save.read(MiB)).kind === 'data') {
    await resume.write(r.bytes);
    bytes += r.bytes.length;
  }
  const expectedMs = 120 + bytes / MiB;
  t.true(Math.abs(dst.mockInfo().loadBusyMs - expectedMs) < 0.01, `${dst.mockInfo().loadBusyMs} vs ${expectedMs}`);
});

test('DMA dirty logging: start, report a bitmap, stop; ENOTTY where the device lacks it', async (t) => {
  await using nic = await openMockDevice({ profile: 'nic-vf', overrides: small });
  t.is((await t.throwsAsync(nic.dmaLoggingStart(1000, [{ iova: 0, length: MiB }]), { instanceOf: VfioError }))?.code, 'EINVAL');
  await nic.dmaLoggingStart(4096, [{ iova: 0, length: 64 * MiB }]);
  t.is((await t.throwsAsync(nic.dmaLoggingStart(4096, [{ iova: 0, length: MiB }]), { instanceOf: VfioError }))?.code, 'EBUSY');
  await sleep(30);
  const bitmap = await nic.dmaLoggingReport(0, 64 * MiB, 4096);
  t.is(bitmap.length, (64 * MiB) / 4096 / 8);
  t.true(bitmap.some((b) => b !== 0), 'a running device dirtied pages');
  await nic.dmaLoggingStop();
  await using minimal = await openMockDevice({ profile: 'minimal' });
  t.is((await t.throwsAsync(minimal.dmaLoggingStart(4096, [{ iova: 0, length: MiB }]), { instanceOf: VfioError }))?.code, 'ENOTTY');
});

test('kernel devices: a bad path is a typed error, never a crash', async (t) => {
  const err = await t.throwsAsync(VfioDevice.openKernel({ path: '/dev/vfio/devices/vfio-does-not-exist' }), { instanceOf: VfioError });
  t.is(err?.code, 'ENOENT');
  t.regex(err!.message, /vfio-does-not-exist/);
  const e2 = await t.throwsAsync(VfioDevice.openKernel({ path: '0000:ff:1f.7' }), { instanceOf: VfioError });
  t.is(e2?.code, 'ENOENT');
  const e3 = await t.throwsAsync(VfioDevice.openKernel({ path: '/dev/vfio/devices/vfio0', via: 'bogus' as 'cdev' }), { instanceOf: VfioError });
  t.is(e3?.code, 'ERR_VFIO_BAD_ARGUMENT');
});

test.serial('every device call is traced on the vfio-migration:ioctl diagnostics channel, with results and errors', async (t) => {
  const { channel } = await import('node:diagnostics_channel');
  const traces: { device: string; operation: string; result?: unknown; error?: { code: string } }[] = [];
  const onTrace = (m: unknown) => traces.push(m as (typeof traces)[number]);
  channel('vfio-migration:ioctl').subscribe(onTrace);
  t.teardown(() => channel('vfio-migration:ioctl').unsubscribe(onTrace));
  await using dev = await openMockDevice({ profile: 'serial', id: 'traced' });
  await dev.getState();
  await t.throwsAsync(dev.setState('pre-copy'));
  const mine = traces.filter((x) => x.device === 'traced');
  t.deepEqual(mine.map((x) => x.operation), ['get-state', 'set-state', 'get-state']);
  t.is(mine[0]!.result, 2, 'raw kernel value of RUNNING');
  t.is(mine[1]!.error?.code, 'EINVAL');
});
