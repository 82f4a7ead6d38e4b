// Liveness and a bounded switchover under network faults, with real
// processes: a peer stopped with SIGSTOP, and a silent partition (a network
// namespace whose veth link goes down: packets vanish, no reset, no ICMP).
// Timing assertions are bounds with a generous margin, not targets.
import test from 'ava';
import { setTimeout as sleep } from 'node:timers/promises';
import { MigrationSource } from '../src/migration/source.js';
import { MigrationDestination, type IncomingResult } from '../src/migration/destination.js';
import { MigrationError } from '../src/migration/errors.js';
import type { MigrationParameters } from '../src/migration/params.js';
import { type PeerProcess, sourceSide, startPeer } from './harness.js';
import { createNetns } from './helpers.js';

/** Stop-copy data well past the socket buffers: a send to a silent peer blocks. */
const spec = { mock: [['nic-vf', 1]] as [string, number][], overrides: { stateBytes: '32MiB', dirtyWorkingSetBytes: '24MiB', dirtyBytesPerSec: '256MiB', arcLatencyMs: { default: 2 } } };
/** Slack for rolling back (device arcs, event loop) on a loaded 2-core machine. */
const MARGIN_MS = 1000;

let port = 4400;

async function startDestinationPeer(t: { teardown(fn: () => void): void }, options: { netns?: string; host?: string; arcLatencyMs?: Record<string, number> } = {}): Promise<{ peer: PeerProcess; uri: string }> {
  const listen = options.host ? `tcp:${options.host}:${++port}` : `unix:/tmp/vfio-mig-live-${process.pid}-${++port}.sock`;
  const destSpec = options.arcLatencyMs ? { ...spec, overrides: { ...spec.overrides, arcLatencyMs: options.arcLatencyMs } } : spec;
  const peer = startPeer(['destination', '--listen', listen, '--spec', JSON.stringify(destSpec), '--options', JSON.stringify({ handshakeTimeoutMs: 3000 })], { netns: options.netns });
  t.teardown(() => {
    peer.proc.kill('SIGCONT');
    peer.proc.kill('SIGKILL');
  });
  const l = await peer.waitFor((o) => !!o.listening);
  return { peer, uri: l.listening as string };
}

async function newSource(parameters: Partial<MigrationParameters>, capabilities: Record<string, boolean> = {}) {
  const side = await sourceSide(spec);
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters, capabilities });
  return { side, src, digests: side.devices.map((d) => d.mockInfo().digest) };
}

/** A migration that completes: the destination serves again after a failure. */
async function migratesAgain(t: { is(a: unknown, b: unknown, m?: string): void }, uri: string) {
  const { side, src } = await newSource({ 'downtime-limit': 2000 });
  const info = await src.migrate(uri);
  t.is(info.status, 'completed', 'the destination served the next migration');
  t.is(info.digests?.every((d) => d.match === true), true, 'digests match');
  await side.close();
}

test.serial('a silent partition during the switchover with switchover-abort: the source VM resumes within downtime-limit + switchover-limit; the destination resets and serves the next source', async (t) => {
  const ns = createNetns();
  t.teardown(() => ns.destroy());
  const { peer, uri } = await startDestinationPeer(t, { netns: ns.name, host: ns.nsIp });
  const bound = { 'downtime-limit': 1200, 'switchover-limit': 300 };
  const { side, src } = await newSource({ ...bound, 'peer-timeout': 3000 }, { 'switchover-abort': true });
  let aborted = false;
  src.on('MIGRATION', (d: { status: string }) => d.status === 'device' && ns.cut());
  src.on('SWITCHOVER_ABORT', () => (aborted = true));
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  t.is(err?.code, 'ERR_MIGRATION_SWITCHOVER_ABORTED', err?.message);
  t.true(aborted);
  t.true(side.vm.running, 'the VM runs on the source');
  const downtime = src.query().vmDowntimeOnAbortMs!;
  t.log(`vmDowntimeOnAbortMs ${downtime.toFixed(0)} for a bound of ${bound['downtime-limit'] + bound['switchover-limit']} ms`);
  t.true(downtime <= bound['downtime-limit'] + bound['switchover-limit'] + MARGIN_MS, `VM stopped ${downtime.toFixed(0)} ms`);
  for (const d of side.devices) t.is(await d.getState(), 'running');
  await side.close();
  // The destination hears nothing more: past the peer timeout it resets its devices and listens again.
  const r = (await peer.waitFor((o) => !!o.result, 10_000)).result as IncomingResult & { deviceStates: string[]; vmRunning: boolean };
  t.is(r.status, 'failed');
  t.regex(r.error!.code, /ERR_MIGRATION_(PEER_TIMEOUT|SWITCHOVER_ABORTED)/);
  t.false(r.vmRunning);
  t.deepEqual(r.deviceStates, ['running']);
  ns.heal();
  await migratesAgain(t, uri);
});

test.serial('a silent partition during the switchover without switchover-abort: the source fails before the commit within peer-timeout and resumes the VM', async (t) => {
  const ns = createNetns();
  t.teardown(() => ns.destroy());
  const { uri } = await startDestinationPeer(t, { netns: ns.name, host: ns.nsIp });
  const peerTimeoutMs = 1500;
  const { side, src } = await newSource({ 'downtime-limit': 2000, 'peer-timeout': peerTimeoutMs });
  let cutAt = 0;
  let committed = false;
  src.on('MIGRATION', (d: { status: string }) => {
    if (d.status !== 'device') return;
    ns.cut();
    cutAt = performance.now();
  });
  src.on('MIGRATION_COMMITTED', () => (committed = true));
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  const failedAfterMs = performance.now() - cutAt;
  t.is(err?.code, 'ERR_MIGRATION_PEER_TIMEOUT', err?.message);
  t.false(committed);
  t.true(side.vm.running);
  t.log(`failed ${failedAfterMs.toFixed(0)} ms after the cut; VM stopped ${src.query().vmDowntimeOnAbortMs?.toFixed(0)} ms; peer-timeout ${peerTimeoutMs} ms`);
  t.true(failedAfterMs <= peerTimeoutMs + MARGIN_MS);
  for (const d of side.devices) t.is(await d.getState(), 'running');
  await side.close();
});

test.serial('a destination stopped (SIGSTOP) during the switchover with switchover-abort: the VM resumes on the source within the bound while it is still stopped', async (t) => {
  const { peer, uri } = await startDestinationPeer(t);
  const bound = 1000;
  const { side, src } = await newSource({ 'downtime-limit': bound, 'peer-timeout': 5000 }, { 'switchover-abort': true });
  src.on('MIGRATION', (d: { status: string }) => d.status === 'device' && peer.proc.kill('SIGSTOP'));
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  t.is(err?.code, 'ERR_MIGRATION_SWITCHOVER_ABORTED', err?.message);
  const downtime = src.query().vmDowntimeOnAbortMs!;
  t.log(`vmDowntimeOnAbortMs ${downtime.toFixed(0)} for a bound of ${bound} ms (destination stopped)`);
  t.true(side.vm.running);
  t.true(downtime <= bound + MARGIN_MS, `VM stopped ${downtime.toFixed(0)} ms`);
  for (const d of side.devices) t.is(await d.getState(), 'running');
  await side.close();
  // Continued, the destination finds the source gone, resets and serves again.
  peer.proc.kill('SIGCONT');
  const r = (await peer.waitFor((o) => !!o.result, 10_000)).result as IncomingResult & { deviceStates: string[] };
  t.is(r.status, 'failed');
  t.deepEqual(r.deviceStates, ['running']);
  await migratesAgain(t, uri);
});

test.serial('a destination stopped (SIGSTOP) in precopy is detected within peer-timeout: the source rolls back', async (t) => {
  const { peer, uri } = await startDestinationPeer(t);
  const peerTimeoutMs = 1000;
  // downtime-limit 1 ms never converges: the migration stays in precopy.
  const { side, src } = await newSource({ 'downtime-limit': 1, 'peer-timeout': peerTimeoutMs });
  let stoppedAt = 0;
  src.on('MIGRATION_PASS', (p: { pass: number }) => {
    if (p.pass !== 2) return;
    peer.proc.kill('SIGSTOP');
    stoppedAt = performance.now();
  });
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  const detectedMs = performance.now() - stoppedAt;
  t.is(err?.code, 'ERR_MIGRATION_PEER_TIMEOUT', err?.message);
  t.log(`detected ${detectedMs.toFixed(0)} ms after SIGSTOP (peer-timeout ${peerTimeoutMs} ms)`);
  t.true(detectedMs <= peerTimeoutMs + MARGIN_MS);
  t.true(side.vm.running);
  for (const d of side.devices) t.is(await d.getState(), 'running');
  await side.close();
  peer.proc.kill('SIGCONT');
  const r = (await peer.waitFor((o) => !!o.result, 10_000)).result as IncomingResult & { deviceStates: string[] };
  t.is(r.status, 'failed');
  t.deepEqual(r.deviceStates, ['running']);
  await migratesAgain(t, uri);
});

test.serial('a source stopped (SIGSTOP) in precopy is detected by the destination within peer-timeout: it resets its devices and serves the next source', async (t) => {
  const dstSide = await sourceSide(spec);
  dstSide.vm.running = false;
  const dest = new MigrationDestination({ handlers: dstSide.handlers, vm: dstSide.vm });
  const uri = await dest.listen(`unix:/tmp/vfio-mig-live-${process.pid}-${++port}.sock`);
  t.teardown(() => dest.close());
  const results = dest.serve();
  // A generator runs while it is iterated: ask for the first result now.
  const firstResult = results.next();
  const peerTimeoutMs = 1000;
  const source = startPeer(['source', '--to', uri, '--spec', JSON.stringify(spec), '--source', JSON.stringify({ parameters: { 'downtime-limit': 1, 'peer-timeout': peerTimeoutMs } })]);
  t.teardown(() => {
    source.proc.kill('SIGCONT');
    source.proc.kill('SIGKILL');
  });
  await source.waitFor((o) => o.event === 'MIGRATION_PASS' && (o.data as { pass: number }).pass === 2);
  source.proc.kill('SIGSTOP');
  const stoppedAt = performance.now();
  const first = await firstResult;
  const detectedMs = performance.now() - stoppedAt;
  t.false(first.done);
  const r = first.value as IncomingResult;
  t.is(r.status, 'failed');
  t.is(r.error?.code, 'ERR_MIGRATION_PEER_TIMEOUT', r.error?.message);
  t.log(`the destination gave up ${detectedMs.toFixed(0)} ms after SIGSTOP of the source (peer-timeout ${peerTimeoutMs} ms)`);
  t.true(detectedMs <= peerTimeoutMs + MARGIN_MS);
  t.false(dstSide.vm.running);
  for (const d of dstSide.devices) t.is(await d.getState(), 'running', 'reset after the failure');
  source.proc.kill('SIGKILL');
  // The next source is served.
  const { side, src } = await newSource({ 'downtime-limit': 2000 });
  const [info, second] = await Promise.all([src.migrate(uri), results.next()]);
  t.is(info.status, 'completed');
  t.is((second.value as IncomingResult).status, 'completed');
  await side.close();
  await dest.close();
  t.true((await results.next()).done, 'serve() ends with close()');
  await dstSide.close();
});

test.serial('a silent partition in precopy: both sides give up within peer-timeout; the destination serves again once the link is back', async (t) => {
  const ns = createNetns();
  t.teardown(() => ns.destroy());
  const { peer, uri } = await startDestinationPeer(t, { netns: ns.name, host: ns.nsIp });
  const peerTimeoutMs = 1000;
  const { side, src } = await newSource({ 'downtime-limit': 1, 'peer-timeout': peerTimeoutMs });
  let cutAt = 0;
  src.on('MIGRATION_PASS', (p: { pass: number }) => {
    if (p.pass !== 2) return;
    ns.cut();
    cutAt = performance.now();
  });
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  const sourceMs = performance.now() - cutAt;
  t.is(err?.code, 'ERR_MIGRATION_PEER_TIMEOUT', err?.message);
  t.true(side.vm.running);
  for (const d of side.devices) t.is(await d.getState(), 'running');
  await side.close();
  const r = (await peer.waitFor((o) => !!o.result, 10_000)).result as IncomingResult & { deviceStates: string[] };
  const destinationMs = performance.now() - cutAt;
  t.log(`source gave up ${sourceMs.toFixed(0)} ms, destination by ${destinationMs.toFixed(0)} ms after the cut (peer-timeout ${peerTimeoutMs} ms)`);
  t.true(sourceMs <= peerTimeoutMs + MARGIN_MS);
  t.true(destinationMs <= peerTimeoutMs + MARGIN_MS);
  t.is(r.error?.code, 'ERR_MIGRATION_PEER_TIMEOUT');
  t.deepEqual(r.deviceStates, ['running']);
  ns.heal();
  await sleep(50);
  await migratesAgain(t, uri);
});

test.serial('a destination that loads slowly but lives is waited for (its heartbeats go on); stopped while loading, it is given up within peer-timeout before the commit', async (t) => {
  // The destination's resuming -> stop arc takes 2.5 s: 2.5 peer timeouts of a live but busy peer.
  const slowLoad = { default: 2, 'resuming>stop': 2500 };
  const live = await startDestinationPeer(t, { arcLatencyMs: slowLoad });
  const a = await newSource({ 'downtime-limit': 5000, 'peer-timeout': 1000 });
  const info = await a.src.migrate(live.uri);
  t.is(info.status, 'completed', 'a busy destination is not a dead one');
  await a.side.close();

  const stopped = await startDestinationPeer(t, { arcLatencyMs: slowLoad });
  const b = await newSource({ 'downtime-limit': 5000, 'peer-timeout': 1000 });
  let stoppedAt = 0;
  let committed = false;
  // The source's devices reach STOP only after the stream; by then the destination is in its slow arc.
  b.src.on('VFIO_MIGRATION', (e: { state: string }) => {
    if (e.state !== 'stop-copy' || stoppedAt) return;
    setTimeout(() => {
      stopped.peer.proc.kill('SIGSTOP');
      stoppedAt = performance.now();
    }, 500);
  });
  b.src.on('MIGRATION_COMMITTED', () => (committed = true));
  const err = await t.throwsAsync(b.src.migrate(stopped.uri), { instanceOf: MigrationError });
  const detectedMs = performance.now() - stoppedAt;
  t.is(err?.code, 'ERR_MIGRATION_PEER_TIMEOUT', err?.message);
  t.false(committed);
  t.true(stoppedAt > 0 && detectedMs <= 1000 + MARGIN_MS, `detected ${detectedMs.toFixed(0)} ms after SIGSTOP`);
  t.true(b.side.vm.running);
  for (const d of b.side.devices) t.is(await d.getState(), 'running');
  await b.side.close();
});

test.serial('a destination stopped right after the commit: the source gives up within peer-timeout with ERR_MIGRATION_OUTCOME_UNKNOWN and leaves the VM stopped', async (t) => {
  // Slow resume arcs on the destination: the stop lands before it could report running.
  const { peer, uri } = await startDestinationPeer(t, { arcLatencyMs: { default: 2, 'stop>running-p2p': 500 } });
  const { side, src } = await newSource({ 'downtime-limit': 2000, 'peer-timeout': 1000 });
  let stoppedAt = 0;
  // Stopped once the destination is past the commit: its second running-p2p
  // prepare event (the first is on its way into resuming; the second, into
  // stop -> running-p2p, comes only after it read Commit). Stopped on the
  // source's MIGRATION_COMMITTED it could still hold the Commit unread, and
  // then rightly not run the VM (1 run in 3 of the suite failed that way).
  const isPrepare = (o: Record<string, unknown>) => o.event === 'VFIO_MIGRATION' && (o.data as { state?: string } | undefined)?.state === 'running-p2p-prepare';
  void peer
    .waitFor((o) => isPrepare(o) && peer.lines.filter(isPrepare).length >= 2, 20_000)
    .then(() => {
      peer.proc.kill('SIGSTOP');
      stoppedAt = performance.now();
    });
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  const detectedMs = performance.now() - stoppedAt;
  t.is(err?.code, 'ERR_MIGRATION_OUTCOME_UNKNOWN', err?.message);
  t.regex(err!.message, /sent nothing for/);
  t.true(detectedMs <= 1000 + MARGIN_MS, `gave up ${detectedMs.toFixed(0)} ms after SIGSTOP`);
  t.false(side.vm.running, 'the VM may run on the destination: it stays stopped here');
  // Continued, the destination runs the VM: the source was right not to resume it.
  peer.proc.kill('SIGCONT');
  const r = (await peer.waitFor((o) => !!o.result, 10_000)).result as IncomingResult & { vmRunning: boolean };
  t.is(r.status, 'completed');
  t.true(r.vmRunning);
  await side.close();
});
