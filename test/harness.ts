// Test harness: a destination in a real child process (the CLI's `incoming`),
// and helpers to build the source side in this process.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VfioDevice } from '../src/vfio/device.js';
import type { MockProfileInput } from '../src/vfio/mock-profile.js';
import { VfioHandler } from '../src/migration/vfio-handler.js';
import { RamHandler } from '../src/migration/ram-handler.js';
import { SyntheticVm } from '../src/migration/vm.js';
import type { StateHandler } from '../src/migration/handler.js';
import { onJsonLines } from '../src/json-lines.js';
import type { ExecutionContext } from 'ava';
import type { MigrationSource } from '../src/migration/source.js';
import { openFdCount } from './helpers.js';
import { openMockDevice } from '../src/vfio/mock.js';

const here = path.dirname(fileURLToPath(import.meta.url));
export const CLI = path.resolve(here, '..', 'src', 'cli.js');

export interface DestinationProcess {
  uri: string;
  proc: ChildProcess;
  events: { event: string; data: Record<string, unknown>; timestamp: number }[];
  /** The final result line, or null if the process died without one. */
  result: Promise<Record<string, unknown> | null>;
  exitCode: Promise<number | null>;
}

let sockets = 0;

export async function startDestination(args: string[]): Promise<DestinationProcess> {
  const uri = `unix:/tmp/vfio-mig-test-${process.pid}-${++sockets}.sock`;
  // No arc history file: every test starts from what its own migration observes.
  const proc = spawn(process.execPath, [CLI, 'incoming', '--listen', uri, '--json', '--once', '--arc-history', 'none', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const events: DestinationProcess['events'] = [];
  let resolveResult!: (r: Record<string, unknown> | null) => void;
  const result = new Promise<Record<string, unknown> | null>((r) => (resolveResult = r));
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const listening = new Promise<void>((resolve, reject) => {
    onJsonLines(proc.stdout!, (o) => {
      if (o.listening) resolve();
      else if (o.result) resolveResult(o.result as Record<string, unknown>);
      else if (o.event) events.push(o as DestinationProcess['events'][number]);
    });
    proc.on('exit', (code) => {
      resolveResult(null);
      reject(new Error(`destination exited (${code}) before listening: ${stderr}`));
    });
  });
  // 'close' comes after the child's stdio pipes closed: fd counts are stable from then on.
  const exitCode = new Promise<number | null>((r) => proc.on('close', (c) => r(c)));
  await listening;
  return { uri, proc, events, result, exitCode };
}

export interface SourceSide {
  vm: SyntheticVm;
  devices: VfioDevice[];
  handlers: StateHandler[];
  close(): Promise<void>;
}

/** The same devices the CLI opens for `--mock profile:count --ram size` on the source side. */
export async function sourceSide(opts: { mock: [string, number][]; overrides?: Partial<MockProfileInput>; ram?: { sizeBytes: number; dirtyBytesPerSec?: number; workingSetBytes?: number } }): Promise<SourceSide> {
  const vm = new SyntheticVm(true);
  const devices: VfioDevice[] = [];
  let seed = 1;
  for (const [profile, count] of opts.mock)
    for (let i = 0; i < count; i++) devices.push(await openMockDevice({ profile, overrides: opts.overrides, seed: seed++, id: `${profile.replace(/.*\//, '')}-${devices.length}` }));
  const handlers: StateHandler[] = [];
  if (opts.ram) handlers.push(new RamHandler({ ...opts.ram, seed: 7, vm }));
  handlers.push(...devices.map((d) => new VfioHandler(d)));
  return { vm, devices, handlers, close: () => Promise.all(devices.map((d) => d.close())).then(() => {}) };
}

export interface PeerProcess {
  proc: ChildProcess;
  /** Every JSON line printed so far. */
  lines: Record<string, unknown>[];
  /** Resolves with the first line (already printed or to come) that matches; rejects after `timeoutMs` or at exit. */
  waitFor(match: (line: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** {result} lines so far. */
  results(): Record<string, unknown>[];
  exitCode: Promise<number | null>;
}

const PEER = path.resolve(here, 'peer-process.js');

/** A migration end in a child process (test/peer-process.ts), optionally inside a network namespace. */
/** `wrap`: a command the peer runs under (e.g. faketime and its arguments). */
export function startPeer(args: string[], options: { netns?: string; wrap?: string[] } = {}): PeerProcess {
  const argv = [...(options.wrap ?? []).slice(1), ...(options.wrap ? [process.execPath] : []), PEER, ...args];
  const command = options.wrap?.[0] ?? process.execPath;
  const proc = options.netns ? spawn('ip', ['netns', 'exec', options.netns, command, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] }) : spawn(command, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: Record<string, unknown>[] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  let exited = false;
  proc.stderr!.on('data', (d) => (stderr += d));
  onJsonLines(proc.stdout!, (o) => {
    lines.push(o);
    for (const w of [...waiters]) w();
  });
  const exitCode = new Promise<number | null>((r) =>
    proc.on('close', (c) => {
      exited = true;
      for (const w of [...waiters]) w();
      r(c);
    }),
  );
  const waitFor = (match: (line: Record<string, unknown>) => boolean, timeoutMs = 30_000) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const check = () => {
        const hit = lines.find(match);
        if (hit || exited) {
          waiters.delete(check);
          clearTimeout(timer);
          if (hit) resolve(hit);
          else reject(new Error(`peer exited without the line awaited; stderr: ${stderr.slice(-2000)}`));
        }
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`no such line within ${timeoutMs} ms; last lines: ${JSON.stringify(lines.slice(-5)).slice(0, 2000)}; stderr: ${stderr.slice(-2000)}`));
      }, timeoutMs);
      waiters.add(check);
      check();
    });
  return { proc, lines, waitFor, results: () => lines.filter((l) => l.result).map((l) => l.result as Record<string, unknown>), exitCode };
}

/** CLI arguments matching a sourceSide() call. */
export function deviceArgs(opts: { mock: [string, number][]; overrides?: Partial<MockProfileInput>; ram?: { sizeBytes: number } }): string[] {
  const args: string[] = [];
  for (const [p, n] of opts.mock) args.push('--mock', `${p}:${n}`);
  if (opts.overrides) args.push('--mock-overrides', JSON.stringify(opts.overrides));
  if (opts.ram) args.push('--ram', String(opts.ram.sizeBytes));
  return args;
}

export type FaultPhase = 'setup' | 'precopy' | 'switchover' | 'stop-copy' | 'destination-load';

/**
 * Runs `fault` once, when the source reaches `phase` (destination-load: 150 ms
 * after the last of three devices stopped, inside a destination whose
 * resuming -> stop takes 400 ms). Returns whether it ran.
 */
export function onPhase(src: MigrationSource, phase: FaultPhase, fault: () => void, lastDevice = 'nic-vf-2'): () => boolean {
  let fired = false;
  const fire = () => {
    if (fired) return;
    fired = true;
    fault();
  };
  src.on('event', (r) => {
    const d = r.data as { status?: string; pass?: number; state?: string; device?: string };
    if (phase === 'setup' && r.event === 'VFIO_MIGRATION' && d.state === 'pre-copy') fire();
    if (phase === 'precopy' && r.event === 'MIGRATION_PASS' && d.pass === 1) setImmediate(fire);
    if (phase === 'switchover' && r.event === 'MIGRATION' && d.status === 'device') fire();
    if (phase === 'stop-copy' && r.event === 'VFIO_MIGRATION' && d.state === 'stop-copy') fire();
    if (phase === 'destination-load' && r.event === 'VFIO_MIGRATION' && d.state === 'stop-copy' && d.device === lastDevice) setTimeout(fire, 150);
  });
  return () => fired;
}

/**
 * After a failed or cancelled migration: the source VM runs, its devices are
 * RUNNING with their state intact, the destination (unless killed) failed
 * without leaking an fd, and neither did this process.
 */
export async function assertRolledBack(
  t: ExecutionContext,
  o: { src: MigrationSource; err: Error | undefined; side: SourceSide; digestsBefore: string[]; fdsBefore: number; cancelled: boolean; destKilled: boolean; dest: { exitCode: Promise<number | null>; result: Promise<Record<string, unknown> | null> } },
): Promise<void> {
  t.is(o.src.status, o.cancelled ? 'cancelled' : 'failed', `status ${o.src.status}: ${o.err?.message}`);
  t.truthy(o.src.query().error?.message);
  t.true(o.side.vm.running, 'the source VM runs');
  for (const d of o.side.devices) t.is(await d.getState(), 'running', d.id);
  t.deepEqual(o.side.devices.map((d) => d.mockInfo().digest), o.digestsBefore, 'device state intact (nothing reset)');
  await o.side.close();
  if (o.destKilled) t.not(await o.dest.exitCode, 0);
  else {
    const r = await o.dest.result;
    t.not(r?.status, 'completed');
    t.is(r?.fdsAtEnd, r?.fdsAtStart, 'destination fds');
    await o.dest.exitCode;
  }
  await new Promise((r) => setTimeout(r, 20));
  t.is(openFdCount(), o.fdsBefore, 'source fds');
}
