import test from 'ava';
import { PROFILE_LIMITS, listProfiles, loadProfile, validateProfile, type MockProfileInput, type MockProfileScalars } from '../src/vfio/mock-profile.js';
import { mockNative } from '../src/vfio/mock-native.js';
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

// The profile's scalar fields are defined once (mock_device.h,
// VFIO_MOCK_PROFILE_FIELDS); validation, defaults and the typed interfaces
// follow that table.
test('the profile field table: the typed interfaces name exactly its fields', (t) => {
  const inputKeys: Record<keyof MockProfileInput, true> = {
    name: true, description: true, flags: true, stateBytes: true, chunkBytes: true, setupBytes: true, stopCopyOnlyBytes: true, dirtyBytesPerSec: true,
    dirtyWorkingSetBytes: true, arcLatencyMs: true, loadInitialMs: true, loadMsPerMiB: true, maxBytesPerSec: true, resumeFailureIntoError: true, dmaLogging: true,
    faults: true, corruptSaveAtByte: true, bogusPrecopyInfo: true, bogusStopCopyBytes: true, driver: true, ports: true, precopyInfoV2: true, reinit: true,
  };
  const scalarKeys: Record<keyof MockProfileScalars, true> = {
    stateBytes: true, chunkBytes: true, setupBytes: true, stopCopyOnlyBytes: true, dirtyBytesPerSec: true, dirtyWorkingSetBytes: true, defaultArcLatencyMs: true,
    loadInitialMs: true, loadMsPerMiB: true, maxBytesPerSec: true, resumeFailureIntoError: true, dmaLogging: true, corruptSaveAtByte: true, bogusInitialBytes: true,
    bogusDirtyBytes: true, bogusStopCopyBytes: true, precopyInfoV2: true, reinitAfterPrecopyMs: true, reinitInitialBytes: true,
  };
  const fields = mockNative().mockProfileSchema.fields.filter((f) => f.input);
  t.deepEqual(fields.map((f) => f.name).sort(), Object.keys(scalarKeys).sort());
  const structured = ['name', 'description', 'flags', 'arcLatencyMs', 'faults', 'driver', 'ports'];
  t.deepEqual([...new Set([...structured, ...fields.map((f) => f.input.split('.')[0]!)])].sort(), Object.keys(inputKeys).sort());
  t.is(PROFILE_LIMITS.maxChunks, mockNative().mockProfileSchema.limits.maxChunks);
});

/** A valid profile with `value` at a field's input path (its group's other members filled in). */
function withField(input: string, value: unknown): Record<string, unknown> {
  const [group, key] = input.split('.');
  const p: Record<string, unknown> = { ...base, flags: ['stop-copy', 'pre-copy'] };
  if (key === undefined) return { ...p, [group!]: value };
  const siblings = mockNative().mockProfileSchema.fields.filter((f) => f.input.startsWith(`${group}.`) && f.required);
  const g: Record<string, unknown> = Object.fromEntries(siblings.map((f) => [f.input.split('.')[1]!, 0]));
  return { ...p, [group!]: { ...g, [key]: value } };
}

test('every field of the table: absent takes its default, past its bounds is ERR_VFIO_PROFILE naming it, its bounds hold', (t) => {
  const defaults = validateProfile({ ...base, stateBytes: '64KiB' }) as unknown as Record<string, unknown>;
  for (const f of mockNative().mockProfileSchema.fields.filter((x) => x.input)) {
    if (f.default !== null && !f.required && f.name !== 'dirtyWorkingSetBytes') t.is(defaults[f.name], f.default, `${f.name} default`);
    if (f.kind === 'bool') {
      t.is((validateProfile(withField(f.input, !f.default)) as unknown as Record<string, unknown>)[f.name], !f.default, f.input);
      t.throws(() => validateProfile(withField(f.input, 'yes')), { code: 'ERR_VFIO_PROFILE', message: new RegExp(`${f.input.replace('.', '\\.')} must be a boolean`) } as never);
      continue;
    }
    if (f.max === null || f.max >= Number.MAX_SAFE_INTEGER || f.name === 'stateBytes') continue;
    // The largest value passes (if the rules between fields allow it), one past it is refused with the field's JSON name.
    const over = f.kind === 'ms' ? f.max + 0.5 : f.max + (f.name === 'chunkBytes' ? 8 : 1);
    const err = t.throws(() => validateProfile(withField(f.input, over)), { instanceOf: VfioError }, f.input);
    t.is(err?.code, 'ERR_VFIO_PROFILE');
    const named = f.input === 'arcLatencyMs.default' ? 'arcLatencyMs["default"]' : f.input; // the object's own key
    t.true(err!.message.includes(named), err!.message);
    t.regex(err!.message, /must (be at most|not exceed)/, f.input);
  }
});
