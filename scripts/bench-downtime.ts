// npm run bench:downtime: the downtime promise, scenario by scenario.
// Every scenario runs from an empty arc history (first contact: with and
// without the switchover-arc probe) and again with the history the first
// contact left, for our policy (device-aware estimate, switchover-ack) and for
// a reproduction of QEMU's classic one (stop-copy bytes over bandwidth, no
// ack, no device time). Scenarios with a link cap run the destination in a
// second network namespace behind a tbf-capped veth pair; the others over a
// unix socket. A stall is answered as a management app would: the limit is
// raised to the suggestion (the violation is then judged against the limit
// in force). Each row: measured and expected downtime, the estimate's parts,
// the signed error and whether the limit in force was violated.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { MigrationSource, type MigrationInfo } from '../src/migration/source.js';
import { clearArcHistory } from '../src/migration/vfio-handler.js';
import { clearSwitchoverHistory } from '../src/migration/switchover-history.js';
import type { MockProfileInput } from '../src/vfio/mock-profile.js';
import { onJsonLines } from '../src/json-lines.js';
import { deviceArgs, sourceSide } from '../test/harness.js';
import { createNetns, type Netns } from '../test/helpers.js';

const MiB = 1 << 20;
const fmt = (v: number | null | undefined) => (v === null || v === undefined ? '-' : v.toFixed(0));
const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'src', 'cli.js');

interface Scenario {
  name: string;
  mock: [string, number][];
  overrides?: Partial<MockProfileInput>;
  ram?: { sizeBytes: number; dirtyBytesPerSec: number; workingSetBytes: number };
  limitMs: number;
  /** Link cap in Mbit/s, each direction (0: unix socket, no cap). */
  linkMbit: number;
}

const scenarios: Scenario[] = [
  {
    name: 'mlx5-like VF, 350 ms quiesce, 1 Gbit/s',
    mock: [['nic-vf', 1]],
    overrides: { stateBytes: '32MiB', dirtyWorkingSetBytes: '2MiB', arcLatencyMs: { default: 2, 'pre-copy>pre-copy-p2p': 350 } },
    limitMs: 300,
    linkMbit: 1000,
  },
  { name: 'vGPU 384 MiB + nic-vf + 1 GiB RAM, 1 Gbit/s', mock: [['vgpu', 1], ['nic-vf', 1]], ram: { sizeBytes: 1024 * MiB, dirtyBytesPerSec: 16 * MiB, workingSetBytes: 16 * MiB }, limitMs: 300, linkMbit: 1000 },
  { name: 'nic-vf x2 (400 ms P2P arc)', mock: [['nic-vf', 2]], overrides: { stateBytes: '16MiB', dirtyWorkingSetBytes: '2MiB' }, limitMs: 1000, linkMbit: 0 },
  { name: 'slow-load (2 s initial load)', mock: [['nic-vf', 1]], overrides: { stateBytes: '8MiB', dirtyWorkingSetBytes: '1MiB', loadInitialMs: 2000, arcLatencyMs: { default: 5 } }, limitMs: 300, linkMbit: 0 },
  {
    name: 'gpu 512 MiB, 2 Gbit/s',
    mock: [['gpu', 1]],
    overrides: { stateBytes: '512MiB', stopCopyOnlyBytes: '64MiB', setupBytes: '16MiB', dirtyBytesPerSec: '64MiB', dirtyWorkingSetBytes: '64MiB', loadInitialMs: 1000 },
    limitMs: 1500,
    linkMbit: 2000,
  },
  { name: 'serial x4 + RAM', mock: [['serial', 4]], ram: { sizeBytes: 128 * MiB, dirtyBytesPerSec: 32 * MiB, workingSetBytes: 16 * MiB }, limitMs: 300, linkMbit: 0 },
];

interface Destination {
  uri: string;
  result: Promise<Record<string, unknown> | null>;
  exit: Promise<number | null>;
}

let destinations = 0;

/** The CLI's `incoming` in its own process, in the link's namespace when there is one. */
async function startDestination(s: Scenario, link: Netns | null, arcHistory: string): Promise<Destination> {
  const uri = link ? `tcp:${link.nsIp}:${4400 + (++destinations % 500)}` : `unix:${path.join(tmpdir(), `vfm-bench-${process.pid}-${++destinations}.sock`)}`;
  const argv = [process.execPath, CLI, 'incoming', '--listen', uri, '--json', '--once', '--arc-history', arcHistory, ...deviceArgs(s)];
  const cmd = link ? ['ip', 'netns', 'exec', link.name, ...argv] : argv;
  const proc = spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  let resolveResult!: (r: Record<string, unknown> | null) => void;
  const result = new Promise<Record<string, unknown> | null>((r) => (resolveResult = r));
  const exit = new Promise<number | null>((r) => proc.on('close', (c) => r(c)));
  await new Promise<void>((resolve, reject) => {
    onJsonLines(proc.stdout!, (o) => {
      if (o.listening) resolve();
      else if (o.result) resolveResult(o.result as Record<string, unknown>);
    });
    proc.on('exit', (code) => {
      resolveResult(null);
      reject(new Error(`destination exited (${code}) before listening: ${stderr}`));
    });
  });
  return { uri, result, exit };
}

type Policy = 'ours' | 'classic';

/**
 * CPU time this (virtual) machine's host gave to others while we waited for
 * it, from /proc/stat: the neighbours' share of a shared host, which no model
 * of devices and links foresees. Read synchronously so that the sample is
 * taken at the moment of the event (a bench, not the library).
 */
function cpuTimes(): { stealJiffies: number; totalJiffies: number } {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal guest guest_nice: guest time is already in user.
  const counted = fields.slice(0, 8);
  return { stealJiffies: fields[7] ?? 0, totalJiffies: counted.reduce((a, b) => a + b, 0) };
}
const stealPct = (from: ReturnType<typeof cpuTimes>, to: ReturnType<typeof cpuTimes>): number | null =>
  to.totalJiffies > from.totalJiffies ? ((to.stealJiffies - from.stealJiffies) / (to.totalJiffies - from.totalJiffies)) * 100 : null;

interface Row {
  scenario: Scenario;
  policy: Policy;
  history: 'first contact' | 'learned';
  probe: boolean;
  info: MigrationInfo;
  limitInForceMs: number;
  stalls: number;
  /** Host CPU steal over the whole row and over its switchover (VM stop to completion), % of CPU time. */
  stealRowPct: number | null;
  stealSwitchoverPct: number | null;
}

async function run(s: Scenario, link: Netns | null, policy: Policy, probe: boolean, history: Row['history'], destHistory: string): Promise<Row> {
  const dest = await startDestination(s, link, destHistory);
  const side = await sourceSide(s);
  const src = new MigrationSource({
    handlers: side.handlers,
    vm: side.vm,
    policy: policy === 'ours' ? 'device-aware' : 'classic',
    capabilities: { 'switchover-ack': policy === 'ours', 'x-probe-switchover-arcs': probe },
    parameters: { 'downtime-limit': s.limitMs, 'stall-iterations': 6 },
  });
  let stalls = 0;
  const rowStart = cpuTimes();
  let atStop: ReturnType<typeof cpuTimes> | null = null;
  src.on('MIGRATION', (d) => {
    if (d.status === 'device') atStop = cpuTimes();
  });
  src.on('MIGRATION_STALLED', (d) => {
    stalls++;
    src.setParameters({ 'downtime-limit': d.suggestedDowntimeLimitMs });
  });
  const timer = setTimeout(() => src.cancel('no switchover within 90 s'), 90_000);
  let info: MigrationInfo;
  try {
    info = await src.migrate(dest.uri, { channels: 2 });
  } catch {
    info = src.query();
  }
  clearTimeout(timer);
  const rowEnd = cpuTimes();
  await dest.exit;
  await side.close();
  return { scenario: s, policy, history, probe, info, limitInForceMs: info.downtimeLimitInForceMs, stalls, stealRowPct: stealPct(rowStart, rowEnd), stealSwitchoverPct: atStop ? stealPct(atStop, rowEnd) : null };
}

/**
 * The estimate's error is relative to the measured downtime, but to no less
 * than ERROR_FLOOR_MS. Below it, what separates estimate and measurement is
 * mostly scheduling: on the shared 2-core host this bench runs on, the event
 * loops of both ends are preempted for 10-60 ms now and then (10 ms of arcs
 * measured at 65 ms), which no model of the devices and the link can
 * foresee; +15 ms on a 40 ms downtime is not a broken model, +130 ms is
 * (130% against the floor). Each row shows both figures; the target uses the floored one.
 */
const ERROR_FLOOR_MS = 100;
const errorAgainst = (r: Row, floorMs: number): number | null =>
  r.info.status === 'completed' && r.info.downtimeMs && r.info.expectedDowntimeMs !== null ? ((r.info.expectedDowntimeMs - r.info.downtimeMs) / Math.max(r.info.downtimeMs, floorMs)) * 100 : null;
const rawError = (r: Row) => errorAgainst(r, 0);
const signedError = (r: Row) => errorAgainst(r, ERROR_FLOOR_MS);
const pct = (e: number | null) => (e === null ? '-' : `${e >= 0 ? '+' : ''}${e.toFixed(0)}%`);
const violated = (r: Row): boolean => r.info.status === 'completed' && r.info.downtimeMs! > r.limitInForceMs;

const measuredParts = (r: Row): string => {
  const m = r.info.measuredSwitchover;
  if (!m) return '-';
  const rate = m.stopCopyBytesPerSec === null ? '' : ` (${((m.stopCopyBytes / MiB) | 0)} MiB at ${(m.stopCopyBytesPerSec / MiB).toFixed(0)} MiB/s)`;
  return `${fmt(m.sourceArcsMs)} / ${fmt(m.dataMs)}${rate} / ${fmt(m.destinationLoadMs)} / ${fmt(m.destinationResumeMs)}`;
};

const stealFmt = (p: number | null) => (p === null ? '-' : p.toFixed(1));
const benchStart = cpuTimes();
const rows: Row[] = [];
const work = await mkdtemp(path.join(tmpdir(), 'vfm-bench-downtime-'));
try {
  for (const s of scenarios.filter((x) => !process.env.BENCH_ONLY || x.name.includes(process.env.BENCH_ONLY))) {
    const link = s.linkMbit > 0 ? createNetns({ rateMbit: s.linkMbit }) : null;
    try {
      const learnedFile = path.join(work, `${rows.length}-arc-history.json`);
      // First contact, without then with the probe; the probed run's arcs
      // (both ends) are the history of the learned run.
      clearArcHistory();
      clearSwitchoverHistory();
      rows.push(await run(s, link, 'ours', false, 'first contact', 'none'));
      clearArcHistory();
      clearSwitchoverHistory();
      rows.push(await run(s, link, 'ours', true, 'first contact', learnedFile));
      rows.push(await run(s, link, 'ours', true, 'learned', learnedFile));
      // The classic policy ignores device time, so history changes nothing for it; both rows are run all the same.
      // BENCH_CLASSIC=off skips them (while iterating on our policy).
      if (process.env.BENCH_CLASSIC !== 'off') {
        rows.push(await run(s, link, 'classic', false, 'first contact', 'none'));
        rows.push(await run(s, link, 'classic', false, 'learned', learnedFile));
      }
    } finally {
      link?.destroy();
    }
  }
} finally {
  await rm(work, { recursive: true, force: true });
}

console.log(`| scenario | link | policy | history | probe | limit ms (in force) | status | measured ms | measured parts (src arcs / data / dst load / dst resume) | expected ms | estimate parts | error | error (floor ${ERROR_FLOOR_MS} ms) | violation | host steal % (row / switchover) |`);
console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |');
for (const r of rows) {
  const e = signedError(r);
  const split = r.info.expectedDowntime?.summary.replace(/; unmeasured: .*/, (m) => (m.length > 80 ? `; unmeasured: ${r.info.expectedDowntime!.unmeasured.length} arcs` : m)) ?? '-';
  const limit = r.limitInForceMs === r.scenario.limitMs ? `${r.scenario.limitMs}` : `${r.scenario.limitMs} (${r.limitInForceMs})`;
  console.log(
    `| ${r.scenario.name} | ${r.scenario.linkMbit ? `${r.scenario.linkMbit} Mbit/s veth` : 'unix'} | ${r.policy} | ${r.history} | ${r.probe ? 'on' : 'off'} | ${limit} | ${r.info.status}${r.stalls ? `, ${r.stalls} stall(s)` : ''} | ${fmt(r.info.downtimeMs)} | ${measuredParts(r)} | ${fmt(r.info.expectedDowntimeMs)} | ${split} | ${pct(rawError(r))} | ${pct(e)} | ${violated(r) ? 'yes' : 'no'} | ${stealFmt(r.stealRowPct)} / ${stealFmt(r.stealSwitchoverPct)} |`,
  );
}
const ours = rows.filter((r) => r.policy === 'ours' && r.probe);
const unprobed = rows.filter((r) => r.policy === 'ours' && !r.probe);
const classic = rows.filter((r) => r.policy === 'classic');
const maxAbs = (rs: Row[]) => Math.max(0, ...rs.map((r) => Math.abs(signedError(r) ?? 0)));
const notCompleted = ours.filter((r) => r.info.status !== 'completed').length;
console.log(`\nclassic policy: ${classic.filter(violated).length} violations of ${classic.length} rows, largest estimate error ${maxAbs(classic).toFixed(0)}%`);
console.log(`first contact without the probe: ${unprobed.filter(violated).length} violations of ${unprobed.length} rows, largest estimate error ${maxAbs(unprobed).toFixed(0)}%`);
if (notCompleted) console.log(`our policy: ${notCompleted} rows did not complete (no error figure for them)`);
const violations = ours.filter(violated).length;
const maxError = maxAbs(ours);
console.log(`largest estimate error of our policy against the measured downtime itself (no floor): ${Math.max(0, ...ours.map((r) => Math.abs(rawError(r) ?? 0))).toFixed(1)}%`);
console.log(`(the error target is against max(measured, ${ERROR_FLOOR_MS} ms): below that, scheduling noise of this host dominates; see ERROR_FLOOR_MS)`);
const runSteal = stealPct(benchStart, cpuTimes());
const stolen = ours.filter((r) => (r.stealSwitchoverPct ?? 0) >= 5);
console.log(`host CPU steal over the run: ${stealFmt(runSteal)}%; rows of our policy whose switchover lost 5% or more of the CPU to the host's other guests: ${stolen.length ? stolen.map((r) => `${r.scenario.name} (${r.history}, ${stealFmt(r.stealSwitchoverPct)}%, error ${pct(signedError(r))})`).join('; ') : 'none'}`);
console.log(`bench downtime-violations: ${violations} target 0 ${violations === 0 ? 'met' : 'missed'}`);
console.log(`bench downtime-estimate-error: ${maxError.toFixed(1)}% target 15% ${maxError <= 15 && notCompleted === 0 ? 'met' : 'missed'}`);
