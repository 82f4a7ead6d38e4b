// One end of a migration in its own process, for fault tests that stop a
// process (SIGSTOP) or cut its network namespace off. Prints JSON lines:
// {listening}, {event}, {result} (one per migration; a destination serves
// until killed), {error}.
//   node dist/test/peer-process.js destination --listen <uri> --spec <json> [--options <json>]
//   node dist/test/peer-process.js source --to <uri> --spec <json> [--source <json>] [--channels <n>]
import { parseArgs } from 'node:util';
import { MigrationDestination } from '../src/migration/destination.js';
import { MigrationSource } from '../src/migration/source.js';
import { describeError } from '../src/migration/errors.js';
import { sourceSide } from './harness.js';
import { openFdCount } from './helpers.js';

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: { listen: { type: 'string' }, to: { type: 'string' }, spec: { type: 'string' }, options: { type: 'string' }, source: { type: 'string' }, channels: { type: 'string' } },
});
const print = (o: unknown) => process.stdout.write(`${JSON.stringify(o)}\n`);
const spec = JSON.parse(values.spec ?? '{}');
// The same devices as a source side: a destination loads them from its own mocks (same profiles and seeds).
const side = await sourceSide(spec);

if (positionals[0] === 'destination') {
  // The VM runs on the source until a migration completes.
  side.vm.running = false;
  const dest = new MigrationDestination({ handlers: side.handlers, vm: side.vm, ...JSON.parse(values.options ?? '{}') });
  dest.on('event', (r) => print(r));
  const uri = await dest.listen(values.listen!);
  const fdsAtStart = openFdCount();
  print({ listening: uri });
  for await (const result of dest.serve()) {
    const states = await Promise.all(side.devices.map((d) => d.getState().catch(() => 'unknown')));
    print({ result: { ...result, vmRunning: side.vm.running, deviceStates: states, fdsAtStart, fdsNow: openFdCount() } });
  }
} else if (positionals[0] === 'source') {
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, ...JSON.parse(values.source ?? '{}') });
  src.on('event', (r) => print(r));
  let error: unknown = null;
  try {
    await src.migrate(values.to!, { channels: Number(values.channels ?? 1) });
  } catch (err) {
    error = describeError(err);
  }
  print({ result: { ...src.query(), error, vmRunning: side.vm.running } });
  await side.close();
} else {
  process.stderr.write('usage: peer-process.js destination|source ...\n');
  process.exit(2);
}
