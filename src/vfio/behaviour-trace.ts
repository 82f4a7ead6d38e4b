// The behaviour trace: ONE fixed, scripted sequence of device operations on a
// pair of devices (a = source, b = destination), recording for every step
// what the device did: the errno or the value, the bytes moved, and the state
// read back afterwards. The kernel lab runs it on the real mtty driver and on
// the mock's mtty personality and requires identical traces; the trace the
// real driver produced is committed (test/fixtures/mtty-kernel-trace.json)
// and `npm test` compares the mock against it.
//
// The sequence targets mtty-like devices (STOP_COPY | P2P | PRE_COPY with a
// small stream) but runs on any device: it only records what happens.
import type { DataSession, VfioDevice } from './device.js';
import type { MigrationState } from './states.js';

export const BEHAVIOUR_TRACE_VERSION = 1;

export type TraceOutcome =
  | { ok: true; value?: unknown }
  | { ok: false; errno: string };

export interface TraceStep {
  /** 1-based position in the sequence. */
  n: number;
  /** What the step is about (the scenario it belongs to). */
  label: string;
  dev: 'a' | 'b';
  op: string;
  args?: Record<string, unknown>;
  result: TraceOutcome;
  /** The device state read back after the step. */
  state: MigrationState | 'unknown';
}

export interface BehaviourTrace {
  version: number;
  steps: TraceStep[];
}

// struct mtty_data / struct serial_port layout (scripts/kernel-lab/mtty-facts.md §4).
const HEADER_BYTES = 24;
const PORT_BYTES = 36;
const MTTY_MAGIC = 0x7e9d09898c3e2c4en;

/** An mtty stream header: magic, version 1.0, port count, flags. */
export function mttyHeader(ports: number, patch: { magic?: bigint; major?: number; minor?: number; flags?: number } = {}): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  h.writeBigUInt64LE(patch.magic ?? MTTY_MAGIC, 0);
  h.writeUInt32LE(patch.major ?? 1, 8);
  h.writeUInt32LE(patch.minor ?? 0, 12);
  h.writeUInt32LE(ports, 16);
  h.writeUInt32LE(patch.flags ?? 0, 20);
  return h;
}

/**
 * The state of `ports` serial ports after some loopback traffic: FIFO bytes
 * from `tag`, head == tail (empty FIFO), max_fifo_size 16. Plausible values
 * only, so a real driver loading it stays sane.
 */
export function mttyPorts(ports: number, tag: number): Buffer {
  const b = Buffer.alloc(PORT_BYTES * ports);
  for (let p = 0; p < ports; p++) {
    const o = p * PORT_BYTES;
    for (let i = 0; i < 16; i++) b[o + 8 + i] = (tag * 31 + p * 17 + i * 7) & 0xff;
    b[o + 24] = b[o + 25] = (tag + p) % 16; // head, tail
    b[o + 33] = 16; // max_fifo_size
  }
  return b;
}

function outcomeOf(err: unknown): TraceOutcome {
  const code = (err as { code?: unknown })?.code;
  return { ok: false, errno: typeof code === 'string' ? code : String(err) };
}

/**
 * Runs the sequence on devices `a` and `b` (two instances of the same device
 * type) and returns the trace. Starts by resetting both and loading a known
 * port state into each, so the result does not depend on their history.
 * Leaves both devices RUNNING with no data fd open.
 */
export async function runBehaviourTrace(a: VfioDevice, b: VfioDevice): Promise<BehaviourTrace> {
  const steps: TraceStep[] = [];
  const devs = { a, b };
  const sessions: DataSession[] = [];
  let label = '';

  async function step(dev: 'a' | 'b', op: string, args: Record<string, unknown> | undefined, fn: () => Promise<unknown>): Promise<TraceOutcome> {
    let result: TraceOutcome;
    try {
      const value = await fn();
      result = value === undefined ? { ok: true } : { ok: true, value };
    } catch (err) {
      result = outcomeOf(err);
    }
    const state = await devs[dev].getState().catch(() => 'unknown' as const);
    const s: TraceStep = { n: steps.length + 1, label, dev, op, result, state };
    if (args) s.args = args;
    steps.push(s);
    return result;
  }

  // One SET; the value says whether it returned a data fd. The session is kept for later steps.
  let last: DataSession | null = null;
  const set = (dev: 'a' | 'b', to: MigrationState) =>
    step(dev, 'set-state', { to }, async () => {
      const s = await devs[dev].setState(to);
      if (s) {
        sessions.push(s);
        last = s;
      }
      return { dataFd: Boolean(s) };
    });
  const read = (dev: 'a' | 'b', s: DataSession | null, max: number, sink?: Buffer[]) =>
    step(dev, 'read', { max }, async () => {
      if (!s) throw Object.assign(new Error('no session'), { code: 'NO_SESSION' });
      const r = await s.read(max);
      if (r.kind !== 'data') return r.kind === 'no-data' ? { kind: r.kind, via: r.via } : { kind: r.kind };
      sink?.push(r.bytes);
      return { kind: 'data', bytes: r.bytes.length, hex: r.bytes.toString('hex') };
    });
  const write = (dev: 'a' | 'b', s: DataSession | null, data: Buffer, what: string) =>
    step(dev, 'write', { bytes: data.length, what }, async () => {
      if (!s) throw Object.assign(new Error('no session'), { code: 'NO_SESSION' });
      await s.write(data);
      return { bytes: data.length };
    });
  const precopy = (dev: 'a' | 'b', s: DataSession | null) =>
    step(dev, 'precopy-info', undefined, async () => {
      if (!s) throw Object.assign(new Error('no session'), { code: 'NO_SESSION' });
      const i = await devs[dev].precopyInfo(s);
      return { initialBytes: String(i.initialBytes), dirtyBytes: String(i.dirtyBytes) };
    });
  const dataSize = (dev: 'a' | 'b') => step(dev, 'mig-data-size', undefined, async () => String(await devs[dev].stopCopySize()));
  const reset = (dev: 'a' | 'b') => step(dev, 'reset', undefined, () => devs[dev].reset());
  const take = (): DataSession | null => {
    const s = last;
    last = null;
    return s;
  };

  try {
    // --- prologue: known state on both devices ---------------------------------
    label = 'prologue';
    let ports = 2;
    for (const dev of ['a', 'b'] as const) {
      await reset(dev);
      await step(dev, 'migration-flags', undefined, () => devs[dev].migrationFlags());
      const size = await dataSize(dev);
      if (size.ok) ports = Math.max(1, Math.min(2, Math.round((Number(size.value) - HEADER_BYTES) / PORT_BYTES)));
    }
    const full = (tag: number) => Buffer.concat([mttyHeader(ports), mttyPorts(ports, tag)]);
    for (const [dev, tag] of [['a', 1], ['b', 2]] as const) {
      await set(dev, 'stop');
      await set(dev, 'resuming');
      await write(dev, take(), full(tag), `valid stream, ports tag ${tag}`);
      await set(dev, 'stop');
      await set(dev, 'running');
    }
    const size = HEADER_BYTES + PORT_BYTES * ports;

    // --- save through PRE_COPY on a ------------------------------------------
    label = 'save via pre-copy';
    const saved: Buffer[] = [];
    await set('a', 'pre-copy');
    const save = take();
    await precopy('a', save);
    await dataSize('a');
    await read('a', save, 10, saved);
    await precopy('a', save);
    await read('a', save, 4096, saved);
    await read('a', save, 4096, saved);
    await precopy('a', save);
    await set('a', 'pre-copy-p2p');
    await precopy('a', save);
    await read('a', save, 4096, saved);
    await set('a', 'stop-copy');
    await precopy('a', save);
    await dataSize('a');
    await read('a', save, 50, saved);
    await read('a', save, 4096, saved);
    await read('a', save, 4096, saved);

    label = 'blocked and invalid arcs';
    await set('a', 'pre-copy');
    await set('a', 'pre-copy-p2p');
    await set('a', 'error');
    await read('a', save, 4096);

    // --- restore on b ------------------------------------------------------------
    label = 'restore';
    const stream = Buffer.concat(saved);
    await set('b', 'stop');
    await set('b', 'resuming');
    const resume = take();
    await precopy('b', resume);
    await dataSize('b');
    await write('b', resume, stream.subarray(0, HEADER_BYTES), 'saved stream, header');
    await write('b', resume, stream.subarray(HEADER_BYTES), 'saved stream, ports');
    await write('b', resume, Buffer.alloc(1), 'one byte past the end');
    await set('b', 'stop');
    await write('b', resume, stream.subarray(0, 8), 'into the resume fd after resuming -> stop');
    await set('a', 'stop');
    await read('a', save, 4096);
    await set('b', 'running');

    label = 'read back the restored device';
    await set('b', 'stop');
    await set('b', 'stop-copy');
    const back = take();
    await precopy('b', back);
    await read('b', back, 4096);
    await read('b', back, 4096);
    await set('b', 'running');

    // --- resume error paths on b -------------------------------------------------
    label = 'truncated stream';
    await set('b', 'resuming');
    let r = take();
    await write('b', r, stream.subarray(0, 50), 'first 50 bytes');
    await set('b', 'stop');
    await set('b', 'running');
    await write('b', r, stream.subarray(50), 'the rest');
    await set('b', 'stop');

    label = 'corrupted header';
    await set('b', 'resuming');
    r = take();
    const badMagic = mttyHeader(ports, { magic: 0xa5a5a5a5a5a5a5a5n });
    await write('b', r, badMagic, 'header with a bad magic');
    await write('b', r, mttyPorts(ports, 3), 'ports tag 3');
    await write('b', r, Buffer.alloc(1), 'one byte past the end');
    await set('b', 'stop');
    await set('b', 'stop-copy');
    const afterBad = take();
    await read('b', afterBad, 4096);
    await set('b', 'stop');

    label = 'header for another port count';
    await set('b', 'resuming');
    r = take();
    await write('b', r, mttyHeader(ports === 2 ? 1 : 2), 'header with the other port count');
    await set('b', 'stop');
    await reset('b');
    await write('b', r, mttyHeader(ports), 'into the resume fd after reset');

    label = 'header split over two writes';
    await set('b', 'resuming');
    r = take();
    const badFlags = mttyHeader(ports, { flags: 1 });
    await write('b', r, badFlags.subarray(0, 10), 'first 10 header bytes');
    await write('b', r, badFlags.subarray(10), 'rest of a header with flags 1');
    await write('b', r, badFlags.subarray(0, 4), 'header bytes again (no re-check)');
    await set('b', 'stop');
    await reset('b');

    label = 'oversize write';
    await set('b', 'resuming');
    r = take();
    await write('b', r, Buffer.concat([full(4), Buffer.alloc(1)]), 'stream plus one byte in one write');
    await write('b', r, full(4), 'valid stream, ports tag 4');
    await set('b', 'stop');

    label = 'empty stream';
    await set('b', 'resuming');
    r = take();
    await set('b', 'stop');
    await set('b', 'running');
    await reset('b');
    await write('b', r, full(5), 'into the resume fd after reset');

    label = 'version mismatch';
    await set('b', 'stop');
    await set('b', 'resuming');
    r = take();
    await write('b', r, Buffer.concat([mttyHeader(ports, { major: 2 }), mttyPorts(ports, 6)]), 'major version 2');
    await set('b', 'running');
    await set('b', 'stop');

    // --- save-side edge cases on a -------------------------------------------------
    label = 'reset during pre-copy';
    await set('a', 'running');
    await set('a', 'pre-copy');
    let s = take();
    await read('a', s, 4);
    await reset('a');
    await read('a', s, 4096);
    await precopy('a', s);

    label = 'stale pre-copy fd';
    await set('a', 'pre-copy');
    const s1 = take();
    await set('a', 'running');
    await set('a', 'pre-copy');
    const s2 = take();
    await precopy('a', s1);
    await read('a', s1, 4096);
    await set('a', 'pre-copy-p2p');
    await precopy('a', s1);
    await precopy('a', s2);
    await read('a', s2, 4096);

    label = 'multi-step transitions';
    await set('a', 'stop-copy');
    await read('a', s2, 4096);
    await read('a', s2, 4096);
    await set('a', 'running');
    await read('a', s2, 4096);
    await set('a', 'stop-copy');
    s = take();
    await read('a', s, 4096);
    await read('a', s, 4096);
    await set('a', 'pre-copy-p2p');
    await set('a', 'running');
    await set('a', 'running');
    await set('a', 'pre-copy-p2p');
    s = take();
    await read('a', s, 4096);
    await set('a', 'running-p2p');
    await read('a', s, 4096);
    await set('a', 'running');

    label = 'resuming -> running in one SET';
    await set('b', 'resuming');
    r = take();
    await write('b', r, stream, 'saved stream of a');
    await set('b', 'running');

    label = 'reset in stop-copy keeps the device state';
    await set('a', 'stop-copy');
    s = take();
    await read('a', s, 30);
    await reset('a');
    await read('a', s, 4096);
    await set('a', 'stop-copy');
    s = take();
    await read('a', s, 4096);
    await set('a', 'running');

    label = 'dma logging';
    await step('a', 'dma-logging-report', { iova: 0, length: 65536, pageSize: 4096 }, async () => (await a.dmaLoggingReport(0, 65536, 4096)).toString('hex'));
    await step('a', 'dma-logging-start', { pageSize: 4096, ranges: [] }, () => a.dmaLoggingStart(4096, []));
    await step('a', 'dma-logging-start', { pageSize: 4096, ranges: [[4096, 100]] }, () => a.dmaLoggingStart(4096, [{ iova: 4096, length: 100 }]));
    await step('a', 'dma-logging-start', { pageSize: 4096, ranges: [[0, 65536], [32768, 65536]] }, () => a.dmaLoggingStart(4096, [{ iova: 0, length: 65536 }, { iova: 32768, length: 65536 }]));
    await step('a', 'dma-logging-start', { pageSize: 4096, ranges: [[0, 1048576]] }, () => a.dmaLoggingStart(4096, [{ iova: 0, length: 1 << 20 }]));
    await step('a', 'dma-logging-start', { pageSize: 4096, ranges: [[0, 1048576]] }, () => a.dmaLoggingStart(4096, [{ iova: 0, length: 1 << 20 }]));
    await step('a', 'dma-logging-report', { iova: 0, length: 1048576, pageSize: 4096 }, async () => (await a.dmaLoggingReport(0, 1 << 20, 4096)).toString('hex'));
    await step('a', 'dma-logging-report', { iova: 0, length: 65536, pageSize: 1000 }, async () => (await a.dmaLoggingReport(0, 65536, 1000)).toString('hex'));
    await step('a', 'dma-logging-stop', undefined, () => a.dmaLoggingStop());
    await step('a', 'dma-logging-stop', undefined, () => a.dmaLoggingStop());

    label = 'epilogue';
    await reset('a');
    await reset('b');
    void size;
  } finally {
    for (const s of sessions) await s.close().catch(() => {});
  }
  return { version: BEHAVIOUR_TRACE_VERSION, steps };
}

/** Human-readable differences between two traces (empty when equal). */
export function diffTraces(expected: BehaviourTrace, actual: BehaviourTrace, names: [string, string] = ['expected', 'actual']): string[] {
  const out: string[] = [];
  if (expected.version !== actual.version) out.push(`trace version: ${names[0]} ${expected.version}, ${names[1]} ${actual.version}`);
  const n = Math.max(expected.steps.length, actual.steps.length);
  for (let i = 0; i < n; i++) {
    const e = expected.steps[i];
    const a = actual.steps[i];
    const je = JSON.stringify(e);
    const ja = JSON.stringify(a);
    if (je !== ja) out.push(`step ${i + 1} (${e?.label ?? a?.label}: ${e?.dev ?? a?.dev} ${e?.op ?? a?.op} ${JSON.stringify(e?.args ?? a?.args ?? {})}): ${names[0]} ${JSON.stringify({ result: e?.result, state: e?.state })}, ${names[1]} ${JSON.stringify({ result: a?.result, state: a?.state })}`);
  }
  return out;
}
