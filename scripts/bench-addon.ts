// npm run bench:addon: control-call rates on a mock device, and the throughput
// of reading a mock device's state through the full stack (addon worker thread,
// real pipe fd, JS Buffers) against a baseline measured in the same run:
// reading the same bytes from a pipe fd with node:fs in this process, fed by a
// writer process. Ends with one line per target.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { openMockDevice } from '../src/vfio/mock.js';

const MiB = 1 << 20;
const CHUNK = MiB;
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);

async function callRate(name: string, fn: () => Promise<unknown>, seconds = 1): Promise<number> {
  let calls = 0;
  const t0 = performance.now();
  while (performance.now() - t0 < seconds * 1000) {
    await fn();
    calls++;
  }
  const rate = calls / ((performance.now() - t0) / 1000);
  console.log(`${name}: ${Math.round(rate)} calls/s (sequential, one in flight)`);
  return rate;
}

async function fullStackRead(): Promise<{ bytes: number; seconds: number }> {
  const dev = await openMockDevice({ profile: 'gpu', overrides: { stateBytes: '1GiB', setupBytes: 0, stopCopyOnlyBytes: 0, dirtyBytesPerSec: 0, dirtyWorkingSetBytes: 0 } });
  await dev.setState('stop');
  const s = (await dev.setState('stop-copy'))!;
  let bytes = 0;
  const t0 = performance.now();
  for (;;) {
    const r = await s.read(CHUNK);
    if (r.kind !== 'data') break;
    bytes += r.bytes.length;
  }
  const seconds = (performance.now() - t0) / 1000;
  await dev.close();
  return { bytes, seconds };
}

async function pipeBaseline(bytes: number): Promise<{ bytes: number; seconds: number }> {
  const dir = mkdtempSync(path.join(tmpdir(), 'bench-pipe-'));
  const fifo = path.join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  // The writer gives the pipe the same 1 MiB capacity the mock's pipe has.
  const writer = spawn('python3', ['-c', `
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
try: fcntl.fcntl(fd, 1031, ${MiB})
except OSError: pass
buf = b'\\xa5' * ${MiB}
left = int(sys.argv[2])
while left > 0:
    n = os.write(fd, buf[:min(left, len(buf))])
    left -= n
os.close(fd)
`, fifo, String(bytes)], { stdio: 'inherit' });
  const fh = await open(fifo, 'r');
  let got = 0;
  const t0 = performance.now();
  for (;;) {
    const buf = Buffer.allocUnsafe(CHUNK);
    const { bytesRead } = await fh.read(buf, 0, CHUNK, null);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  const seconds = (performance.now() - t0) / 1000;
  await fh.close();
  // The writer may have exited already (its 'exit' then never comes again: exit 13, nothing printed).
  if (writer.exitCode === null && writer.signalCode === null) await new Promise((r) => writer.once('exit', r));
  rmSync(dir, { recursive: true, force: true });
  return { bytes: got, seconds };
}

const dev = await openMockDevice({ profile: 'nic-vf' });
await callRate('get-state', () => dev.getState());
await dev.setState('pre-copy');
await callRate('precopy-info', () => dev.precopyInfo());
await dev.close();

let best = 0;
let bestBase = 0;
for (let i = 0; i < rounds; i++) {
  const ours = await fullStackRead();
  const base = await pipeBaseline(ours.bytes);
  const oursRate = ours.bytes / ours.seconds / 1e6;
  const baseRate = base.bytes / base.seconds / 1e6;
  console.log(`round ${i + 1}: full stack ${oursRate.toFixed(0)} MB/s, fs pipe baseline ${baseRate.toFixed(0)} MB/s (${(ours.bytes / MiB).toFixed(0)} MiB each)`);
  best = Math.max(best, oursRate);
  bestBase = Math.max(bestBase, baseRate);
}
const ratio = best / bestBase;
console.log(`best of ${rounds}: full stack ${best.toFixed(0)} MB/s, baseline ${bestBase.toFixed(0)} MB/s`);
console.log(`bench addon-read-throughput: ${ratio.toFixed(2)}x baseline target 0.80x ${ratio >= 0.8 ? 'met' : 'missed'}`);
