// The destination's load rate is what the estimate's load term rests on: a
// device's one-off setup for its initial data (what switchover-ack waits for)
// must not pass for a per-MiB cost of the data that follows.
import test from 'ava';
import type { HandlerContext, SectionOutput } from '../src/migration/handler.js';
import { VfioHandler } from '../src/migration/vfio-handler.js';
import { openMockDevice } from '../src/vfio/mock.js';
import type { MockProfileInput } from '../src/vfio/mock-profile.js';

const ctx: HandlerContext = { signal: new AbortController().signal, emit: () => {}, warn: () => {} };

/** Collects what a source handler sends, split at its end of initial bytes. */
function collector() {
  const c = { initial: [] as Buffer[], later: [] as Buffer[], initialDone: false };
  const out: SectionOutput = {
    send: async (data) => void (c.initialDone ? c.later : c.initial).push(Buffer.from(data)),
    initialSent: async () => void (c.initialDone = true),
    initialRenewed: async () => {},
  };
  return { c, out };
}

test('the write that completes the initial data pays the device setup once: the load rate after it is the per-MiB cost', async (t) => {
  const setupMs = 400;
  const overrides: Partial<MockProfileInput> = { stateBytes: '4MiB', stopCopyOnlyBytes: '2MiB', dirtyBytesPerSec: 0, dirtyWorkingSetBytes: '1MiB', loadInitialMs: setupMs, loadMsPerMiB: 1, arcLatencyMs: { default: 1 } };
  const srcDevice = await openMockDevice({ profile: 'nic-vf', overrides, seed: 1, id: 'src' });
  const dstDevice = await openMockDevice({ profile: 'nic-vf', overrides, seed: 1, id: 'dst' });
  t.teardown(() => Promise.all([srcDevice.close(), dstDevice.close()]));
  const source = new VfioHandler(srcDevice);
  const destination = new VfioHandler(dstDevice);
  await source.saveSetup(ctx);
  const { c, out } = collector();
  for (let pass = 0; !c.initialDone && pass < 1000; pass++) await source.savePrecopy(64 << 20, out);
  t.true(c.initialDone, 'the source sent its initial bytes');
  await destination.loadSetup(ctx);
  // One gathered write of all the initial bytes (as a destination loads a
  // backlog): it carries the device's setup.
  const t0 = performance.now();
  await destination.load([Buffer.concat(c.initial)]);
  t.true(performance.now() - t0 >= setupMs * 0.9, 'the mock charged its setup to that write');
  await destination.loadInitialDone();
  // Then stop-copy data in small writes, as a trickle arrives.
  await source.saveQuiesce(ctx);
  await source.saveStop(ctx);
  const stop = collector();
  stop.c.initialDone = true;
  await source.saveComplete(stop.out);
  const rest = Buffer.concat(stop.c.later);
  t.true(rest.length >= 2 << 20);
  for (let off = 0; off < rest.length; off += 256 << 10) await destination.load([rest.subarray(off, off + (256 << 10))]);
  const rate = destination.loadMsPerMiB();
  t.log(`load rate ${rate?.toFixed(2)} ms/MiB (device: 1 ms/MiB, plus ${setupMs} ms once for the initial data)`);
  t.not(rate, null);
  // The setup spread over the 4 MiB write would read ~100 ms/MiB.
  t.true(rate! < 20, `${rate} ms/MiB`);
  await destination.loadFinish(ctx);
  await source.saveCleanup('completed', ctx);
  await destination.loadCleanup('completed', ctx);
  t.is(destination.digest('loaded'), source.digest('saved'));
});
