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
  const proc = spawn(process.execPath, [CLI, 'incoming', '--listen', uri, '--json', '--arc-history', 'none', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
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
    for (let i = 0; i < count; i++) devices.push(await VfioDevice.openMock({ profile, overrides: opts.overrides, seed: seed++, id: `${profile.replace(/.*\//, '')}-${devices.length}` }));
  const handlers: StateHandler[] = [];
  if (opts.ram) handlers.push(new RamHandler({ ...opts.ram, seed: 7, vm }));
  handlers.push(...devices.map((d) => new VfioHandler(d)));
  return { vm, devices, handlers, close: () => Promise.all(devices.map((d) => d.close())).then(() => {}) };
}

/** CLI arguments matching a sourceSide() call. */
export function deviceArgs(opts: { mock: [string, number][]; overrides?: Partial<MockProfileInput>; ram?: { sizeBytes: number } }): string[] {
  const args: string[] = [];
  for (const [p, n] of opts.mock) args.push('--mock', `${p}:${n}`);
  if (opts.overrides) args.push('--mock-overrides', JSON.stringify(opts.overrides));
  if (opts.ram) args.push('--ram', String(opts.ram.sizeBytes));
  return args;
}
