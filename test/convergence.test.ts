// Convergence a user can live with: paced passes, a stall reported while it
// lasts, and a dynamic limit that ramps toward its ceiling until the
// migration converges. Real processes: the destination is the CLI's incoming.
import test from 'ava';
import { MigrationSource } from '../src/migration/source.js';
import type { MigrationEventRecord } from '../src/migration/events.js';
import { deviceArgs, sourceSide, startDestination } from './harness.js';

const MiB = 1 << 20;
// The README's CLI example: two NIC VFs (400 ms P2P quiesce) and 256 MiB of RAM, no arc history.
const spec = { mock: [['nic-vf', 2]] as [string, number][], ram: { sizeBytes: 256 * MiB } };

test.serial('a migration that cannot converge paces its passes and keeps reporting the stall while it lasts', async (t) => {
  const dest = await startDestination(deviceArgs(spec));
  const side = await sourceSide(spec);
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: { 'downtime-limit': 100 } });
  const events: MigrationEventRecord[] = [];
  src.on('event', (r) => events.push(r));
  const runMs = 11_000;
  let activeAt = 0;
  src.on('MIGRATION', (d) => {
    if (d.status === 'active') {
      activeAt = performance.now();
      setTimeout(() => src.cancel('test over'), runMs);
    }
  });
  await t.throwsAsync(src.migrate(dest.uri, { channels: 2 }), { code: 'ERR_MIGRATION_CANCELLED' });
  const elapsedMs = performance.now() - activeAt;
  const passes = events.filter((e) => e.event === 'MIGRATION_PASS').length;
  const stalls = events.filter((e) => e.event === 'MIGRATION_STALLED');
  t.log(`${passes} passes in ${elapsedMs.toFixed(0)} ms (${((passes / elapsedMs) * 1000).toFixed(1)}/s), ${stalls.length} stall reports`);
  // Unpaced, this loop ran ~126 passes/s; a pass with little to send now waits out a 100 ms window.
  t.true(passes / (elapsedMs / 1000) <= 25, `${passes} passes`);
  t.true(stalls.length >= 2, 'the stall is reported again while it lasts');
  for (let i = 1; i < stalls.length; i++) t.true(stalls[i]!.timestamp - stalls[i - 1]!.timestamp >= 4000, 'rate-limited');
  t.regex((stalls[0]!.data as { message: string }).message, /raise downtime-limit to \d+ ms/);
  t.true(side.vm.running);
  await dest.exitCode;
  await side.close();
});

test.serial('the dynamic limit ramps from downtime-limit toward its ceiling, one step per stall, until the migration converges', async (t) => {
  const dest = await startDestination(deviceArgs(spec));
  const side = await sourceSide(spec);
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: { 'downtime-limit': 150, 'x-downtime-limit-ceiling': 1350, 'stall-iterations': 5 } });
  const events: MigrationEventRecord[] = [];
  src.on('event', (r) => events.push(r));
  const timer = setTimeout(() => src.cancel('did not converge in 60 s'), 60_000);
  const info = await src.migrate(dest.uri, { channels: 2 });
  clearTimeout(timer);
  const limits = events.filter((e) => e.event === 'MIGRATION_PASS').map((e) => (e.data as { downtimeLimitMs: number }).downtimeLimitMs);
  const steps = [...new Set(limits)];
  t.log(`limit in force: ${steps.join(' -> ')} ms; downtime ${info.downtimeMs!.toFixed(0)} ms; ${info.expectedDowntime!.summary}`);
  t.is(info.status, 'completed');
  t.is(steps[0], 150);
  t.true(steps.length >= 2, 'the limit ramped');
  for (let i = 1; i < steps.length; i++) t.is(steps[i]! - steps[i - 1]!, 300, 'steps of (ceiling - limit) / 4');
  t.true(steps.at(-1)! <= 1350);
  t.is(info.downtimeLimitInForceMs, steps.at(-1)!);
  const stalls = events.filter((e) => e.event === 'MIGRATION_STALLED').map((e) => (e.data as { message: string }).message);
  t.true(stalls.some((m) => /dynamic limit in force rises to \d+ ms/.test(m)), stalls.join('\n'));
  const exceeded = events.some((e) => e.event === 'MIGRATION_WARNING' && (e.data as { data?: { kind?: string } }).data?.kind === 'downtime-exceeded');
  t.is(exceeded, info.downtimeMs! > info.downtimeLimitInForceMs, 'a broken promise is reported exactly when it happens');
  for (const d of info.digests!) t.true(d.match === true);
  await dest.exitCode;
  await side.close();
});
