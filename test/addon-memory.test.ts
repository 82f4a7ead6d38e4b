// Memory the addon keeps after reading: bounded, whatever was read. Runs in a
// child process with --expose-gc, so the figures are that process's alone.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const mockUrl = pathToFileURL(path.resolve(here, '..', 'src/vfio/mock.js')).href;

test('reading many streams leaves RSS within the read-buffer pool cap (freed blocks stayed in the data threads\' glibc arenas)', async (t) => {
  // Eight devices read in parallel (eight data threads), in the migration
  // layer's sizes and one that is not pooled, with a few Buffers kept alive
  // across reads as a sender's queue does. Before the fix each data thread's
  // arena kept freed blocks: +93 to +132 MiB over 120 rounds (3 runs), where
  // the pool's cap is 64 MiB; after it +24 MiB. RSS is taken after a full GC
  // whose finalizers (which give the blocks back) have run.
  const file = path.join(mkdtempSync(path.join(tmpdir(), 'addon-memory-')), 'child.mjs');
  writeFileSync(
    file,
    `
    import { readFileSync } from 'node:fs';
    import { openMockDevice } from '${mockUrl}';
    const rssMiB = () => Number(/VmRSS:\\s+(\\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) / 1024;
    async function settled() {
      for (let k = 0; k < 3; k++) { gc(); await new Promise((r) => setImmediate(r)); }
      return rssMiB();
    }
    const overrides = { stateBytes: '8MiB', dirtyBytesPerSec: 0, dirtyWorkingSetBytes: 0, arcLatencyMs: { default: 0 } };
    const devs = [];
    for (let i = 0; i < 8; i++) devs.push(await openMockDevice({ profile: 'nic-vf', overrides, seed: i + 1, id: 'd' + i }));
    const sizes = [4 << 20, 256 << 10, 1 << 20, 2 << 20, 512 << 10, 3 << 20];
    let kept = [];
    let bytes = 0;
    async function round(r) {
      await Promise.all(devs.map(async (d, di) => {
        const s = await d.stepTo('stop-copy');
        for (let k = r + di; ; k++) {
          const got = await s.read(sizes[k % sizes.length]);
          if (got.kind !== 'data') break;
          bytes += got.bytes.length;
          kept.push(got.bytes);
          if (kept.length > 6) kept.shift();
        }
        await d.stepTo('running');
      }));
    }
    await round(0);
    const warm = await settled();
    for (let r = 1; r < 120; r++) await round(r);
    kept = [];
    const end = await settled();
    for (const d of devs) await d.close();
    console.log(JSON.stringify({ warm, end, bytes }));
  `,
  );
  const r = await new Promise<{ err: Error | null; stdout: string; stderr: string }>((resolve) =>
    execFile(process.execPath, ['--expose-gc', file], { timeout: 100_000 }, (err, stdout, stderr) => resolve({ err, stdout, stderr })),
  );
  t.is(r.err, null, r.stderr);
  const { warm, end, bytes } = JSON.parse(r.stdout) as { warm: number; end: number; bytes: number };
  t.log(`RSS after the first round ${warm.toFixed(1)} MiB, after 120 rounds ${end.toFixed(1)} MiB`);
  t.true(bytes >= 60 * 8 * 8 * 2 ** 20, `read ${bytes} bytes`);
  // The pool's cap (64 MiB) plus 8 MiB for the rest of the process (V8, the mock).
  t.true(end - warm <= 72, `RSS after the first round ${warm.toFixed(1)} MiB, after 120 rounds ${end.toFixed(1)} MiB`);
});
