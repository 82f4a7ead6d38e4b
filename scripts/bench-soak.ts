// npm run bench:soak: memory and fds over many migrations, and the peak RSS
// of a large one.
// - 200 back-to-back migrations between two long-lived processes, in
//   alternating directions: each process listens (one MigrationDestination
//   serving migration after migration) and migrates to the other in turn
//   (a new MigrationSource each time, over the same devices and VM). RSS
//   (after a full GC whose finalizers have run) and open fds of both are
//   sampled every 10 migrations from the warm-up (20) on.
// - soak-rss-growth: the median of the last 5 RSS samples (migrations
//   160-200) over the median of the first 5 (20-60), the larger of the two
//   processes. Medians of equal windows, not two single samples: the addon
//   keeps a bounded cache of read buffers (up to 64 MiB, returned at GC) whose
//   fill at any one sample varies by tens of MiB, while a leak moves the
//   whole window. The trajectory and the single-sample growth (warm-up ->
//   end) are printed beside it.
// - One migration of 8 GiB of device state between two fresh processes; the
//   peak RSS is each process's VmHWM.
// Ends with the three `bench` lines (target met|missed).
//   node --expose-gc dist/scripts/bench-soak.js [--migrations N] [--warmup N] [--sample-every N] [--big-gib N]
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { onJsonLines } from '../src/json-lines.js';
import { VfioDevice } from '../src/vfio/device.js';
import type { MockProfileInput } from '../src/vfio/mock-profile.js';
import { VfioHandler } from '../src/migration/vfio-handler.js';
import { SyntheticVm } from '../src/migration/vm.js';
import { MigrationSource } from '../src/migration/source.js';
import { MigrationDestination } from '../src/migration/destination.js';
import { describeError } from '../src/migration/errors.js';
import { openMockDevice } from '../src/vfio/mock.js';

const SELF = fileURLToPath(import.meta.url);
const MiB = 1 << 20;

interface WorkerSpec {
  devices: number;
  overrides: Partial<MockProfileInput>;
  seed: number;
  vmRunning: boolean;
}

/** The soak's devices: two NIC VFs that keep dirtying a small working set while they run. */
const SOAK_SPEC = { devices: 2, overrides: { stateBytes: '8MiB', dirtyBytesPerSec: '16MiB', dirtyWorkingSetBytes: '2MiB', arcLatencyMs: { default: 1 } } };
/** One device holding all the state (the profile limits allow 8 GiB in 2^17 chunks of 64 KiB). */
const bigSpec = (gib: number) => ({
  devices: 1,
  overrides: { stateBytes: `${gib}GiB`, chunkBytes: '64KiB', dirtyBytesPerSec: 0, dirtyWorkingSetBytes: '64MiB', stopCopyOnlyBytes: '1MiB', arcLatencyMs: { default: 1 }, loadInitialMs: 0, loadMsPerMiB: 0 },
});
const PARAMETERS = { 'downtime-limit': 2000 };

// ---- a worker: one end of both directions ----

async function worker(spec: WorkerSpec): Promise<void> {
  const print = (o: unknown) => process.stdout.write(`${JSON.stringify(o)}\n`);
  const devices: VfioDevice[] = [];
  for (let i = 0; i < spec.devices; i++) devices.push(await openMockDevice({ profile: 'nic-vf', overrides: spec.overrides, seed: spec.seed + i, id: `nic-vf-${i}` }));
  const vm = new SyntheticVm(spec.vmRunning);
  const dest = new MigrationDestination({ handlers: devices.map((d) => new VfioHandler(d)), vm });
  const uri = await dest.listen('tcp:127.0.0.1:0');
  print({ listening: uri, pid: process.pid });
  const serving = (async () => {
    for await (const r of dest.serve()) print({ served: { status: r.status, error: r.error, downtimeMs: r.downtimeMs } });
  })();
  const rl = createInterface({ input: process.stdin });
  for await (const line of rl) {
    const cmd = JSON.parse(line) as { migrate?: string; channels?: number; stats?: boolean; quit?: boolean };
    if (cmd.migrate) {
      // A new source each time over the same devices: what a VMM does per migration.
      const src = new MigrationSource({ handlers: devices.map((d) => new VfioHandler(d)), vm, parameters: PARAMETERS });
      const t0 = performance.now();
      try {
        const info = await src.migrate(cmd.migrate, { channels: cmd.channels ?? 2 });
        print({ migrated: { status: info.status, ms: performance.now() - t0, downtimeMs: info.downtimeMs, bytes: info.transferredBytes, digestsMatch: (info.digests ?? []).every((d) => d.match === true) } });
      } catch (err) {
        print({ migrated: { status: src.status, ms: performance.now() - t0, error: describeError(err) } });
      }
    } else if ((cmd as { snapshot?: string }).snapshot) {
      (globalThis as { gc?: () => void }).gc?.();
      const { writeHeapSnapshot } = await import('node:v8');
      print({ snapshot: writeHeapSnapshot((cmd as { snapshot?: string }).snapshot) });
    } else if (cmd.stats) {
      // A full GC first: what is left is what the process holds on to. The
      // native finalizers of read Buffers (which return their blocks to the
      // addon's pool) run after the GC that found them dead: let them run
      // and collect again, so a sample does not depend on when they ran.
      const gc = (globalThis as { gc?: () => void }).gc;
      for (let k = 0; k < 3; k++) {
        gc?.();
        await new Promise((resolve) => setImmediate(resolve));
      }
      const m = process.memoryUsage();
      print({ stats: { heapUsedBytes: m.heapUsed, externalBytes: m.external, destinationHistory: dest.history.length, ...rssByKind() } });
    } else if (cmd.quit) break;
  }
  await dest.close();
  await serving;
  await Promise.all(devices.map((d) => d.close()));
  process.exit(0);
}

/**
 * Where this process's RSS is, from /proc/self/smaps (KiB -> MiB): glibc's
 * main arena ([heap]), its per-thread arenas (anonymous read-write mappings at
 * a 64 MiB-aligned address, glibc's HEAP_MAX_SIZE: a heuristic, but what
 * showed the read buffers retained by the data threads' arenas), other
 * anonymous memory (V8's heap, socket slabs, mock device state, mmapped
 * blocks) and files.
 */
function rssByKind(): { mainArenaMiB: number; threadArenasMiB: number; otherAnonMiB: number; fileMiB: number } {
  const out = { mainArenaMiB: 0, threadArenasMiB: 0, otherAnonMiB: 0, fileMiB: 0 };
  let kind: keyof typeof out = 'otherAnonMiB';
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      const start = BigInt(`0x${head[1]}`);
      const size = BigInt(`0x${head[2]}`) - start;
      const name = head[4]!;
      if (name === '[heap]') kind = 'mainArenaMiB';
      else if (name) kind = 'fileMiB';
      else kind = head[3]!.startsWith('rw') && start % (64n << 20n) === 0n && size <= 64n << 20n ? 'threadArenasMiB' : 'otherAnonMiB';
    } else if (line.startsWith('Rss:')) out[kind] += Number(/(\d+)/.exec(line)![1]) / 1024;
  }
  return out;
}

// ---- the driver ----

interface Worker {
  proc: ChildProcess;
  pid: number;
  uri: string;
  next(key: string, timeoutMs?: number): Promise<Record<string, unknown>>;
  send(cmd: object): void;
}

async function startWorker(spec: WorkerSpec): Promise<Worker> {
  const proc = spawn(process.execPath, ['--expose-gc', SELF, 'worker', JSON.stringify(spec)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const queues = new Map<string, Record<string, unknown>[]>();
  const waiters = new Map<string, (o: Record<string, unknown>) => void>();
  onJsonLines(proc.stdout!, (o) => {
    for (const key of Object.keys(o)) {
      const w = waiters.get(key);
      if (w) {
        waiters.delete(key);
        w(o[key] as Record<string, unknown>);
      } else queues.set(key, [...(queues.get(key) ?? []), o[key] as Record<string, unknown>]);
    }
  });
  const next = (key: string, timeoutMs = 120_000) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const q = queues.get(key);
      if (q?.length) return resolve(q.shift()!);
      const timer = setTimeout(() => reject(new Error(`worker ${proc.pid}: no ${key} within ${timeoutMs} ms`)), timeoutMs);
      waiters.set(key, (o) => {
        clearTimeout(timer);
        resolve(o);
      });
    });
  const send = (cmd: object) => proc.stdin!.write(`${JSON.stringify(cmd)}\n`);
  const uri = (await next('listening', 30_000)) as unknown as string;
  const pid = proc.pid!;
  return { proc, pid, uri, next, send };
}

/** RSS, peak RSS and open fds of a process, from /proc. */
function procStats(pid: number): { rssMiB: number; hwmMiB: number; fds: number; sockets: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
  let fds = 0;
  let sockets = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
      fds++;
      if (target.startsWith('socket:')) sockets++;
    } catch {
      // closed meanwhile
    }
  }
  return { rssMiB: kib('VmRSS') / 1024, hwmMiB: kib('VmHWM') / 1024, fds, sockets };
}

async function snapshot(workers: Worker[]) {
  return Promise.all(
    workers.map(async (w) => {
      w.send({ stats: true });
      const inner = await w.next('stats');
      return { ...procStats(w.pid), ...inner } as ReturnType<typeof procStats> & ReturnType<typeof rssByKind> & { heapUsedBytes: number; externalBytes: number; destinationHistory: number };
    }),
  );
}

async function quit(w: Worker): Promise<void> {
  w.send({ quit: true });
  await new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      w.proc.kill('SIGKILL');
      resolve();
    }, 10_000);
    w.proc.on('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

const fmtMiB = (v: number) => v.toFixed(1);

async function main(): Promise<number> {
  const { values } = parseArgs({ options: { migrations: { type: 'string' }, warmup: { type: 'string' }, 'sample-every': { type: 'string' }, 'big-gib': { type: 'string' } } });
  const total = Number(values.migrations ?? 200);
  const warmup = Number(values.warmup ?? 20);
  const every = Number(values['sample-every'] ?? 10);
  const windowSamples = 5;
  if (!(warmup >= 1 && every >= 1 && total >= warmup + (2 * windowSamples - 1) * every)) throw new Error(`--migrations must leave ${2 * windowSamples} samples after the warm-up`);
  const bigGiB = Number(values['big-gib'] ?? 8);
  let failures = 0;

  // ---- soak ----
  const t0 = performance.now();
  const a = await startWorker({ ...SOAK_SPEC, seed: 1, vmRunning: true });
  const b = await startWorker({ ...SOAK_SPEC, seed: 1000, vmRunning: false });
  const pair = [a, b];
  // samples[k]: both processes after migration sampledAt[k]
  const samples: Awaited<ReturnType<typeof snapshot>>[] = [];
  const sampledAt: number[] = [];
  const ms: number[] = [];
  for (let i = 0; i < total; i++) {
    const [from, to] = i % 2 === 0 ? [a, b] : [b, a];
    from.send({ migrate: to.uri });
    const [m, s] = await Promise.all([from.next('migrated'), to.next('served')]);
    ms.push(m.ms as number);
    if (m.status !== 'completed' || !m.digestsMatch || s.status !== 'completed') {
      failures++;
      console.log(`migration ${i + 1}: ${JSON.stringify(m)} / ${JSON.stringify(s)}`);
    }
    if (i + 1 >= warmup && (i + 1 - warmup) % every === 0) {
      samples.push(await snapshot(pair));
      sampledAt.push(i + 1);
    }
    // SOAK_HEAP_SNAPSHOTS=dir: heap snapshots of process A after the warm-up and at the end (to find what grows).
    if (process.env.SOAK_HEAP_SNAPSHOTS && (i + 1 === warmup || i + 1 === total)) {
      a.send({ snapshot: `${process.env.SOAK_HEAP_SNAPSHOTS}/a-${i + 1}.heapsnapshot` });
      await a.next('snapshot');
    }
    if ((i + 1) % 50 === 0) console.log(`  ${i + 1} migrations, ${failures} failed, last ${(m.ms as number).toFixed(0)} ms, RSS ${pair.map((w) => fmtMiB(procStats(w.pid).rssMiB)).join(' / ')} MiB`);
  }
  if (sampledAt.at(-1) !== total) {
    samples.push(await snapshot(pair));
    sampledAt.push(total);
  }
  const warm = samples[0]!;
  const end = samples.at(-1)!;
  const soakS = (performance.now() - t0) / 1000;
  await Promise.all(pair.map(quit));
  const sorted = [...ms].sort((x, y) => x - y);
  console.log(`soak: ${total} migrations (alternating) in ${soakS.toFixed(0)} s, ${failures} failed; per migration median ${sorted[Math.floor(sorted.length / 2)]!.toFixed(0)} ms, max ${sorted.at(-1)!.toFixed(0)} ms`);
  for (const [name, i] of [['A', 0], ['B', 1]] as const) {
    const w = warm[i]!;
    const e = end[i]!;
    const kinds = (s: typeof w) => `[heap] ${fmtMiB(s.mainArenaMiB)} + thread arenas ${fmtMiB(s.threadArenasMiB)} + other anon ${fmtMiB(s.otherAnonMiB)} + files ${fmtMiB(s.fileMiB)}`;
    console.log(
      `  process ${name}: RSS after migration ${sampledAt[0]} -> ${total}: ${fmtMiB(w.rssMiB)} -> ${fmtMiB(e.rssMiB)} MiB (${kinds(w)} -> ${kinds(e)}), heap ${fmtMiB(w.heapUsedBytes / MiB)} -> ${fmtMiB(e.heapUsedBytes / MiB)} MiB, external ${fmtMiB(w.externalBytes / MiB)} -> ${fmtMiB(e.externalBytes / MiB)} MiB, fds ${w.fds} -> ${e.fds} (sockets ${w.sockets} -> ${e.sockets}), destination event history ${w.destinationHistory} -> ${e.destinationHistory} records`,
    );
  }
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
  const growth = pair.map((_, i) => {
    const rss = samples.map((s) => s[i]!.rssMiB);
    const first = median(rss.slice(0, windowSamples));
    const last = median(rss.slice(-windowSamples));
    return { rss, first, last, pct: ((last - first) / first) * 100, singlePct: ((rss.at(-1)! - rss[0]!) / rss[0]!) * 100 };
  });
  for (const [name, i] of [['A', 0], ['B', 1]] as const) {
    const g = growth[i]!;
    console.log(
      `  process ${name}: RSS MiB after migrations ${sampledAt.join(',')}: ${g.rss.map(fmtMiB).join(' ')}; ` +
        `median of migrations ${sampledAt.slice(0, windowSamples).join(',')} ${fmtMiB(g.first)} -> of ${sampledAt.slice(-windowSamples).join(',')} ${fmtMiB(g.last)} MiB (${g.pct.toFixed(1)}%); single samples ${g.singlePct.toFixed(1)}%`,
    );
  }
  const rssGrowthPct = Math.max(...growth.map((g) => g.pct));
  const fdGrowth = pair.reduce((n, _, i) => n + (end[i]!.fds - warm[i]!.fds), 0);

  // ---- one big migration ----
  const t1 = performance.now();
  const src = await startWorker({ ...bigSpec(bigGiB), seed: 1, vmRunning: true });
  const dst = await startWorker({ ...bigSpec(bigGiB), seed: 1000, vmRunning: false });
  src.send({ migrate: dst.uri, channels: 2 });
  const [m, s] = await Promise.all([src.next('migrated', 900_000), dst.next('served', 900_000)]);
  const peaks = [procStats(src.pid), procStats(dst.pid)];
  await Promise.all([quit(src), quit(dst)]);
  const big = m as { status: string; ms: number; bytes: number; downtimeMs: number; digestsMatch: boolean };
  if (big.status !== 'completed' || !big.digestsMatch || s.status !== 'completed') {
    failures++;
    console.log(`${bigGiB} GiB migration: ${JSON.stringify(m)} / ${JSON.stringify(s)}`);
  }
  console.log(
    `big: ${bigGiB} GiB of device state (1 device, 64 KiB chunks) ${big.status} in ${(big.ms / 1000).toFixed(1)} s (${((big.bytes / big.ms) * 1000 / 2 ** 30).toFixed(2)} GiB/s, downtime ${big.downtimeMs?.toFixed(0)} ms, digests ${big.digestsMatch ? 'match' : 'MISMATCH'}); ` +
      `VmHWM source ${fmtMiB(peaks[0]!.hwmMiB)} MiB, destination ${fmtMiB(peaks[1]!.hwmMiB)} MiB; took ${((performance.now() - t1) / 1000).toFixed(0)} s`,
  );
  const peakMiB = Math.max(peaks[0]!.hwmMiB, peaks[1]!.hwmMiB);

  const verdict = (ok: boolean) => (ok ? 'met' : 'missed');
  // What the figure is (see the header): said in the output, since it is not
  // the single-sample warm-up -> end growth that earlier runs printed.
  console.log(`soak-rss-growth is the median RSS (after a full GC) of migrations ${sampledAt.slice(-windowSamples).join(',')} over that of ${sampledAt.slice(0, windowSamples).join(',')}, the larger of the two processes`);
  console.log(`bench soak-rss-growth: ${rssGrowthPct.toFixed(1)}% target 10% ${verdict(rssGrowthPct <= 10)}`);
  console.log(`bench soak-fd-growth: ${fdGrowth} target 0 ${verdict(fdGrowth <= 0)}`);
  console.log(`bench peak-rss-${bigGiB}gib: ${peakMiB.toFixed(0)} MiB target 256 MiB ${verdict(peakMiB <= 256)}`);
  return failures ? 1 : 0;
}

if (process.argv[2] === 'worker') void worker(JSON.parse(process.argv[3]!) as WorkerSpec);
else
  main().then(
    (code) => process.exit(code),
    (err) => {
      console.error(err);
      process.exit(1);
    },
  );
