// Property tests: hostile device reports thrown at the byte and time accounting.
import test from 'ava';
import { MAX_REPORTED_BYTES, MAX_REPORTED_MS, clampDeviceBytes, saneMs, subtractBytes, sumBytes, transferMs } from '../src/migration/accounting.js';
import { DowntimePolicy } from '../src/migration/policy.js';
import { DEFAULT_PARAMETERS } from '../src/migration/params.js';
import type { StateHandler } from '../src/migration/handler.js';
import { clearSwitchoverHistory, exportSwitchoverHistory, importSwitchoverHistory, recordControlMs } from '../src/migration/switchover-history.js';

function rng(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = Math.imul(s ^ (s >>> 15), 1 | s);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 2 ** 32;
  };
}

const HOSTILE_U64 = [0n, 1n, 2n ** 32n - 1n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n, 2n ** 64n - 4096n];

function hostile(r: () => number): bigint {
  if (r() < 0.5) return HOSTILE_U64[Math.floor(r() * HOSTILE_U64.length)]!;
  return BigInt(Math.floor(r() * 2 ** 20)) * BigInt(Math.floor(r() * 2 ** 44));
}

test('clampDeviceBytes: any u64 becomes a safe number within [0, ceiling], flagged when clamped', (t) => {
  const r = rng(1);
  for (let i = 0; i < 20_000; i++) {
    const raw = hostile(r);
    const ceiling = r() < 0.2 ? Infinity : Math.floor(r() * 2 ** 45);
    const c = clampDeviceBytes(raw, ceiling);
    t.true(Number.isSafeInteger(c.value) && c.value >= 0);
    t.true(c.value <= Math.min(MAX_REPORTED_BYTES, ceiling === Infinity ? MAX_REPORTED_BYTES : ceiling));
    t.is(c.clamped, raw > BigInt(Math.min(MAX_REPORTED_BYTES, ceiling === Infinity ? MAX_REPORTED_BYTES : Math.floor(ceiling))));
    if (!c.clamped) t.is(BigInt(c.value), raw);
  }
});

test('sums saturate, differences never underflow, durations stay finite and bounded', (t) => {
  const r = rng(2);
  for (let i = 0; i < 20_000; i++) {
    const xs = Array.from({ length: 1 + Math.floor(r() * 6) }, () => (r() < 0.3 ? MAX_REPORTED_BYTES : r() < 0.1 ? NaN : r() < 0.1 ? -1 : Math.floor(r() * 2 ** 50)));
    const s = sumBytes(xs);
    t.true(Number.isSafeInteger(s) && s >= 0 && s <= MAX_REPORTED_BYTES);
    const a = Math.floor(r() * 2 ** 50);
    const b = Math.floor(r() * 2 ** 50);
    t.true(subtractBytes(a, b) >= 0);
    const bw = r() < 0.2 ? 0 : r() < 0.1 ? NaN : r() * 2 ** 34;
    const ms = transferMs(s, bw);
    t.true(Number.isFinite(ms) && ms >= 0 && ms <= MAX_REPORTED_MS);
  }
  t.is(saneMs(Infinity), MAX_REPORTED_MS);
  t.is(saneMs(NaN), 0);
  t.is(saneMs(-5), 0);
});

test('policy: hostile pending figures never give an absurd expected downtime or remaining', (t) => {
  const r = rng(3);
  const hostileMs = () => (r() < 0.1 ? Infinity : r() < 0.1 ? NaN : r() < 0.1 ? null : r() * 500);
  const handlers = Array.from({ length: 4 }, (_, i) => ({ describe: () => ({ id: `d${i}`, kind: 'vfio', compat: 'x' }), switchoverArcs: () => [{ arc: 'pre-copy>pre-copy-p2p', step: 'quiesce', ms: hostileMs(), basis: 'measured' }] }) as unknown as StateHandler);
  const policy = new DowntimePolicy(handlers);
  for (let i = 0; i < 5_000; i++) {
    policy.recordDestinationArcs(Math.floor(r() * 4), [{ arc: 'resuming>stop', step: 'finish', ms: hostileMs(), basis: 'learned' }]);
    policy.recordLoadRate(Math.floor(r() * 4), r() < 0.1 ? Infinity : r() * 10);
    const pending = handlers.map(() => {
      const v = Number(clampDeviceBytes(hostile(r), 2 ** 40).value);
      return { precopyBytes: v, stopcopyBytes: Number(clampDeviceBytes(hostile(r), 2 ** 40).value), exact: true };
    });
    const d = policy.evaluate({ pending, measuredBandwidthBytesPerSec: r() < 0.1 ? 0 : r() * 2 ** 33, params: DEFAULT_PARAMETERS, switchoverAckRequired: false, switchoverAcked: false, iteration: i });
    t.true(d.expectedDowntimeMs === null || (Number.isFinite(d.expectedDowntimeMs) && d.expectedDowntimeMs >= 0 && d.expectedDowntimeMs <= MAX_REPORTED_MS));
    t.true(Number.isSafeInteger(d.remainingBytes) && d.remainingBytes <= MAX_REPORTED_BYTES);
    if (d.suggestedDowntimeLimitMs !== null) t.true(Number.isFinite(d.suggestedDowntimeLimitMs) && d.suggestedDowntimeLimitMs > 0);
  }
});

test('policy: switchover steps are barriers: the slowest quiesce plus the slowest stop, not the slowest device', (t) => {
  const device = (id: string, quiesceMs: number, stopMs: number) =>
    ({
      describe: () => ({ id, kind: 'vfio', compat: id }),
      switchoverArcs: () => [
        { arc: 'pre-copy>pre-copy-p2p', step: 'quiesce', ms: quiesceMs, basis: 'measured' },
        { arc: 'pre-copy-p2p>stop-copy', step: 'stop', ms: stopMs, basis: 'learned' },
      ],
      resumeArcs: () => [
        { arc: 'resuming>stop', step: 'finish', ms: 1, basis: 'learned' },
        { arc: 'stop>running-p2p', step: 'resume-p2p', ms: stopMs / 10, basis: 'learned' },
        { arc: 'running-p2p>running', step: 'resume', ms: quiesceMs / 100, basis: 'assumed' },
      ],
    }) as unknown as StateHandler;
  // A NIC VF (400 ms quiesce, 2 ms stop) beside a vGPU (80 ms quiesce, 120 ms stop): every device
  // quiesces before any stops, so the source part is 400 + 120 ms, where the slowest device alone is 402.
  const policy = new DowntimePolicy([device('nic', 400, 2), device('vgpu', 80, 120)]);
  const d = policy.evaluate({ pending: [0, 1].map(() => ({ precopyBytes: 0, stopcopyBytes: 0, exact: true })), measuredBandwidthBytesPerSec: 1e9, params: DEFAULT_PARAMETERS, switchoverAckRequired: false, switchoverAcked: false, iteration: 1 });
  t.is(d.split.sourceArcsMs, 520);
  t.is(d.split.destinationArcsMs, 1 + 12 + 4);
  t.is(d.split.arcsByBasis.measured, 400);
  t.is(d.split.arcsByBasis.learned, 120 + 1 + 12);
  t.deepEqual(d.split.unmeasured.map((a) => `${a.device} ${a.arc}`), ['nic running-p2p>running', 'vgpu running-p2p>running']);
});

/** A P2P device for the policy alone: its arcs, and optionally how fast it dirties while it runs. */
const modelDevice = (id: string, arcs: { quiesce: number | null; stop: number | null }, dirtyBytesPerSec: number | null = null) =>
  ({
    describe: () => ({ id, kind: 'vfio', compat: id }),
    switchoverArcs: () => [
      { arc: 'pre-copy>pre-copy-p2p', step: 'quiesce', ms: arcs.quiesce, basis: arcs.quiesce === null ? 'assumed' : 'probed' },
      { arc: 'pre-copy-p2p>stop-copy', step: 'stop', ms: arcs.stop, basis: arcs.stop === null ? 'assumed' : 'learned' },
    ],
    resumeArcs: () => [
      { arc: 'resuming>stop', step: 'finish', ms: null, basis: 'assumed' },
      { arc: 'stop>running-p2p', step: 'resume-p2p', ms: null, basis: 'assumed' },
      { arc: 'running-p2p>running', step: 'resume', ms: null, basis: 'assumed' },
    ],
    dirtyBytesPerSec: () => dirtyBytesPerSec,
  }) as unknown as StateHandler;

const MiB = 1 << 20;
const pass = (policy: DowntimePolicy, stopcopyBytes: number[], extra: { awaitingLoadBytes?: number; bandwidth?: number; inTransitBytes?: number; inTransitReportAgeMs?: number } = {}) =>
  policy.evaluate({
    pending: stopcopyBytes.map((b) => ({ precopyBytes: b, stopcopyBytes: b, exact: true })),
    measuredBandwidthBytesPerSec: extra.bandwidth ?? 100 * MiB,
    params: DEFAULT_PARAMETERS,
    switchoverAckRequired: false,
    switchoverAcked: false,
    iteration: 1,
    awaitingLoadBytes: extra.awaitingLoadBytes ?? 0,
    inTransitBytes: extra.inTransitBytes,
    inTransitReportAgeMs: extra.inTransitReportAgeMs,
  });

test('policy: an arc this side could not measure takes the figure the destination probed on its idle device; its own resume arcs stay its own', (t) => {
  const policy = new DowntimePolicy([modelDevice('gpu', { quiesce: 10, stop: null })]);
  const before = pass(policy, [0]);
  t.true(before.split.unmeasured.some((a) => a.side === 'source' && a.arc === 'pre-copy-p2p>stop-copy'));
  policy.recordDestinationArcs(0, [
    { arc: 'resuming>stop', step: 'finish', ms: null, basis: 'assumed' },
    { arc: 'stop>running-p2p', step: 'resume-p2p', ms: 80, basis: 'probed' },
    { arc: 'running-p2p>running', step: 'resume', ms: 10, basis: 'probed' },
    { arc: 'pre-copy>pre-copy-p2p', step: 'quiesce', ms: 500, basis: 'probed' },
    { arc: 'pre-copy-p2p>stop-copy', step: 'stop', ms: 150, basis: 'probed' },
  ]);
  const after = pass(policy, [0]);
  // The stop arc is the destination's 150 ms; the quiesce this side probed (10 ms) is not replaced.
  t.is(after.split.sourceArcsMs, 10 + 150);
  t.is(after.split.destinationArcsMs, DEFAULT_PARAMETERS['x-assumed-arc-ms'] + 80 + 10);
  t.deepEqual(after.split.unmeasured.map((a) => `${a.side} ${a.arc}`), ['destination resuming>stop']);
});

test('policy: a device dirties through its switchover arcs until it is in stop-copy, and those bytes are data', (t) => {
  // 64 MiB/s while the slowest quiesce (400 ms) and its own stop (100 ms) run: 32 MiB more.
  const policy = new DowntimePolicy([modelDevice('gpu', { quiesce: 50, stop: 100 }, 64 * MiB), modelDevice('nic', { quiesce: 400, stop: 2 })]);
  const d = pass(policy, [10 * MiB, 0], { bandwidth: 100 * MiB });
  t.is(d.split.sourceArcsMs, 400 + 100);
  t.is(Math.round(d.split.dataMs), Math.round(((10 + 32) / 100) * 1000));
  t.regex(d.split.summary, /32\.0 MiB dirtied during the arcs/);
});

test('policy: the destination works through its backlog while the source stops its devices: only what outlasts the arcs and the transfer is load', (t) => {
  const policy = new DowntimePolicy([modelDevice('nic', { quiesce: 300, stop: 10 })]);
  policy.recordLoadRate(0, 2); // ms per MiB
  // 100 MiB behind the load (200 ms) against 310 ms of arcs: all loaded before the data arrives.
  t.is(pass(policy, [MiB], { awaitingLoadBytes: 100 * MiB }).split.loadMs, 0);
  // 300 MiB (600 ms): 290 ms outlast the arcs; the device's 1 MiB of stop-copy data (2 ms) queues
  // behind it and arrives in 10 ms at 100 MiB/s.
  t.is(Math.round(pass(policy, [MiB], { awaitingLoadBytes: 300 * MiB }).split.loadMs), 290 + 2 - 10);
});

test('policy: a measured rate is not extrapolated past what it rests on: 110 MiB wait for a rate measured on more than one short pass', (t) => {
  const policy = new DowntimePolicy([modelDevice('ram', { quiesce: 1, stop: 1 })]);
  const decide = (coveredMs: number, stopcopyBytes: number) =>
    policy.evaluate({ pending: [{ precopyBytes: stopcopyBytes, stopcopyBytes, exact: true }], measuredBandwidthBytesPerSec: 500 * MiB, bandwidthMeter: 'arriving', bandwidthCoveredMs: coveredMs, params: { ...DEFAULT_PARAMETERS, 'downtime-limit': 300 }, switchoverAckRequired: false, switchoverAcked: false, iteration: 2 });
  // 110 MiB at 500 MiB/s: 220 ms of data, within the limit, on a rate seen over 27 ms.
  const early = decide(27, 110 * MiB);
  t.true(early.expectedDowntimeMs! <= 300);
  t.false(early.switchover);
  t.regex(early.reason, /rests on 27 ms of sending/);
  t.true(decide(300, 110 * MiB).switchover);
  // A small transfer needs only as much evidence as it lasts.
  t.true(decide(27, 4 * MiB).switchover);
  // A configured bandwidth is the user's word: nothing to measure.
  const configured = policy.evaluate({ pending: [{ precopyBytes: 110 * MiB, stopcopyBytes: 110 * MiB, exact: true }], measuredBandwidthBytesPerSec: 0, bandwidthCoveredMs: 0, params: { ...DEFAULT_PARAMETERS, 'downtime-limit': 300, 'avail-switchover-bandwidth': 500 * MiB }, switchoverAckRequired: false, switchoverAcked: false, iteration: 2 });
  t.true(configured.switchover);
});

test('policy: data in transit drains while the source walks its arcs, and the report it rests on is aged: only what outlasts the arcs is data', (t) => {
  const policy = new DowntimePolicy([modelDevice('nic', { quiesce: 20, stop: 10 })]);
  const ms = (extra: Parameters<typeof pass>[2]) => pass(policy, [10 * MiB], { bandwidth: 100 * MiB, ...extra }).split;
  // 10 MiB of stop-copy data at 100 MiB/s: 100 ms.
  t.is(Math.round(ms({}).dataMs), 100);
  // 2 MiB on its way (20 ms) drain within the 30 ms of arcs: no data time.
  t.is(Math.round(ms({ inTransitBytes: 2 * MiB }).dataMs), 100);
  // 8 MiB (80 ms): 50 ms outlast the arcs.
  const backlog = ms({ inTransitBytes: 8 * MiB });
  t.is(Math.round(backlog.dataMs), 150);
  t.is(backlog.inTransitBytes, 8 * MiB - Math.floor(0.03 * 100 * MiB));
  t.regex(backlog.summary, /15\.0 MiB, 5\.0 in transit/);
  // Reported 10 ms ago: 1 MiB of it arrived since.
  t.is(Math.round(ms({ inTransitBytes: 8 * MiB, inTransitReportAgeMs: 10 }).dataMs), 140);
  // The classic policy counts neither.
  t.is(Math.round(new DowntimePolicy([modelDevice('nic', { quiesce: 20, stop: 10 })], 'classic').evaluate({ pending: [{ precopyBytes: 0, stopcopyBytes: 10 * MiB, exact: true }], measuredBandwidthBytesPerSec: 100 * MiB, params: DEFAULT_PARAMETERS, switchoverAckRequired: false, switchoverAcked: false, iteration: 1, inTransitBytes: 8 * MiB }).split.dataMs), 100);
});

test('policy: the control exchanges cost what the last migration of the same devices measured, else an assumed few ms; a history file cannot plant an absurd figure', (t) => {
  clearSwitchoverHistory();
  const policy = new DowntimePolicy([modelDevice('nic', { quiesce: 20, stop: 10 }), modelDevice('gpu', { quiesce: 20, stop: 10 })]);
  const other = new DowntimePolicy([modelDevice('nic', { quiesce: 20, stop: 10 })]);
  const first = pass(policy, [0, 0]).split;
  t.is(first.overheadBasis, 'assumed');
  t.regex(first.summary, /overhead 3 \(assumed\)/);
  recordControlMs(policy.deviceSetKey, 20);
  const learned = pass(policy, [0, 0]).split;
  t.is(learned.overheadBasis, 'learned');
  t.is(learned.overheadMs, 20);
  t.is(Math.round(pass(policy, [0, 0]).expectedDowntimeMs! - pass(other, [0]).expectedDowntimeMs!), 20 - 3, 'another device set keeps the assumption');
  // One noisy switchover moves the figure halfway.
  recordControlMs(policy.deviceSetKey, 40);
  t.is(pass(policy, [0, 0]).split.overheadMs, 30);
  recordControlMs(policy.deviceSetKey, Number.NaN);
  recordControlMs(policy.deviceSetKey, -5);
  t.is(pass(policy, [0, 0]).split.overheadMs, 30);
  // What an earlier process saved comes back; what is not a sane duration does not.
  const saved = exportSwitchoverHistory();
  clearSwitchoverHistory();
  importSwitchoverHistory({ ...saved, [other.deviceSetKey]: 1e12, junk: 'x' });
  importSwitchoverHistory(['not', 'a', 'map']);
  importSwitchoverHistory(null);
  t.deepEqual(exportSwitchoverHistory(), saved);
  clearSwitchoverHistory();
});
