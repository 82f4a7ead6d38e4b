// The switchover-abort bound on both sides with a destination whose wall
// clock is seconds off (faketime, from Debian's faketime package): each side
// runs its abort clock on its own monotonic clock, the destination's from the
// Switchover frame's arrival less the time it measured the frame needs.
// Timing assertions are bounds with a generous margin, not targets.
import test from 'ava';
import { existsSync } from 'node:fs';
import { MigrationSource } from '../src/migration/source.js';
import { MigrationError } from '../src/migration/errors.js';
import { sourceSide, startPeer } from './harness.js';

const spec = { mock: [['nic-vf', 1]] as [string, number][], overrides: { stateBytes: '8MiB', dirtyWorkingSetBytes: '4MiB', dirtyBytesPerSec: '16MiB', arcLatencyMs: { default: 2 } } };
/** The destination cannot get ready in time: its resuming -> stop arc outlasts the bound. */
const destSpec = { ...spec, overrides: { ...spec.overrides, arcLatencyMs: { default: 2, 'resuming>stop': 3000 } } };
const bound = { 'downtime-limit': 1200, 'switchover-limit': 300 };
const BOUND_MS = bound['downtime-limit'] + bound['switchover-limit'];
/** Slack for a loaded 2-core machine (event loop, stdout of the peer). */
const MARGIN_MS = 700;
/** An abort early by more than this is a clock error, not scheduling. */
const EARLY_MS = 100;

let port = 0;
const LIBFAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1';

for (const skewS of [+4, -4]) {
  test.serial(`a destination whose wall clock is ${skewS > 0 ? 'ahead' : 'behind'} by ${Math.abs(skewS)} s aborts the switchover at the bound, as the source does`, async (t) => {
    // libfaketime must be there (CI installs Debian's faketime): without it the test would prove nothing.
    t.true(existsSync(LIBFAKETIME), `${LIBFAKETIME} is installed`);
    const listen = `unix:/tmp/vfio-mig-skew-${process.pid}-${++port}.sock`;
    // Preloaded into the peer itself (the faketime command would run it as its
    // child, out of reach of the test's kill). Only the wall clock is skewed:
    // two hosts' monotonic clocks never meet anyway.
    const wrap = ['env', `LD_PRELOAD=${LIBFAKETIME}`, `FAKETIME=${skewS > 0 ? '+' : ''}${skewS}s`, 'FAKETIME_DONT_FAKE_MONOTONIC=1'];
    const peer = startPeer(['destination', '--listen', listen, '--spec', JSON.stringify(destSpec), '--options', JSON.stringify({ handshakeTimeoutMs: 3000 })], { wrap });
    t.teardown(() => peer.proc.kill('SIGKILL'));
    const uri = (await peer.waitFor((o) => !!o.listening)).listening as string;

    const side = await sourceSide(spec);
    t.teardown(() => side.close());
    const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: { ...bound, 'x-assumed-p2p-arc-ms': 5 }, capabilities: { 'switchover-abort': true } });
    let stoppedAt = 0;
    const sourceAborts: { measuredDowntimeMs: number; side: string }[] = [];
    src.on('MIGRATION', (d) => {
      if (d.status === 'device') stoppedAt = performance.now();
    });
    src.on('SWITCHOVER_ABORT', (d) => sourceAborts.push(d));
    const destAbort = peer.waitFor((o) => o.event === 'SWITCHOVER_ABORT', 20_000).then((line) => ({ line, seenAt: performance.now() }));
    const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
    t.is(err?.code, 'ERR_MIGRATION_SWITCHOVER_ABORTED', err?.message);
    // Said once on this side too, whichever side's clock reached the bound first.
    t.is(sourceAborts.length, 1, JSON.stringify(sourceAborts));
    t.true(side.vm.running, 'the VM runs on the source');
    const downtime = src.query().vmDowntimeOnAbortMs!;
    t.true(downtime >= BOUND_MS - EARLY_MS && downtime <= BOUND_MS + MARGIN_MS, `source: VM stopped ${downtime.toFixed(0)} ms for a bound of ${BOUND_MS} ms`);

    const { line, seenAt } = await destAbort;
    const firedAfterMs = seenAt - stoppedAt;
    const data = line.data as { measuredDowntimeMs: number; abortAfterMs: number; side: string };
    t.is(data.side, 'destination');
    t.is(data.abortAfterMs, BOUND_MS);
    // The peer's clock really is off: its event timestamps are on its (skewed) wall clock.
    const skewSeenMs = (line.timestamp as number) - Date.now();
    t.true(Math.abs(skewSeenMs - skewS * 1000) < 1000, `the destination's wall clock is off by ${skewSeenMs.toFixed(0)} ms`);
    t.log(`skew ${skewS} s: source aborted after ${downtime.toFixed(0)} ms, the destination ${firedAfterMs.toFixed(0)} ms after the stop (its estimate ${data.measuredDowntimeMs.toFixed(0)} ms), bound ${BOUND_MS} ms`);
    t.true(firedAfterMs >= BOUND_MS - EARLY_MS, `the destination aborted ${firedAfterMs.toFixed(0)} ms after the stop: too early`);
    t.true(firedAfterMs <= BOUND_MS + MARGIN_MS, `the destination aborted ${firedAfterMs.toFixed(0)} ms after the stop: too late`);
    t.true(Math.abs(data.measuredDowntimeMs - firedAfterMs) < MARGIN_MS, 'its own estimate of the downtime agrees');
    const result = (await peer.waitFor((o) => !!o.result, 20_000)).result as { status: string; error: { code: string }; vmRunning: boolean; deviceStates: string[] };
    t.is(result.status, 'failed');
    t.is(result.error.code, 'ERR_MIGRATION_SWITCHOVER_ABORTED');
    t.false(result.vmRunning, 'nothing runs on the destination');
  });
}
