// One end of a migration in its own process, for the fault matrix
// (scripts/fault-matrix.ts). Like the CLI's `migrate` / `incoming --json`
// (same exit codes, SIGTERM cancels), plus what the matrix checks: mock
// device digests before and after, fd and socket counts with the devices
// open and after they closed, and marks when a phase's handler call starts.
// Prints one JSON object per line:
//   {hello}, {ready} or {listening}, {event...}, {mark}, {result}, {settled}, {decision}, {final}
//   node dist/scripts/fault-peer.js source --to <uri> --spec <json> [--source <json>]
//   node dist/scripts/fault-peer.js destination --listen <uri> --spec <json> [--options <json>]
// After ERR_MIGRATION_OUTCOME_UNKNOWN the source waits for a line on stdin:
// "resume" (the management app knows the destination does not run the VM:
// resumeOnSource()) or "leave" (it does: the VM stays stopped here).
import { parseArgs } from 'node:util';
import { readdirSync, readlinkSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { VfioDevice } from '../src/vfio/device.js';
import type { MockProfileInput } from '../src/vfio/mock-profile.js';
import { VfioHandler } from '../src/migration/vfio-handler.js';
import type { HandlerContext } from '../src/migration/handler.js';
import { SyntheticVm } from '../src/migration/vm.js';
import { MigrationSource, type MigrationInfo } from '../src/migration/source.js';
import { MigrationDestination } from '../src/migration/destination.js';
import { describeError } from '../src/migration/errors.js';
import { openMockDevice } from '../src/vfio/mock.js';

export interface PeerSpec {
  /** [profile, count] pairs, opened in order (both ends list the same). */
  mock: [string, number][];
  overrides?: Partial<MockProfileInput>;
}

export interface FdCounts {
  fds: number;
  sockets: number;
}

/** Open fds and sockets of this process (libuv's /dev/null EMFILE reserve left out, as the CLI does). */
export function fdCounts(): FdCounts {
  let fds = 0;
  let sockets = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    let target: string;
    try {
      target = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue; // the directory fd of this very listing
    }
    if (target === '/dev/null') continue;
    fds++;
    if (target.startsWith('socket:')) sockets++;
  }
  return { fds, sockets };
}

const print = (o: unknown) => process.stdout.write(`${JSON.stringify(o)}\n`);

/** A VfioHandler that says when each phase's call starts: the matrix injects its fault from there. */
class MarkedHandler extends VfioHandler {
  #mark(name: string) {
    print({ mark: name, device: this.device.id, timestamp: performance.timeOrigin + performance.now() });
  }
  override async saveSetup(ctx: HandlerContext) {
    this.#mark('saveSetup');
    return super.saveSetup(ctx);
  }
  override async saveQuiesce(ctx: HandlerContext) {
    this.#mark('saveQuiesce');
    return super.saveQuiesce(ctx);
  }
  override async saveStop(ctx: HandlerContext) {
    this.#mark('saveStop');
    return super.saveStop(ctx);
  }
  override async saveComplete(out: Parameters<VfioHandler['saveComplete']>[0]) {
    this.#mark('saveComplete');
    return super.saveComplete(out);
  }
  override async loadSetup(ctx: HandlerContext) {
    this.#mark('loadSetup');
    return super.loadSetup(ctx);
  }
  override async loadFinish(ctx: HandlerContext) {
    this.#mark('loadFinish');
    return super.loadFinish(ctx);
  }
  override async loadResumeP2P(ctx: HandlerContext) {
    this.#mark('loadResumeP2P');
    return super.loadResumeP2P(ctx);
  }
}

async function openDevices(spec: PeerSpec, seedBase: number): Promise<VfioDevice[]> {
  const devices: VfioDevice[] = [];
  let seed = seedBase;
  for (const [profile, count] of spec.mock)
    for (let i = 0; i < count; i++) devices.push(await openMockDevice({ profile, overrides: spec.overrides, seed: seed++, id: `${profile}-${devices.length}` }));
  return devices;
}

async function deviceReport(devices: VfioDevice[]) {
  return {
    states: await Promise.all(devices.map((d) => d.getState().catch(() => 'unknown'))),
    deviceDigests: devices.map((d) => d.mockInfo().digest),
  };
}

/** Sockets of a finished migration close shortly after (a destination lingers up to 2 s for the source to read its report). */
async function settle(baseline: FdCounts, maxMs: number): Promise<FdCounts> {
  const until = performance.now() + maxMs;
  let now = fdCounts();
  while ((now.sockets > baseline.sockets || now.fds > baseline.fds) && performance.now() < until) {
    await sleep(25);
    now = fdCounts();
  }
  return now;
}

async function runSource(values: Record<string, string | undefined>): Promise<number> {
  const base = fdCounts();
  const spec = JSON.parse(values.spec!) as PeerSpec;
  const opts = JSON.parse(values.source ?? '{}') as { capabilities?: Record<string, boolean>; parameters?: Record<string, number>; channels?: number; timeoutMs?: number };
  const devices = await openDevices(spec, 1);
  const vm = new SyntheticVm(true);
  const src = new MigrationSource({ handlers: devices.map((d) => new MarkedHandler(d)), vm, capabilities: opts.capabilities, parameters: opts.parameters });
  src.on('event', (r) => print(r));
  const before = { ...(await deviceReport(devices)), ...fdCounts() };
  print({ ready: { pid: process.pid, base, ...before } });
  let signal: string | null = null;
  const onSignal = (s: NodeJS.Signals) => {
    signal = s;
    src.cancel(`interrupted by ${s}`);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  const deadline = opts.timeoutMs ? setTimeout(() => src.cancel(`did not complete within ${opts.timeoutMs} ms`), opts.timeoutMs) : null;
  let code = 0;
  let info: MigrationInfo;
  try {
    info = await src.migrate(values.to!, { channels: opts.channels ?? 1 });
  } catch (err) {
    code = describeError(err).code === 'ERR_MIGRATION_OUTCOME_UNKNOWN' ? 3 : 1;
    info = src.query();
  }
  if (deadline) clearTimeout(deadline);
  if (signal && code === 1) code = signal === 'SIGINT' ? 130 : 143;
  const { devices: _devices, ...rest } = info;
  void _devices;
  print({ result: { ...rest, vmRunning: vm.running, exitCode: code, ...(await deviceReport(devices)) } });
  if (code === 3) {
    // The management app's decision: only it knows whether the destination runs the VM.
    const line = await new Promise<string>((resolve) => {
      const rl = createInterface({ input: process.stdin });
      rl.once('line', (l) => {
        resolve(l.trim()); // before close(), which emits 'close' at once
        rl.close();
      });
      rl.once('close', () => resolve('leave'));
    });
    let error: unknown = null;
    if (line === 'resume') await src.resumeOnSource().catch((err) => (error = describeError(err)));
    print({ decision: { action: line, error, vmRunning: vm.running, ...(await deviceReport(devices)) } });
  }
  const after = await settle(before, 1000);
  await Promise.all(devices.map((d) => d.close()));
  print({ final: { before: { fds: before.fds, sockets: before.sockets }, after, base, end: fdCounts() } });
  return code;
}

async function runDestination(values: Record<string, string | undefined>): Promise<number> {
  const base = fdCounts();
  const spec = JSON.parse(values.spec!) as PeerSpec;
  const devices = await openDevices(spec, 1000);
  const vm = new SyntheticVm(false);
  const dest = new MigrationDestination({ handlers: devices.map((d) => new MarkedHandler(d)), vm, ...JSON.parse(values.options ?? '{}') });
  dest.on('event', (r) => print(r));
  const uri = await dest.listen(values.listen!);
  const listening = fdCounts();
  print({ listening: uri, pid: process.pid, base, ...listening, ...(await deviceReport(devices)) });
  const stop = () => void dest.close();
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  let code = 1;
  for await (const r of dest.serve()) {
    const loaded = devices.map((d) => d.mockInfo().loadedDigest);
    print({ result: { ...r, vmRunning: vm.running, loadedDigests: loaded, ...(await deviceReport(devices)) } });
    print({ settled: await settle(listening, 3000) });
    // As the CLI's incoming: done once a migration completed (the VM runs here).
    if (r.status === 'completed') {
      code = 0;
      break;
    }
  }
  await dest.close();
  await Promise.all(devices.map((d) => d.close()));
  print({ final: { base, end: fdCounts() } });
  return code;
}

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: { listen: { type: 'string' }, to: { type: 'string' }, spec: { type: 'string' }, options: { type: 'string' }, source: { type: 'string' } },
});
const run = positionals[0] === 'source' ? runSource : positionals[0] === 'destination' ? runDestination : null;
if (!run) {
  process.stderr.write('usage: fault-peer.js source|destination ...\n');
  process.exit(2);
}
run(values).then(
  (code) => process.exit(code),
  (err) => {
    const e = describeError(err);
    process.stderr.write(`fault-peer: ${e.code}: ${e.message}\n`);
    process.exit(1);
  },
);
