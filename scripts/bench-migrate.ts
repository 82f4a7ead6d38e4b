// npm run bench:migrate: device-state throughput of the full stack (mock
// device -> addon -> frames -> loopback TCP -> another process -> mock device)
// against a plain Node socket pipe between two processes moving the same
// bytes, the same full stack over TLS (mutual x509, certificates made with
// openssl for the run) against it in clear, and the switchover time of 1 vs
// 16 devices whose arcs take 50 ms. The TLS rounds print each end's CPU per
// GiB: on a host whose cores the clear stack already fills, the TLS ratio is
// about the ratio of those totals. BENCH_ROUNDS=n (default 5);
// BENCH_CPU_PROF=dir profiles the destinations (see startTcpDestination).
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { MigrationSource } from '../src/migration/source.js';
import { deviceArgs, sourceSide, startDestination } from '../test/harness.js';
import { type TlsFixtures, makeTlsFixtures } from '../test/tls-fixtures.js';

const MiB = 1 << 20;
const rounds = Number(process.env.BENCH_ROUNDS ?? 5);
const big = { stateBytes: '1GiB', chunkBytes: '64KiB', setupBytes: 0, stopCopyOnlyBytes: 0, dirtyBytesPerSec: 0, dirtyWorkingSetBytes: 0, loadInitialMs: 0, loadMsPerMiB: 0, arcLatencyMs: { default: 0 } };

/**
 * CPU seconds (user + system, all threads) of this process and of its
 * children that have exited (the destination once it is done): the fields
 * of /proc/self/stat, in clock ticks (100/s on Linux). null without /proc.
 */
function cpuSeconds(): { self: number; children: number } | null {
  try {
    const stat = readFileSync('/proc/self/stat', 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
    // utime, stime, cutime, cstime are fields 14-17 of the line (11-14 after the command).
    return { self: (f[11]! + f[12]!) / 100, children: (f[13]! + f[14]!) / 100 };
  } catch {
    return null;
  }
}

/** `tls`: both ends over mutual x509 TLS (tcp:127.0.0.1, which the destination's certificate names). */
async function fullStack(tls?: TlsFixtures): Promise<{ bytes: number; seconds: number; cpuPerGiB?: { source: number; destination: number } }> {
  const spec = { mock: [['gpu', 1]] as [string, number][], overrides: big };
  const tcp = await startTcpDestination(spec, tls ? ['--tls-creds', tls.dest, '--tls-authz', tls.sourceDn] : []);
  const side = await sourceSide(spec);
  // The mock's P2P quiesce is instant: assumed at the default 300 ms, it alone fills the default downtime-limit and the stream never switches over.
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: { 'x-assumed-p2p-arc-ms': 5 }, ...(tls ? { tls: { creds: tls.source } } : {}) });
  const before = cpuSeconds();
  const info = await src.migrate(tcp.uri);
  await tcp.done;
  const after = cpuSeconds();
  await side.close();
  const seconds = (info.totalTimeMs - info.setupTimeMs) / 1000;
  // Whole processes (device threads, GC, the destination's start-up too): where the CPU goes, not a precise cost.
  const gib = info.transferredBytes / 2 ** 30;
  const cpuPerGiB = before && after ? { source: (after.self - before.self) / gib, destination: (after.children - before.children) / gib } : undefined;
  return { bytes: info.transferredBytes, seconds, ...(cpuPerGiB ? { cpuPerGiB } : {}) };
}

/** The CLI's destination on loopback TCP (port chosen by the OS). */
async function startTcpDestination(spec: Parameters<typeof deviceArgs>[0], extra: string[] = []): Promise<{ uri: string; done: Promise<void> }> {
  const { CLI } = await import('../test/harness.js');
  // BENCH_CPU_PROF=dir: the destination writes a V8 CPU profile there (NODE_OPTIONS refuses --cpu-prof; run this script with --cpu-prof for the source's).
  const prof = process.env.BENCH_CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`] : [];
  const proc = spawn(process.execPath, [...prof, CLI, 'incoming', '--listen', 'tcp:127.0.0.1:0', '--json', '--once', '--arc-history', 'none', ...deviceArgs(spec), ...extra], { stdio: ['ignore', 'pipe', 'inherit'] });
  let buf = '';
  const uri = await new Promise<string>((resolve) =>
    proc.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = /"listening":"([^"]+)"/.exec(buf);
      if (m) resolve(m[1]!);
    }),
  );
  return { uri, done: new Promise((r) => proc.on('close', () => r())) };
}

/** A plain socket pipe: this process writes 1 MiB buffers, a child process reads and discards. */
async function socketBaseline(bytes: number): Promise<{ bytes: number; seconds: number }> {
  const reader = spawn(process.execPath, ['-e', `
    const net = require('net');
    const s = net.createServer((c) => { let n = 0; c.on('data', (d) => { n += d.length; }); c.on('end', () => { process.stdout.write(String(n)); c.end(); s.close(); }); });
    s.listen(0, '127.0.0.1', () => process.stdout.write('port:' + s.address().port + '\\n'));
  `], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  const port = await new Promise<number>((resolve) =>
    reader.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /port:(\d+)\n/.exec(out);
      if (m) resolve(Number(m[1]));
    }),
  );
  const sock = net.connect({ host: '127.0.0.1', port });
  await new Promise((r) => sock.once('connect', r));
  const chunk = Buffer.alloc(MiB, 0xa5);
  const t0 = performance.now();
  for (let sent = 0; sent < bytes; sent += MiB) {
    // A fresh buffer per write, as the device path produces one per read.
    if (!sock.write(Buffer.from(chunk))) await new Promise((r) => sock.once('drain', r));
  }
  sock.end();
  await new Promise((r) => reader.on('close', r));
  const seconds = (performance.now() - t0) / 1000;
  return { bytes, seconds };
}

async function switchoverMs(devices: number): Promise<number> {
  const overrides = { stateBytes: '256KiB', dirtyBytesPerSec: 0, dirtyWorkingSetBytes: 0, arcLatencyMs: { default: 50 } };
  const spec = { mock: [['nic-vf', devices]] as [string, number][], overrides };
  const dest = await startDestination(deviceArgs(spec));
  const side = await sourceSide(spec);
  const src = new MigrationSource({ handlers: side.handlers, vm: side.vm, parameters: { 'downtime-limit': 5000 } });
  const info = await src.migrate(dest.uri, { channels: Math.min(8, devices + 1) });
  await dest.exitCode;
  await side.close();
  return info.downtimeMs!;
}

let bestOurs = 0;
let streamBytes = 0;
let bestBase = 0;
for (let i = 0; i < rounds; i++) {
  // Alternate which runs first: a noisy shared machine should not favour either.
  let ours: { bytes: number; seconds: number };
  let base: { bytes: number; seconds: number };
  if (i % 2 === 0) {
    ours = await fullStack();
    base = await socketBaseline(ours.bytes);
  } else {
    base = await socketBaseline(streamBytes); // what the first round's stack moved
    ours = await fullStack();
  }
  streamBytes ||= ours.bytes;
  const o = ours.bytes / ours.seconds / 1e6;
  const b = base.bytes / base.seconds / 1e6;
  console.log(`round ${i + 1}: full stack ${o.toFixed(0)} MB/s, plain socket pipe ${b.toFixed(0)} MB/s (${(ours.bytes / MiB).toFixed(0)} MiB)`);
  bestOurs = Math.max(bestOurs, o);
  bestBase = Math.max(bestBase, b);
}
// The full stack over TLS against the same stack in clear, in one run: each round runs both, alternating which goes first.
const tlsFixtures = await makeTlsFixtures();
let bestClear = 0;
let bestTls = 0;
try {
  for (let i = 0; i < rounds; i++) {
    const pair = i % 2 === 0 ? [await fullStack(), await fullStack(tlsFixtures)] : [await fullStack(tlsFixtures), await fullStack()].reverse();
    const [clear, secure] = pair.map((r) => r!.bytes / r!.seconds / 1e6) as [number, number];
    const cpu = pair.map((r) => (r!.cpuPerGiB ? ` (CPU s/GiB: source ${r!.cpuPerGiB.source.toFixed(2)}, destination ${r!.cpuPerGiB.destination.toFixed(2)})` : '')) as [string, string];
    console.log(`round ${i + 1}: full stack over TLS ${secure.toFixed(0)} MB/s${cpu[1]}, in clear ${clear.toFixed(0)} MB/s${cpu[0]}`);
    bestClear = Math.max(bestClear, clear);
    bestTls = Math.max(bestTls, secure);
  }
} finally {
  await tlsFixtures.remove();
}
const one: number[] = [];
const sixteen: number[] = [];
for (let i = 0; i < rounds; i++) {
  one.push(await switchoverMs(1));
  sixteen.push(await switchoverMs(16));
  console.log(`round ${i + 1}: switchover (VM stop to destination running) 1 device ${one.at(-1)!.toFixed(0)} ms, 16 devices ${sixteen.at(-1)!.toFixed(0)} ms`);
}
const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
const tputRatio = bestOurs / bestBase;
const swRatio = median(sixteen) / median(one);
console.log(`bench migrate-throughput: ${tputRatio.toFixed(2)}x plain socket pipe (${bestOurs.toFixed(0)} vs ${bestBase.toFixed(0)} MB/s) target 0.90x ${tputRatio >= 0.9 ? 'met' : 'missed'}`);
const tlsRatio = bestTls / bestClear;
console.log(`bench tls-throughput: ${tlsRatio.toFixed(2)}x plaintext (${bestTls.toFixed(0)} vs ${bestClear.toFixed(0)} MB/s, TLS 1.3 AES-128-GCM, mutual x509) target 0.70x ${tlsRatio >= 0.7 ? 'met' : 'missed'}`);
console.log(`bench switchover-16-devices: ${swRatio.toFixed(2)}x one device (${median(sixteen).toFixed(0)} vs ${median(one).toFixed(0)} ms) target 1.50x ${swRatio <= 1.5 ? 'met' : 'missed'}`);
