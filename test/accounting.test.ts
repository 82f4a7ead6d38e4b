// Property tests: hostile device reports thrown at the byte and time accounting.
import test from 'ava';
import { MAX_REPORTED_BYTES, MAX_REPORTED_MS, clampDeviceBytes, saneMs, subtractBytes, sumBytes, transferMs } from '../src/migration/accounting.js';
import { DowntimePolicy } from '../src/migration/policy.js';
import { DEFAULT_PARAMETERS } from '../src/migration/params.js';
import type { StateHandler } from '../src/migration/handler.js';

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
  const handlers = Array.from({ length: 4 }, (_, i) => ({ describe: () => ({ id: `d${i}`, kind: 'vfio', compat: 'x' }), switchoverArcs: () => [{ arc: 'pre-copy>pre-copy-p2p', ms: hostileMs(), basis: 'measured' }] }) as unknown as StateHandler);
  const policy = new DowntimePolicy(handlers);
  for (let i = 0; i < 5_000; i++) {
    policy.recordDestinationArcs(Math.floor(r() * 4), [{ arc: 'resuming>stop', ms: hostileMs(), basis: 'learned' }]);
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
        { arc: 'pre-copy>pre-copy-p2p', ms: quiesceMs, basis: 'measured' },
        { arc: 'pre-copy-p2p>stop-copy', ms: stopMs, basis: 'learned' },
      ],
      resumeArcs: () => [
        { arc: 'resuming>stop', ms: 1, basis: 'learned' },
        { arc: 'stop>running-p2p', ms: stopMs / 10, basis: 'learned' },
        { arc: 'running-p2p>running', ms: quiesceMs / 100, basis: 'assumed' },
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
