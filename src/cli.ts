#!/usr/bin/env node
// vfio-migrate: the command line. `incoming` and `migrate` are the two ends
// of a migration; `demo` (npm start) runs both as separate processes over
// loopback with mock devices and shows the migration live.
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { readdirSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VfioDevice } from './vfio/device.js';
import { openMockDevice } from './vfio/mock.js';
import { PROFILES_DIR, loadProfile, type MockProfileInput } from './vfio/mock-profile.js';
import { runConformance } from './vfio/conformance.js';
import { VfioHandler, exportArcHistory, importArcHistory } from './migration/vfio-handler.js';
import { exportSwitchoverHistory, importSwitchoverHistory } from './migration/switchover-history.js';
import { RamHandler } from './migration/ram-handler.js';
import { SyntheticVm } from './migration/vm.js';
import { MigrationSource, type MigrationInfo } from './migration/source.js';
import type { MigrationEventMap } from './migration/events.js';
import { MigrationDestination, type IncomingResult } from './migration/destination.js';
import { MigrationError, describeError } from './migration/errors.js';
import { DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS, mergeCapabilities, mergeParameters } from './migration/params.js';
import { parseUri } from './migration/transport.js';
import { type TlsOptions, loadTlsConfig } from './migration/tls.js';
import { parseByteSize } from './vfio/mock-profile.js';
import type { StateHandler } from './migration/handler.js';
import { onJsonLines } from './json-lines.js';

const USAGE = `usage:
  vfio-migrate incoming --listen <tcp:host:port|unix:path> [devices] [--json] [--once]
  vfio-migrate migrate --to <tcp:host:port|unix:path> [devices] [--channels N]
               [--cap name=on|off]... [--param name=value]... [--json]
               [--on-stall wait|raise|cancel] [--timeout-ms N] [--progress-ms N]
  vfio-migrate demo [devices]
  vfio-migrate conformance (--mock <profile> | --device <path> --peer <path>)
  vfio-migrate profiles [--json]
  vfio-migrate help | --help | -h

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

migrate:
  --channels <1-64>             connections the device data is spread over (default 1)
  --cap <name>=on|off           a capability: return-path, switchover-ack, switchover-abort, events
  --param <name>=<value>        a parameter: downtime-limit, switchover-limit (ms), max-bandwidth,
                                avail-switchover-bandwidth (bytes/s), stall-iterations
  --on-stall wait|raise|cancel  when the migration stalls: keep going (default), raise downtime-limit
                                to the suggested value, or cancel
  --timeout-ms <ms>             cancel the migration if it has not completed by then (default: none)
  --progress-ms <ms>            print query() every <ms> ms
  exit status: 0 the VM runs on the destination; 1 it failed and the VM runs here;
  3 the connection was lost after the commit (the VM stays stopped here); 2 a usage error;
  130/143 interrupted by SIGINT/SIGTERM (the VM runs here)

TLS (both ends, every channel; see the README's TLS section):
  --tls-creds <dir>             x509, mutual: a QEMU tls-creds-x509 directory (ca-cert.pem,
                                server-cert.pem + server-key.pem, client-cert.pem + client-key.pem)
  --tls-psk <file>              pre-shared keys instead: a QEMU tls-creds-psk file (username:hexkey lines)
  --tls-psk-username <name>     migrate: the key's username (default qemu)
  --tls-authz <pattern>         incoming: a client identity allowed to migrate here (repeatable): a glob
                                over the certificate's subject DN (CN=src,O=Example) or a SAN (DNS:src.example),
                                or the PSK username
  --tls-hostname <name>         migrate: the name the destination's certificate must carry
                                (default: the tcp: host; required over unix:)

incoming: after a failed migration it reports it and keeps listening for the next
  source; --once gives up after the first. It exits 0 once a migration completed (the VM
  runs here), 1 when it failed (with --once, or if it cannot go on), 2 on a usage error,
  130/143 when interrupted. Errors print "vfio-migrate: CODE: message" on stderr.
`;

/**
 * A command-line error: `code` says what kind (ERR_USAGE, or the library's
 * code such as ERR_MIGRATION_BAD_URI), `exitCode` is 2 for bad usage.
 */
class CliError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly exitCode = 2,
  ) {
    super(message);
  }
}

function usageError(message: string): CliError {
  return new CliError('ERR_USAGE', message);
}

/** A library error caused by a bad command-line value: its own code, exit 2. */
function asUsageError(err: unknown, prefix: string): CliError {
  const e = describeError(err);
  return new CliError(e.code, `${prefix}: ${e.message}`);
}

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
  once: { type: 'boolean' },
  'tls-creds': { type: 'string' },
  'tls-psk': { type: 'string' },
  'tls-psk-username': { type: 'string' },
  'tls-authz': { type: 'string', multiple: true },
  'tls-hostname': { type: 'string' },
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
    throw asUsageError(err, `--${name}`);
  }
}

/** setTimeout/setInterval take at most 2^31-1 ms; more would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** An integer option in [min, max], or `fallback` when absent; anything else is a usage error. */
function intOption(v: Values, name: 'channels' | 'timeout-ms' | 'progress-ms' | 'seed', min: number, max: number, fallback: number): number;
function intOption(v: Values, name: 'channels' | 'timeout-ms' | 'progress-ms' | 'seed', min: number, max: number): number | undefined;
function intOption(v: Values, name: 'channels' | 'timeout-ms' | 'progress-ms' | 'seed', min: number, max: number, fallback?: number): number | undefined {
  const raw = v[name];
  if (raw === undefined) return fallback;
  const n = /^-?\d+$/.test(raw.trim()) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw usageError(`--${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(raw)}`);
  return n;
}

function choiceOption<T extends string>(v: Values, name: 'via' | 'on-stall', choices: readonly T[], fallback: T): T {
  const raw = v[name];
  if (raw === undefined) return fallback;
  if (!(choices as readonly string[]).includes(raw)) throw usageError(`--${name} must be ${choices.slice(0, -1).join(', ')} or ${choices.at(-1)}, got ${JSON.stringify(raw)}`);
  return raw as T;
}

/** A migration URI from the command line; `connect`: port 0 (any free port) only makes sense to listen on. */
function uriOption(v: Values, name: 'to' | 'listen', connect: boolean): string {
  const raw = v[name];
  if (!raw) throw usageError(`${connect ? 'migrate' : 'incoming'} needs --${name} <uri>`);
  let uri;
  try {
    uri = parseUri(raw);
  } catch (err) {
    throw asUsageError(err, `--${name}`);
  }
  if (connect && uri.kind === 'tcp' && uri.port === 0) throw new CliError('ERR_MIGRATION_BAD_URI', `--${name}: "${raw}": port 0 can be listened on, not connected to`);
  return raw;
}

/**
 * The TLS options of `role` from --tls-*, credentials read now: every bad
 * value or file is an error (ERR_MIGRATION_TLS, exit 2) before any device
 * opens. undefined without TLS.
 */
async function tlsOption(v: Values, role: 'source' | 'destination'): Promise<TlsOptions | undefined> {
  const creds = v['tls-creds'];
  const psk = v['tls-psk'];
  const other = (['tls-psk-username', 'tls-authz', 'tls-hostname'] as const).find((k) => v[k] !== undefined);
  if (creds === undefined && psk === undefined) {
    if (other) throw usageError(`--${other} needs --tls-creds or --tls-psk`);
    return undefined;
  }
  if (creds !== undefined && psk !== undefined) throw usageError('--tls-creds and --tls-psk exclude each other');
  if (role === 'source' && v['tls-authz']) throw usageError('--tls-authz applies to incoming (who may migrate into it)');
  if (role === 'destination' && v['tls-hostname'] !== undefined) throw usageError('--tls-hostname applies to migrate (the name it expects of the destination)');
  if (role === 'destination' && v['tls-psk-username'] !== undefined) throw usageError('--tls-psk-username applies to migrate (incoming accepts every username of its keys file)');
  const options: TlsOptions = creds !== undefined ? { creds } : { psk: psk! };
  if (v['tls-psk-username'] !== undefined) options.pskUsername = v['tls-psk-username'];
  if (v['tls-authz']) options.authz = v['tls-authz'];
  if (v['tls-hostname'] !== undefined) options.hostname = v['tls-hostname'];
  try {
    await loadTlsConfig(options, role);
  } catch (err) {
    throw asUsageError(err, creds !== undefined ? '--tls-creds' : '--tls-psk');
  }
  return options;
}

/** The arc history file (device models' arc latencies, learned across migrations), or null. */
function arcHistoryPath(v: Values): string | null {
  const given = v['arc-history'];
  if (given === 'none' || given === '') return null;
  if (given) return given;
  const cache = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(cache, 'vfio-migration', 'arc-history.json');
}

/** The arc history file's entry for the switchover's learned control cost (no device model is named so). */
const SWITCHOVER_KEY = '@switchover-control-ms';

async function loadArcHistory(file: string | null): Promise<void> {
  if (!file) return;
  try {
    // The learned control cost of the switchover rides in the same file, under its own key.
    const { [SWITCHOVER_KEY]: switchover, ...arcs } = JSON.parse(await readFile(file, 'utf8')) as Record<string, Record<string, number>>;
    importArcHistory(arcs);
    importSwitchoverHistory(switchover);
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
    merged[SWITCHOVER_KEY] = { ...(onDisk[SWITCHOVER_KEY] ?? {}), ...exportSwitchoverHistory() };
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

interface MockSpec {
  profile: string;
  count: number;
}

/** Every device option checked before any device opens. */
interface DeviceOptions {
  mocks: MockSpec[];
  overrides: Partial<MockProfileInput>;
  kernelPaths: string[];
  via: 'auto' | 'cdev' | 'group';
  ram?: { sizeBytes: number; dirtyBytesPerSec: number; workingSetBytes?: number };
  seed: number;
}

function deviceOptions(v: Values, role: 'source' | 'destination'): DeviceOptions {
  let overrides: Partial<MockProfileInput> = {};
  if (v['mock-overrides'] !== undefined) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(v['mock-overrides']);
    } catch {
      parsed = null;
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw usageError(`--mock-overrides must be a JSON object, got ${JSON.stringify(v['mock-overrides'])}`);
    overrides = parsed as Partial<MockProfileInput>;
  }
  const mocks = (v.mock ?? []).map((spec) => {
    const m = /^(.*?)(?::(\d+))?$/.exec(spec)!;
    const count = Number(m[2] ?? 1);
    if (!m[1] || count < 1 || count > 256) throw usageError(`--mock ${spec}: expected <profile>[:count] with a count of 1-256`);
    return { profile: m[1], count };
  });
  const sizeBytes = bytesOption(v, 'ram');
  const ram = sizeBytes ? { sizeBytes, dirtyBytesPerSec: bytesOption(v, 'ram-dirty') ?? 0, workingSetBytes: bytesOption(v, 'ram-working-set') } : undefined;
  const kernelPaths = v.device ?? [];
  if (mocks.length === 0 && kernelPaths.length === 0 && !ram) throw usageError('no devices: give --mock, --device or --ram');
  return {
    mocks,
    overrides,
    kernelPaths,
    via: choiceOption(v, 'via', ['auto', 'cdev', 'group'] as const, 'auto'),
    ram,
    seed: intOption(v, 'seed', 0, Number.MAX_SAFE_INTEGER, role === 'source' ? 1 : 1000),
  };
}

async function openDevices(o: DeviceOptions, role: 'source' | 'destination'): Promise<Setup> {
  const vm = new SyntheticVm(role === 'source');
  const devices: VfioDevice[] = [];
  const handlers: StateHandler[] = [];
  let seed = o.seed;
  try {
    if (o.ram) handlers.push(new RamHandler({ ...o.ram, seed: role === 'source' ? 7 : 8, vm }));
    for (const { profile, count } of o.mocks) {
      for (let i = 0; i < count; i++) {
        const dev = await openMockDevice({ profile, overrides: o.overrides, seed: seed, id: `${profile.replace(/.*\//, '').replace(/\.json$/, '')}-${devices.length}` });
        seed++;
        devices.push(dev);
      }
    }
    for (const path of o.kernelPaths) devices.push(await VfioDevice.openKernel({ path, via: o.via }));
  } catch (err) {
    await Promise.all(devices.map((d) => d.close()));
    throw err;
  }
  handlers.push(...devices.map((d) => new VfioHandler(d)));
  return { handlers, devices, vm };
}

function parseKeyValues(list: string[] | undefined, what: string, parse: (value: string) => unknown): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const item of list ?? []) {
    const i = item.indexOf('=');
    if (i <= 0) throw usageError(`--${what} ${item}: expected name=value`);
    out[item.slice(0, i)] = parse(item.slice(i + 1));
  }
  return out;
}

function print(json: boolean, value: unknown, text?: string): void {
  if (json) process.stdout.write(`${JSON.stringify(value)}\n`);
  else if (text) console.log(text);
}

/** The one way both ends report how a migration ended: the result on stdout, the error (if any) on stderr. */
function printResult(json: boolean, result: object, error: { code: string; message: string } | undefined): void {
  print(json, { result }, `result: ${JSON.stringify(result, null, 2)}`);
  if (error) console.error(`vfio-migrate: ${error.code}: ${error.message}`);
}

/** For people: the downtime promised and kept, in parts, and every warning (a broken promise among them). */
function printDowntimeSummary(info: MigrationInfo): void {
  console.log(`downtime: ${info.downtimeMs === null ? '-' : `${info.downtimeMs.toFixed(0)} ms measured`}, limit in force ${info.downtimeLimitInForceMs} ms`);
  if (info.expectedDowntime) console.log(`  ${info.expectedDowntime.summary}`);
  const m = info.measuredSwitchover;
  if (m) console.log(`  measured: source arcs ${m.sourceArcsMs.toFixed(0)}, data ${m.dataMs.toFixed(0)}, destination load ${m.destinationLoadMs.toFixed(0)}, destination resume ${m.destinationResumeMs.toFixed(0)} ms`);
  for (const w of info.warnings) console.log(`warning: ${w}`);
}

const SIGNAL_EXIT: Record<string, number> = { SIGINT: 130, SIGTERM: 143 };

/**
 * SIGINT/SIGTERM cancel instead of killing the process, so that sockets
 * (a unix socket's file above all), devices and the arc history are cleaned
 * up. A second signal kills as usual.
 */
function onSignals(cancel: (signal: string) => void): { received: () => string | null; dispose: () => void } {
  let received: string | null = null;
  const handler = (signal: NodeJS.Signals) => {
    received = signal;
    dispose();
    cancel(signal);
  };
  const dispose = () => {
    process.off('SIGINT', handler);
    process.off('SIGTERM', handler);
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return { received: () => received, dispose };
}

async function cmdIncoming(v: Values): Promise<number> {
  const listenUri = uriOption(v, 'listen', false);
  const devOpts = deviceOptions(v, 'destination');
  const tls = await tlsOption(v, 'destination');
  const json = !!v.json;
  const fdsAtStart = openFdCount();
  const ac = new AbortController();
  const signals = onSignals((signal) => ac.abort(`interrupted by ${signal}`));
  const history = arcHistoryPath(v);
  let setup: Setup | null = null;
  let dest: MigrationDestination | null = null;
  let code = 0;
  let result: Partial<IncomingResult> & object;
  try {
    await loadArcHistory(history);
    setup = await openDevices(devOpts, 'destination');
    dest = new MigrationDestination({ handlers: setup.handlers, vm: setup.vm, ...(tls ? { tls } : {}) });
    dest.on('event', (r) => print(json, r, `${r.event} ${JSON.stringify(r.data)}`));
    const uri = await dest.listen(listenUri);
    print(json, { listening: uri }, `listening on ${uri}`);
    for (;;) {
      if (ac.signal.aborted) throw new MigrationError('ERR_MIGRATION_CANCELLED', String(ac.signal.reason));
      try {
        result = await dest.incoming({ signal: ac.signal });
        break;
      } catch (err) {
        // A failed migration leaves nothing running here: report it and wait
        // for the next source (a management app retries), unless --once.
        const attempt = (err as { result?: IncomingResult }).result;
        if (v.once || !attempt || ac.signal.aborted || setup.vm.running) throw err;
        printResult(json, attempt, attempt.error ?? describeError(err));
        print(json, { listening: uri }, `listening on ${uri} for the next migration`);
      }
    }
  } catch (err) {
    code = 1;
    const e = describeError(err);
    // A failure before any migration started (a device that does not open, a busy address, a signal while idle) has no result yet.
    result = (err as { result?: IncomingResult }).result ?? { status: e.code === 'ERR_MIGRATION_CANCELLED' ? 'cancelled' : 'failed', error: e };
    if (!result.error) result.error = e;
  } finally {
    signals.dispose();
    await dest?.close();
    await Promise.all(setup?.devices.map((d) => d.close()) ?? []);
    await saveArcHistory(history);
  }
  const signal = signals.received();
  if (signal) code = SIGNAL_EXIT[signal] ?? 1;
  printResult(json, { ...result, fdsAtStart, fdsAtEnd: openFdCount() }, result.error);
  return code;
}

async function cmdMigrate(v: Values): Promise<number> {
  // Every value is checked before any device opens or any connection is made.
  const to = uriOption(v, 'to', true);
  const channels = intOption(v, 'channels', 1, 64, 1);
  const capabilities = parseKeyValues(v.cap, 'cap', (s) => (s === 'on' || s === 'true' ? true : s === 'off' || s === 'false' ? false : s));
  const parameters = parseKeyValues(v.param, 'param', (s) => (/^-?\d+(\.\d+)?$/.test(s) ? Number(s) : s));
  try {
    mergeCapabilities(DEFAULT_CAPABILITIES, capabilities);
  } catch (err) {
    throw asUsageError(err, '--cap');
  }
  try {
    mergeParameters(DEFAULT_PARAMETERS, parameters);
  } catch (err) {
    throw asUsageError(err, '--param');
  }
  const onStall = choiceOption(v, 'on-stall', ['wait', 'raise', 'cancel'] as const, 'wait');
  const timeoutMs = intOption(v, 'timeout-ms', 1, MAX_TIMER_MS);
  const progressMs = intOption(v, 'progress-ms', 1, MAX_TIMER_MS);
  const devOpts = deviceOptions(v, 'source');
  const tls = await tlsOption(v, 'source');
  const json = !!v.json;

  const fdsAtStart = openFdCount();
  const history = arcHistoryPath(v);
  await loadArcHistory(history);
  const setup = await openDevices(devOpts, 'source');
  let src: MigrationSource;
  try {
    src = new MigrationSource({ handlers: setup.handlers, vm: setup.vm, capabilities, parameters, ...(tls ? { tls } : {}) });
  } catch (err) {
    await Promise.all(setup.devices.map((d) => d.close()));
    throw err;
  }
  src.on('event', (r) => {
    // People read the estimate's parts; machines get the whole record.
    if (r.event === 'MIGRATION_PASS' && !json) {
      const d = r.data as MigrationEventMap['MIGRATION_PASS'];
      print(json, r, `pass ${d.pass}: remaining ${fmtBytes(d.remainingBytes)}, ${d.expectedDowntime.summary} (limit ${d.downtimeLimitMs} ms)`);
    } else if ((r.event === 'MIGRATION_WARNING' || r.event === 'MIGRATION_STALLED') && !json) print(json, r, `${r.event}: ${(r.data as { message: string }).message}`);
    else print(json, r, `${r.event} ${JSON.stringify(r.data)}`);
  });
  const timer = progressMs ? setInterval(() => print(json, { progress: src.query() }), progressMs) : null;
  // What a management app does with a stall: raise downtime-limit to the suggested value, or give up.
  src.on('MIGRATION_STALLED', (d) => {
    if (onStall === 'raise') {
      src.setParameters({ 'downtime-limit': d.suggestedDowntimeLimitMs });
      print(json, { action: 'downtime-limit raised', downtimeLimitMs: d.suggestedDowntimeLimitMs }, `stalled: downtime-limit raised to ${d.suggestedDowntimeLimitMs} ms`);
    } else if (onStall === 'cancel') src.cancel('stalled');
  });
  const deadline = timeoutMs ? setTimeout(() => src.cancel(`did not complete within ${timeoutMs} ms (--timeout-ms)`), timeoutMs) : null;
  const signals = onSignals((signal) => src.cancel(`interrupted by ${signal}`));
  let code = 0;
  let info: MigrationInfo;
  let error: { code: string; message: string } | undefined;
  try {
    info = await src.migrate(to, { channels });
  } catch (err) {
    // 3: the destination may be running the VM; this side stays stopped (see resumeOnSource()).
    code = (err as MigrationError).code === 'ERR_MIGRATION_OUTCOME_UNKNOWN' ? 3 : 1;
    error = describeError(err);
    info = src.query();
  } finally {
    if (timer) clearInterval(timer);
    if (deadline) clearTimeout(deadline);
    signals.dispose();
  }
  const signal = signals.received();
  if (signal && code === 1) code = SIGNAL_EXIT[signal] ?? 1;
  const states = await Promise.all(setup.devices.map(async (d) => ({ id: d.id, state: await d.getState().catch(() => 'unknown') })));
  await Promise.all(setup.devices.map((d) => d.close()));
  await saveArcHistory(history);
  printResult(json, { ...info, error: info.error ?? error, vmRunning: setup.vm.running, deviceStates: states, fdsAtStart, fdsAtEnd: openFdCount() }, info.error ?? error);
  if (!json) printDowntimeSummary(info);
  return code;
}

/** Every shipped profile (fault profiles under faults/) with its description. */
async function cmdProfiles(v: Values): Promise<number> {
  const names: string[] = [];
  const walk = async (dir: string, prefix: string) => {
    for (const entry of (await readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
      if (entry.isDirectory()) await walk(path.join(dir, entry.name), `${prefix}${entry.name}/`);
      else if (entry.name.endsWith('.json')) names.push(`${prefix}${entry.name.slice(0, -5)}`);
    }
  };
  await walk(PROFILES_DIR, '');
  // Plain profiles first, then the fault profiles.
  names.sort((a, b) => Number(a.includes('/')) - Number(b.includes('/')) || a.localeCompare(b));
  const width = Math.max(...names.map((n) => n.length));
  for (const name of names) {
    const profile = await loadProfile(name);
    const fault = name.startsWith('faults/');
    print(!!v.json, { profile: { name, fault, description: profile.description } }, `${name.padEnd(width)}  ${profile.description}`);
  }
  return 0;
}

async function cmdConformance(v: Values): Promise<number> {
  let target;
  if (v.mock?.length) {
    let seed = 1;
    const profile = v.mock[0]!;
    target = { name: profile, open: () => openMockDevice({ profile, seed: seed++ }) };
  } else if (v.device?.length && v.peer) {
    const paths = { primary: v.device[0]!, peer: v.peer };
    const via = choiceOption(v, 'via', ['auto', 'cdev', 'group'] as const, 'auto');
    target = { name: paths.primary, open: (role: 'primary' | 'peer') => VfioDevice.openKernel({ path: paths[role], via }) };
  } else throw usageError('conformance needs --mock <profile>, or --device <path> --peer <path>');
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
  const dest = spawn(process.execPath, [here, 'incoming', '--listen', uri, '--json', '--once', ...deviceArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = (child: ReturnType<typeof spawn>, onLine: (o: Record<string, unknown>) => void) => onJsonLines(child.stdout!, onLine, (line) => console.log(line));
  let destResult: Record<string, unknown> | null = null;
  const listening = new Promise<void>((resolve) =>
    lines(dest, (o) => {
      if (o.listening) resolve();
      if (o.result) destResult = o.result as Record<string, unknown>;
    }),
  );
  await listening;
  const caps = ['--cap', 'switchover-ack=on', '--cap', 'x-probe-switchover-arcs=on', '--on-stall', 'raise', '--timeout-ms', '120000'];
  const src = spawn(process.execPath, [here, 'migrate', '--to', uri, '--json', '--channels', '3', '--progress-ms', '250', ...caps, ...deviceArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  let srcResult: (MigrationInfo & { vmRunning: boolean }) | null = null;
  const tty = process.stdout.isTTY;
  let lastLine = '';
  lines(src, (o) => {
    if (o.progress) {
      const p = o.progress as MigrationInfo;
      const devs = p.devices.map((d) => `${d.id}:${d.state}`).join(' ');
      const line = `[${p.status}] pass ${p.iterations} | sent ${fmtBytes(p.transferredBytes)} | remaining ${fmtBytes(p.remainingBytes)} | ${p.expectedDowntime?.summary.replace(/; unmeasured: .*/, (m) => (m.length > 60 ? `; unmeasured: ${p.expectedDowntime!.unmeasured.length} arcs` : m)) ?? 'expected downtime ?'} | ${devs}`;
      if (line === lastLine) return;
      lastLine = line;
      if (tty) process.stdout.write(`\r\x1b[K${line}`);
      else console.log(line);
    } else if (o.event === 'VFIO_MIGRATION' && String((o.data as { state: string }).state).endsWith('-prepare')) {
      const d = o.data as { device: string; state: string };
      if (tty) process.stdout.write('\n');
      console.log(`  event ${d.state} for ${d.device}`);
    } else if (o.event === 'MIGRATION_WARNING' || o.event === 'MIGRATION_STALLED') {
      if (tty) process.stdout.write('\n');
      console.log(`  ${o.event}: ${(o.data as { message: string }).message}`);
    } else if (o.event === 'MIGRATION' || o.event === 'SWITCHOVER_ACK') {
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
  if (s.expectedDowntime) console.log(`  estimate          ${s.expectedDowntime.summary} (limit in force ${s.downtimeLimitInForceMs} ms)`);
  const m = s.measuredSwitchover;
  if (m) console.log(`  measured parts    source arcs ${m.sourceArcsMs.toFixed(0)}, data ${m.dataMs.toFixed(0)}, destination load ${m.destinationLoadMs.toFixed(0)}, destination resume ${m.destinationResumeMs.toFixed(0)} ms`);
  for (const w of s.warnings) console.log(`  warning           ${w}`);
  console.log(`  total time        ${s.totalTimeMs.toFixed(0)} ms (setup ${s.setupTimeMs.toFixed(0)} ms)`);
  console.log(`  transferred       ${fmtBytes(s.transferredBytes)} (${Object.entries(s.bytesByKind).map(([k, b]) => `${k} ${fmtBytes(b)}`).join(', ')}) at ${s.throughputMbps.toFixed(0)} Mbit/s`);
  console.log(`  iterations        ${s.iterations}`);
  for (const d of s.digests ?? []) console.log(`  ${d.section.padEnd(17)} digest ${d.source ?? '-'} -> ${d.destination ?? '-'} ${d.match ? 'match' : d.match === null ? '(not checkable)' : 'MISMATCH'}`);
  void destResult;
  const ok = srcCode === 0 && destCode === 0 && s.status === 'completed' && (s.digests ?? []).every((d) => d.match !== false);
  console.log(`\n${ok ? 'migration completed, every digest matches' : 'migration FAILED'}`);
  return ok ? 0 : 1;
}

const COMMANDS: Record<string, (v: Values) => Promise<number>> = {
  incoming: cmdIncoming,
  migrate: cmdMigrate,
  demo: cmdDemo,
  conformance: cmdConformance,
  profiles: cmdProfiles,
};

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined) {
    process.stderr.write(USAGE);
    return 2;
  }
  if (command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(USAGE);
    return 0;
  }
  const run = COMMANDS[command];
  if (!run) throw usageError(`unknown command ${JSON.stringify(command)} (commands: ${Object.keys(COMMANDS).join(', ')}, help)`);
  let parsed;
  try {
    parsed = parseArgs({ args: rest, options, allowPositionals: true, strict: true });
  } catch (err) {
    throw usageError((err as Error).message);
  }
  const v = parsed.values;
  if (v.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (parsed.positionals.length) throw usageError(`${command}: unexpected argument ${JSON.stringify(parsed.positionals[0])}`);
  return run(v);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    // One format for every error, usage or not: "vfio-migrate: CODE: message".
    const e = describeError(err);
    console.error(`vfio-migrate: ${e.code}: ${e.message}`);
    if (err instanceof CliError && err.exitCode === 2) console.error('run "vfio-migrate --help" for usage');
    process.exit(err instanceof CliError ? err.exitCode : 1);
  },
);
