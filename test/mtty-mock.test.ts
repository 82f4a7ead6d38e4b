// The mock's mtty personality against the real kernel mtty driver: the
// behaviour-trace sequence (src/vfio/behaviour-trace.ts) run on the mock must
// reproduce, step for step, the trace the real driver produced in the kernel
// lab (test/fixtures/mtty-kernel-trace.json, recorded with
// `npm run test:kernel -- --record`).
import test from 'ava';
import { readFileSync } from 'node:fs';
import { loadProfile, validateProfile } from '../src/vfio/mock-profile.js';
import { type BehaviourTrace, diffTraces, mttyHeader, mttyPorts, runBehaviourTrace } from '../src/vfio/behaviour-trace.js';
import { openMockDevice } from '../src/vfio/mock.js';

interface Fixture {
  kernel: string;
  kernelPackage: string;
  driver: string;
  mdevType: string;
  ports: number;
  trace: BehaviourTrace;
}
const fixture = JSON.parse(readFileSync(new URL('../../test/fixtures/mtty-kernel-trace.json', import.meta.url), 'utf8')) as Fixture;

const openMtty = (seed: number, ports?: 1 | 2) => openMockDevice({ profile: 'mtty', seed, overrides: ports ? { ports } : {} });

test('the fixture is a trace of the real mtty driver', (t) => {
  t.regex(fixture.kernel, /^6\.12\.\d+/);
  t.is(fixture.driver, 'samples/vfio-mdev/mtty.c');
  t.is(fixture.mdevType, 'mtty-2');
  t.true(fixture.trace.steps.length > 100);
  // A few facts of the real driver the sequence must have captured.
  const find = (label: string, op: string) => fixture.trace.steps.filter((s) => s.label === label && s.op === op);
  t.deepEqual(find('save via pre-copy', 'precopy-info')[0]?.result, { ok: true, value: { initialBytes: '24', dirtyBytes: '0' } });
  t.true(fixture.trace.steps.every((s) => s.state !== 'error'));
});

test('mock mtty personality reproduces the real driver\'s behaviour trace exactly', async (t) => {
  await using a = await openMtty(0, fixture.ports as 1 | 2);
  await using b = await openMtty(0, fixture.ports as 1 | 2);
  const trace = await runBehaviourTrace(a, b);
  const diff = diffTraces(fixture.trace, trace, [`kernel ${fixture.kernel}`, 'mock']);
  for (const d of diff) t.log(d);
  t.deepEqual(diff, []);
  t.deepEqual(trace, fixture.trace);
  t.deepEqual(a.openDataFds(), []);
  t.deepEqual(b.openDataFds(), []);
});

test('mtty-1 personality: 60-byte stream, a 96-byte mtty-2 stream is refused with ENOMEM', async (t) => {
  await using one = await openMtty(7, 1);
  await using two = await openMtty(8, 2);
  t.is(await one.stopCopySize(), 60n);
  t.is(await two.stopCopySize(), 96n);
  const save = await two.setState('stop-copy');
  const r = await save!.read(4096);
  t.is(r.kind === 'data' ? r.bytes.length : -1, 96);
  await one.setState('stop');
  const resume = await one.setState('resuming');
  await t.throwsAsync(resume!.write(r.kind === 'data' ? r.bytes : Buffer.alloc(0)), { code: 'ENOMEM' });
  // The header of a 2-port device is refused by a 1-port one, at write time.
  await t.throwsAsync(resume!.write(mttyHeader(2)), { code: 'EFAULT' });
  t.is(await one.getState(), 'resuming');
});

test('mtty personality digests: seeded devices differ, a restore carries the source ports, reset keeps them', async (t) => {
  await using src = await openMtty(21);
  await using dst = await openMtty(22);
  await using fresh1 = await openMtty(0);
  await using fresh2 = await openMtty(0);
  t.is(fresh1.mockInfo().digest, fresh2.mockInfo().digest);
  t.not(src.mockInfo().digest, dst.mockInfo().digest);
  await dst.setState('stop');
  const resume = await dst.setState('resuming');
  const save = await src.setState('pre-copy');
  const parts: Buffer[] = [];
  for (;;) {
    const r = await save!.read(4096);
    if (r.kind !== 'data') break;
    parts.push(r.bytes);
  }
  t.is(Buffer.concat(parts).length, 24);
  await src.setState('stop-copy');
  for (;;) {
    const r = await save!.read(4096);
    if (r.kind !== 'data') break;
    parts.push(r.bytes);
  }
  await resume!.write(Buffer.concat(parts));
  await dst.setState('running');
  t.is(dst.mockInfo().loadedDigest, src.mockInfo().savedDigest);
  t.is(dst.mockInfo().digest, src.mockInfo().digest);
  await dst.reset();
  t.is(dst.mockInfo().digest, src.mockInfo().digest);
  // A stream with recognisable ports loads exactly those.
  await dst.setState('stop');
  const r2 = await dst.setState('resuming');
  await r2!.write(Buffer.concat([mttyHeader(2), mttyPorts(2, 9)]));
  await dst.setState('stop');
  const back = await dst.setState('stop-copy');
  const got = await back!.read(4096);
  t.deepEqual(got.kind === 'data' ? got.bytes.subarray(24) : null, mttyPorts(2, 9));
});

test('mtty profile validation', async (t) => {
  const p = await loadProfile('mtty');
  t.is(p.driver, 'mtty');
  t.is(p.ports, 2);
  t.deepEqual(p.flags, { stopCopy: true, p2p: true, preCopy: true });
  t.is((await loadProfile('mtty', { ports: 1 })).stateBytes, 36);
  const base = { name: 'm', driver: 'mtty' };
  t.throws(() => validateProfile({ ...base, ports: 3 }), { message: /ports must be 1 or 2/ });
  t.throws(() => validateProfile({ ...base, stateBytes: '1MiB' }), { message: /stateBytes is not used by the "mtty" driver personality/ });
  t.throws(() => validateProfile({ ...base, flags: ['stop-copy'] }), { message: /flags must be/ });
  t.throws(() => validateProfile({ ...base, driver: 'mlx5' }), { message: /driver must be "generic" or "mtty"/ });
  t.throws(() => validateProfile({ name: 'g', flags: ['stop-copy'], stateBytes: 4096, ports: 2 }), { message: /ports is only used by the "mtty" driver personality/ });
  t.is(validateProfile({ name: 'g', flags: ['stop-copy'], stateBytes: 4096, driver: 'generic' }).stateBytes, 4096);
});
