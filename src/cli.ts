#!/usr/bin/env node
// vfio-migrate: the command line. `incoming` and `migrate` are the two ends
// of a migration; `demo` (npm start) runs both as separate processes over
// loopback with mock devices and shows the migration live.
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { readdirSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VfioDevice } from './vfio/device.js';
import { listProfiles, type MockProfileInput } from './vfio/mock-profile.js';
import { runConformance } from './vfio/conformance.js';
import { VfioHandler, exportArcHistory, importArcHistory } from './migration/vfio-handler.js';
import { RamHandler } from './migration/ram-handler.js';
import { SyntheticVm } from './migration/vm.js';
import { MigrationSource, type MigrationInfo } from './migration/source.js';
import { MigrationDestination } from './migration/destination.js';
import { type MigrationError, describeError } from './migration/errors.js';
import { parseByteSize } from './vfio/mock-profile.js';
import type { StateHandler } from './migration/handler.js';
import { onJsonLines } from './json-lines.js';

const USAGE = `usage:
  vfio-migrate incoming --listen <tcp:host:port|unix:path> [devices] [--json]
  vfio-migrate migrate --to <tcp:host:port|unix:path> [devices] [--channels N]
               [--cap name=on|off]... [--param name=value]... [--json]
               [--on-stall wait|raise|cancel] [--timeout-ms N]
  vfio-migrate demo [devices]
  vfio-migrate conformance (--mock <profile> | --device <path> --peer <path>)
  vfio-migrate profiles

devices (both ends must list the same devices in the same order):
  --mock <profile>[:count]      mock devices of a shipped profile or a profile file (repeatable)
  --mock-overrides <json>       profile fields that replace the profile's for every mock device
  --device <path>               a real VFIO device: /dev/vfio/devices/vfioN, sysfs path or name (repeatable)
  --via <auto|cdev|group>       how to open real devices
  --ram <size>                  synthetic guest RAM (e.g. 256MiB)
  --ram-dirty <size>            bytes/s the running VM dirties
  --ram-working-set <size>      the part of RAM it keeps dirtying
  --seed <n>                    seed of mock content (default: 1 on the source, 1000 on the destination)
  --arc-history <file|none>     where device arc latencies learned in earlier migrations are kept
                                (default: $XDG_CACHE_HOME/vfio-migration/arc-history.json)
`;

class UsageError extends Error {}

const options = {
  listen: { type: 'string' },
  to: { type: 'string' },
  mock: { type: 'string', multiple: true },
  'mock-overrides': { type: 'string' },
  device: { type: 'string', multiple: true },
  peer: { type: 'string' },
  via: { type: 'string' },
  ram: { type: 'string' },
  'ram-dirty': { type: 'string' },
  'ram-working-set': { type: 'string' },
  seed: { type: 'string' },
  channels: { type: 'string' },
  cap: { type: 'string', multiple: true },
  param: { type: 'string', multiple: true },
  json: { type: 'boolean' },
  'progress-ms': { type: 'string' },
  'on-stall': { type: 'string' },
  'timeout-ms': { type: 'string' },
  'arc-history': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

type Values = ReturnType<typeof parseArgs<{ options: typeof options; allowPositionals: true }>>['values'];

/**
 * Open fds of this process, for leak checks. /dev/null is left out: libuv
 * keeps one open as its EMFILE reserve from the first listen() on.
 */
export function openFdCount(): number {
  try {
    return readdirSync('/proc/self/fd').filter((fd) => {
      try {
        return readlinkSync(`/proc/self/fd/${fd}`) !== '/dev/null';
      } catch {
        return false; // the directory fd of this very listing
      }
    }).length;
  } catch {
    return -1;
  }
}

function bytesOption(v: Values, name: 'ram' | 'ram-dirty' | 'ram-working-set'): number | undefined {
  const raw = v[name];
  if (raw === undefined) return undefined;
  try {
    return parseByteSize(raw, 'command line', `--${name}`);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

/** The arc history file (device models' arc latencies, learned across migrations), or null. */
function arcHistoryPath(v: Values): string | null {
  const given = v['arc-history'];
  if (given === 'none' || given === '') return null;
  if (given) return given;
  const cache = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(cache, 'vfio-migration', 'arc-history.json');
}

async function loadArcHistory(file: string | null): Promise<void> {
  if (!file) return;
  try {
    importArcHistory(JSON.parse(await readFile(file, 'utf8')) as Record<string, Record<string, number>>);
  } catch {
    /* no history yet, or unreadable: start from nothing */
  }
}

async function saveArcHistory(file: string | null): Promise<void> {
  if (!file) return;
  try {
    await mkdir(path.dirname(file), { recursive: true });
    // Merge with what another process (the other end, on this host) saved meanwhile; ours is newer.
    let onDisk: Record<string, Record<string, number>> = {};
    try {
      onDisk = JSON.parse(await readFile(file, 'utf8')) as Record<string, Record<string, number>>;
    } catch {
      /* nothing saved yet */
    }
    const merged = { ...onDisk };
    for (const [model, arcs] of Object.entries(exportArcHistory())) merged[model] = { ...(onDisk[model] ?? {}), ...arcs };
    const tmp = `${file}.${process.pid}.tmp`;
    await writeFile(tmp, `${JSON.stringify(merged, null, 1)}\n`);
    await rename(tmp, file);
  } catch (err) {
    console.error(`vfio-migrate: could not save the arc history to ${file}: ${(err as Error).message}`);
  }
}

interface Setup {
  handlers: StateHandler[];
  devices: VfioDevice[];
  vm: SyntheticVm;
}

async function openDevices(v: Values, role: 'source' | 'destination'): Promise<Setup> {
  const vm = new SyntheticVm(role === 'source');
  const devices: VfioDevice[] = [];
  const handlers: StateHandler[] = [];
  let overrides: Partial<MockProfileInput> = {};
  if (v['mock-overrides']) {
    try {
      overrides = JSON.parse(v['mock-overrides']) as Partial<MockProfileInput>;
    } catch {
      throw new UsageError('--mock-overrides must be a JSON object');
    }
  }
  const ram = bytesOption(v, 'ram');
  if (ram) handlers.push(new RamHandler({ sizeBytes: ram, dirtyBytesPerSec: bytesOption(v, 'ram-dirty') ?? 0, workingSetBytes: bytesOption(v, 'ram-working-set'), seed: role === 'source' ? 7 : 8, vm }));
  let seed = Number(v.seed ?? (role === 'source' ? 1 : 1000));
  try {
    for (const spec of v.mock ?? []) {
      const m = /^(.*?)(?::(\d+))?$/.exec(spec)!;
      const count = Number(m[2] ?? 1);
      if (!m[1] || count < 1 || count > 256) throw new UsageError(`--mock ${spec}: expected <profile>[:count] with a count of 1-256`);
      for (let i = 0; i < count; i++) {
        const dev = await VfioDevice.openMock({ profile: m[1], overrides, seed: seed, id: `${m[1].replace(/.*\//, '').replace(/\.json$/, '')}-${devices.length}` });
        seed++;
        devices.push(dev);
      }
    }
    for (const path of v.device ?? []) devices.push(await VfioDevice.openKernel({ path, via: (v.via ?? 'auto') as 'auto' }));
  } catch (err) {
    await Promise.all(devices.map((d) => d.close()));
    throw err;
  }
  handlers.push(...devices.map((d) => new VfioHandler(d)));
  if (handlers.length === 0) throw new UsageError('no devices: give --mock, --device or --ram');
  return { handlers, devices, vm };
}

function parseKeyValues(list: string[] | undefined, what: string, parse: (value: string) => unknown): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const item of list ?? []) {
    const i = item.indexOf('=');
    if (i <= 0) throw new UsageError(`--${what} ${item}: expected name=value`);
    out[item.slice(0, i)] = parse(item.slice(i + 1));
  }
  return out;
}

function print(json: boolean, value: unknown, text?: string): void {
  if (json) process.stdout.write(`${JSON.stringify(value)}\n`);
  else if (text) console.log(text);
}

async function cmdIncoming(v: Values): Promise<number> {
  if (!v.listen) throw new UsageError('incoming needs --listen <uri>');
  const fdsAtStart = openFdCount();
  const history = arcHistoryPath(v);
  await loadArcHistory(history);
  const setup = await openDevices(v, 'destination');
  const dest = new MigrationDestination({ handlers: setup.handlers, vm: setup.vm });
  dest.on('event', (r) => print(!!v.json, r, `${r.event} ${JSON.stringify(r.data)}`));
  let code = 0;
  let result: unknown;
  try {
    const uri = await dest.listen(v.listen);
    print(!!v.json, { listening: uri }, `listening on ${uri}`);
    result = await dest.incoming();
  } catch (err) {
    code = 1;
    result = (err as { result?: unknown }).result ?? { error: describeError(err) };
  } finally {
    await dest.close();
    await Promise.all(setup.devices.map((d) => d.close()));
    await saveArcHistory(history);
  }
  print(!!v.json, { result: { ...(result as object), fdsAtStart, fdsAtEnd: openFdCount() } }, `result: ${JSON.stringify(result)}`);
  return code;
}

async function cmdMigrate(v: Values): Promise<number> {
  if (!v.to) throw new UsageError('migrate needs --to <uri>');
  const channels = v.channels === undefined ? 1 : Number(v.channels);
  const capabilities = parseKeyValues(v.cap, 'cap', (s) => (s === 'on' || s === 'true' ? true : s === 'off' || s === 'false' ? false : s));
  const parameters = parseKeyValues(v.param, 'param', (s) => (/^-?\d+(\.\d+)?$/.test(s) ? Number(s) : s));
  const fdsAtStart = openFdCount();
  const history = arcHistoryPath(v);
  await loadArcHistory(history);
  const setup = await openDevices(v, 'source');
  let src: MigrationSource;
  try {
    src = new MigrationSource({ handlers: setup.handlers, vm: setup.vm, capabilities, parameters });
  } catch (err) {
    await Promise.all(setup.devices.map((d) => d.close()));
    throw err;
  }
  src.on('event', (r) => print(!!v.json, r, `${r.event} ${JSON.stringify(r.data)}`));
  const progressMs = Number(v['progress-ms'] ?? 0);
  const timer = progressMs > 0 ? setInterval(() => print(!!v.json, { progress: src.query() }), progressMs) : null;
  const onStall = v['on-stall'] ?? 'wait';
  if (!['wait', 'raise', 'cancel'].includes(onStall)) throw new UsageError('--on-stall must be wait, raise or cancel');
  // What a management app does with a stall: raise downtime-limit to the suggested value, or give up.
  src.on('MIGRATION_STALLED', (d: { suggestedDowntimeLimitMs: number }) => {
    if (onStall === 'raise') {
      src.setParameters({ 'downtime-limit': d.suggestedDowntimeLimitMs });
      print(!!v.json, { action: 'downtime-limit raised', downtimeLimitMs: d.suggestedDowntimeLimitMs }, `stalled: downtime-limit raised to ${d.suggestedDowntimeLimitMs} ms`);
    } else if (onStall === 'cancel') src.cancel('stalled');
  });
  const timeoutMs = Number(v['timeout-ms'] ?? 0);
  const deadline = timeoutMs > 0 ? setTimeout(() => src.cancel(`did not complete within ${timeoutMs} ms`), timeoutMs) : null;
  const onSignal = () => src.cancel('interrupted by a signal');
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let code = 0;
  let info: MigrationInfo;
  try {
    info = await src.migrate(v.to, { channels });
  } catch (err) {
    // 3: the destination may be running the VM; this side stays stopped (see resumeOnSource()).
    code = (err as MigrationError).code === 'ERR_MIGRATION_OUTCOME_UNKNOWN' ? 3 : 1;
    info = src.query();
  } finally {
    if (timer) clearInterval(timer);
    if (deadline) clearTimeout(deadline);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  const states = await Promise.all(setup.devices.map(async (d) => ({ id: d.id, state: await d.getState().catch(() => 'unknown') })));
  await Promise.all(setup.devices.map((d) => d.close()));
  await saveArcHistory(history);
  print(!!v.json, { result: { ...info, vmRunning: setup.vm.running, deviceStates: states, fdsAtStart, fdsAtEnd: openFdCount() } }, `result: ${JSON.stringify(info, null, 2)}`);
  return code;
}

async function cmdConformance(v: Values): Promise<number> {
  let target;
  if (v.mock?.length) {
    let seed = 1;
    const profile = v.mock[0]!;
    target = { name: profile, open: () => VfioDevice.openMock({ profile, seed: seed++ }) };
  } else if (v.device?.length && v.peer) {
    const paths = { primary: v.device[0]!, peer: v.peer };
    target = { name: paths.primary, open: (role: 'primary' | 'peer') => VfioDevice.openKernel({ path: paths[role], via: (v.via ?? 'auto') as 'auto' }) };
  } else throw new UsageError('conformance needs --mock <profile>, or --device <path> --peer <path>');
  const report = await runConformance(target, { onCheck: (c) => print(!!v.json, { check: c }, `${c.status.padEnd(4)} ${c.name}: ${c.detail}`) });
  print(!!v.json, { report }, `${report.passed} passed, ${report.failed} failed, ${report.skipped} skipped`);
  return report.failed ? 1 : 0;
}

const here = fileURLToPath(import.meta.url);

function fmtBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function cmdDemo(v: Values): Promise<number> {
  const deviceArgs: string[] = [];
  for (const m of v.mock ?? ['nic-vf:2', 'serial:1', 'gpu:1']) deviceArgs.push('--mock', m);
  if (v['mock-overrides']) deviceArgs.push('--mock-overrides', v['mock-overrides']);
  deviceArgs.push('--ram', v.ram ?? '256MiB', '--ram-dirty', v['ram-dirty'] ?? '48MiB', '--ram-working-set', v['ram-working-set'] ?? '32MiB');
  const uri = `unix:/tmp/vfio-migrate-demo-${process.pid}.sock`;
  console.log(`vfio-migration demo: ${deviceArgs.filter((_, i) => i % 2).join(' ')}`);
  console.log(`destination and source run as two processes, migrating over ${uri}\n`);
  const dest = spawn(process.execPath, [here, 'incoming', '--listen', uri, '--json', ...deviceArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = (child: ReturnType<typeof spawn>, onLine: (o: Record<string, unknown>) => void) => onJsonLines(child.stdout!, onLine, (line) => console.log(line));
  let destResult: Record<string, unknown> | null = null;
  const listening = new Promise<void>((resolve) =>
    lines(dest, (o) => {
      if (o.listening) resolve();
      if (o.result) destResult = o.result as Record<string, unknown>;
    }),
  );
  await listening;
  const caps = ['--cap', 'switchover-ack=on', '--on-stall', 'raise', '--timeout-ms', '120000'];
  const src = spawn(process.execPath, [here, 'migrate', '--to', uri, '--json', '--channels', '3', '--progress-ms', '250', ...caps, ...deviceArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  let srcResult: (MigrationInfo & { vmRunning: boolean }) | null = null;
  const tty = process.stdout.isTTY;
  let lastLine = '';
  lines(src, (o) => {
    if (o.progress) {
      const p = o.progress as MigrationInfo;
      const devs = p.devices.map((d) => `${d.id}:${d.state}`).join(' ');
      const line = `[${p.status}] pass ${p.iterations} | sent ${fmtBytes(p.transferredBytes)} | remaining ${fmtBytes(p.remainingBytes)} | expected downtime ${p.expectedDowntimeMs === null ? '?' : p.expectedDowntimeMs.toFixed(0)} ms | ${devs}`;
      if (line === lastLine) return;
      lastLine = line;
      if (tty) process.stdout.write(`\r\x1b[K${line}`);
      else console.log(line);
    } else if (o.event === 'VFIO_MIGRATION' && String((o.data as { state: string }).state).endsWith('-prepare')) {
      const d = o.data as { device: string; state: string };
      if (tty) process.stdout.write('\n');
      console.log(`  event ${d.state} for ${d.device}`);
    } else if (o.event === 'MIGRATION' || o.event === 'SWITCHOVER_ACK' || o.event === 'MIGRATION_STALLED') {
      if (tty) process.stdout.write('\n');
      console.log(`  ${o.event} ${JSON.stringify(o.data)}`);
    } else if (o.action) {
      if (tty) process.stdout.write('\n');
      console.log(`  stalled: ${o.action} to ${o.downtimeLimitMs} ms`);
    } else if (o.result) srcResult = o.result as MigrationInfo & { vmRunning: boolean };
  });
  const [srcCode, destCode] = await Promise.all([new Promise<number>((r) => src.on('exit', (c) => r(c ?? 1))), new Promise<number>((r) => dest.on('exit', (c) => r(c ?? 1)))]);
  const s = srcResult as (MigrationInfo & { vmRunning: boolean }) | null;
  console.log('\n\nsummary');
  if (!s) {
    console.log('  the source printed no result');
    return 1;
  }
  console.log(`  status            ${s.status}${s.error ? ` (${s.error.code}: ${s.error.message})` : ''}`);
  console.log(`  downtime          ${s.downtimeMs === null ? '-' : `${s.downtimeMs.toFixed(1)} ms`} (expected ${s.expectedDowntimeMs === null ? '-' : s.expectedDowntimeMs.toFixed(1)} ms)`);
  console.log(`  total time        ${s.totalTimeMs.toFixed(0)} ms (setup ${s.setupTimeMs.toFixed(0)} ms)`);
  console.log(`  transferred       ${fmtBytes(s.transferredBytes)} (${Object.entries(s.bytesByKind).map(([k, b]) => `${k} ${fmtBytes(b)}`).join(', ')}) at ${s.throughputMbps.toFixed(0)} Mbit/s`);
  console.log(`  iterations        ${s.iterations}`);
  for (const d of s.digests ?? []) console.log(`  ${d.section.padEnd(17)} digest ${d.source ?? '-'} -> ${d.destination ?? '-'} ${d.match ? 'match' : d.match === null ? '(not checkable)' : 'MISMATCH'}`);
  void destResult;
  const ok = srcCode === 0 && destCode === 0 && s.status === 'completed' && (s.digests ?? []).every((d) => d.match !== false);
  console.log(`\n${ok ? 'migration completed, every digest matches' : 'migration FAILED'}`);
  return ok ? 0 : 1;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  let parsed;
  try {
    parsed = parseArgs({ args: rest, options, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const v = parsed.values;
  if (v.help || !command) {
    console.log(USAGE);
    return command ? 0 : 2;
  }
  switch (command) {
    case 'incoming':
      return cmdIncoming(v);
    case 'migrate':
      return cmdMigrate(v);
    case 'demo':
      return cmdDemo(v);
    case 'conformance':
      return cmdConformance(v);
    case 'profiles':
      for (const p of await listProfiles()) console.log(p);
      return 0;
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    if (err instanceof UsageError) {
      console.error(`vfio-migrate: ${err.message}\n\n${USAGE}`);
      process.exit(2);
    }
    const e = describeError(err);
    console.error(`vfio-migrate: ${e.code}: ${e.message}`);
    process.exit(1);
  },
);
