import test from 'ava';
import { listProfiles, loadProfile, validateProfile } from '../src/vfio/mock-profile.js';
import { VfioError } from '../src/vfio/errors.js';

const base = { name: 'x', flags: ['stop-copy'], stateBytes: '64KiB' };

test('shipped profiles load and validate', async (t) => {
  const names = await listProfiles();
  for (const required of ['nic-vf', 'gpu', 'serial', 'minimal']) t.true(names.includes(required), required);
  for (const n of names) {
    const p = await loadProfile(n);
    t.is(p.name, n);
    t.true(p.flags.stopCopy);
  }
  const gpu = await loadProfile('gpu');
  t.is(gpu.stateBytes, 2 * 2 ** 30);
  t.is(gpu.loadInitialMs, 2000);
  const nic = await loadProfile('nic-vf');
  t.deepEqual(nic.arcLatencyMs.find((a) => a.from === 'running-p2p' && a.to === 'pre-copy-p2p')?.ms, 400);
});

test('byte sizes accept numbers and binary units', (t) => {
  t.is(validateProfile({ ...base, stateBytes: 8192 }).stateBytes, 8192);
  t.is(validateProfile({ ...base, stateBytes: '1MiB' }).stateBytes, 1 << 20);
  t.is(validateProfile({ ...base, stateBytes: '2GiB', chunkBytes: '64KiB' }).stateBytes, 2 ** 31);
});

const bad: [string, Record<string, unknown>, RegExp][] = [
  ['unknown field', { ...base, stateByte: 1 }, /stateByte is not a profile field/],
  ['missing stop-copy', { ...base, flags: ['p2p'] }, /flags must include "stop-copy"/],
  ['unknown flag', { ...base, flags: ['stop-copy', 'warp'] }, /unknown flag "warp"/],
  ['bad size', { ...base, stateBytes: '12 parsecs' }, /stateBytes must be a byte count/],
  ['negative size', { ...base, stateBytes: -4096 }, /stateBytes must be a finite byte count/],
  ['not a chunk multiple', { ...base, stateBytes: 5000 }, /multiple of chunkBytes/],
  ['bad arc', { ...base, arcLatencyMs: { 'running>flying': 3 } }, /single arc as "from>to"/],
  ['negative latency', { ...base, arcLatencyMs: { default: -1 } }, /must be a number >= 0/],
  ['bad errno', { ...base, faults: [{ arc: 'running>stop', errno: 'EWHAT' }] }, /errno name/],
  ['bad fault field', { ...base, faults: [{ arc: 'running>stop', errno: 'EIO', when: 1 }] }, /faults\[0\]\.when is not a fault field/],
  ['bad bogus', { ...base, bogusPrecopyInfo: { dirtyBytes: '2^64' } }, /unsigned 64-bit integer/],
  ['too big bogus', { ...base, bogusStopCopyBytes: '18446744073709551616' }, /unsigned 64-bit integer/],
  ['working set too big', { ...base, dirtyWorkingSetBytes: '1MiB' }, /must not exceed stateBytes/],
  ['bad name', { ...base, name: 'Has Spaces' }, /name must be a lowercase identifier/],
];

for (const [what, input, message] of bad) {
  test(`profile validation: ${what} is a clear ERR_VFIO_PROFILE error`, (t) => {
    const err = t.throws(() => validateProfile(input), { instanceOf: VfioError, message });
    t.is(err?.code, 'ERR_VFIO_PROFILE');
  });
}

test('an unknown profile name lists the shipped ones', async (t) => {
  const err = await t.throwsAsync(loadProfile('no-such-device'), { instanceOf: VfioError });
  t.is(err?.code, 'ERR_VFIO_PROFILE');
  t.regex(err!.message, /shipped profiles: .*nic-vf/);
});

test('overrides replace fields before validation', async (t) => {
  const p = await loadProfile('gpu', { stateBytes: '64MiB', dirtyWorkingSetBytes: '8MiB' });
  t.is(p.stateBytes, 64 << 20);
  await t.throwsAsync(loadProfile('gpu', { stateBytes: '1MiB' }), { message: /dirtyWorkingSetBytes must not exceed/ });
});
