// Migrating: a destination and a source, each in its own process, with a mock
// NIC VF (the same code drives a real device: VfioDevice.openKernel()).
// Run: node examples/migrate.mjs            (starts the destination as a child process)
//  or: node examples/migrate.mjs incoming unix:/tmp/m.sock   and, elsewhere,
//      node examples/migrate.mjs migrate unix:/tmp/m.sock
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { MigrationDestination, MigrationSource, VfioHandler, describeError } from 'vfio-migration';
import { openMockDevice } from 'vfio-migration/testing';

/**
 * Your VMM's vCPU hooks: stop and resume the guest, and say whether it runs.
 * @param {boolean} running
 */
function vmHooks(running) {
  return {
    running,
    async stop() {
      this.running = false; // pause the vCPUs here
    },
    async resume() {
      this.running = true; // run the vCPUs here
    },
  };
}

/** @param {string} uri */
async function incoming(uri) {
  const dstDev = await openMockDevice({ profile: 'nic-vf', seed: 2 });
  const dest = new MigrationDestination({ handlers: [new VfioHandler(dstDev)], vm: vmHooks(false) });
  try {
    const bound = await dest.listen(uri); // tcp:0.0.0.0:4444, tcp:host:0 (a free port), unix:/path
    console.log(JSON.stringify({ listening: bound }));
    const result = await dest.incoming(); // one migration
    console.log(`destination: ${result.status}, downtime ${result.downtimeMs?.toFixed(1)} ms`);
  } finally {
    await dest.close();
    await dstDev.close();
  }
}

/** @param {string} uri */
async function migrate(uri) {
  const srcDev = await openMockDevice({ profile: 'nic-vf', seed: 1 });
  const vm = vmHooks(true);
  const src = new MigrationSource({
    handlers: [new VfioHandler(srcDev)], // or your own StateHandler (guest RAM, ...)
    vm,
    capabilities: { 'switchover-ack': true },
    parameters: { 'downtime-limit': 300 },
  });
  // Per device state change; `pre-copy-p2p-prepare` comes before the slow P2P arcs.
  src.on('VFIO_MIGRATION', (e) => console.log(`source: ${e.device} ${e.state}`));
  // A management app's choice when the migration cannot meet the limit: raise it (or src.cancel()).
  src.on('MIGRATION_STALLED', (e) => src.setParameters({ 'downtime-limit': e.suggestedDowntimeLimitMs }));
  try {
    const info = await src.migrate(uri, { channels: 2 });
    const digestsMatch = (info.digests ?? []).every((d) => d.match !== false);
    console.log(`source: ${info.status}, downtime ${info.downtimeMs?.toFixed(1)} ms, VM running here: ${vm.running}, digests ${digestsMatch ? 'match' : 'DIFFER'}`);
    return info.status === 'completed' && digestsMatch && !vm.running;
  } catch (err) {
    // A MigrationError: its code (ERR_MIGRATION_*) says what failed; the VM runs here
    // again, except after ERR_MIGRATION_OUTCOME_UNKNOWN (then see src.resumeOnSource()).
    const { code, message } = describeError(err);
    console.error(`source: ${code}: ${message}; VM running here: ${vm.running}`);
    return false;
  } finally {
    await srcDev.close();
  }
}

const [role, uri] = process.argv.slice(2);
if (role === 'incoming') await incoming(uri ?? 'tcp:127.0.0.1:4444');
else if (role === 'migrate') process.exitCode = (await migrate(uri ?? 'tcp:127.0.0.1:4444')) ? 0 : 1;
else {
  // Both ends, as two processes on this host: the destination first, then migrate to where it listens.
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), 'incoming', 'tcp:127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  const listening = await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      for (const line of out.split('\n')) if (line.startsWith('{"listening"')) resolve(JSON.parse(line).listening);
    });
    child.once('exit', (code) => reject(new Error(`the destination exited (${code}) before listening`)));
  });
  child.stdout.pipe(process.stdout);
  const ok = await migrate(listening);
  process.exitCode = ok && (await exited) === 0 ? 0 : 1;
}
