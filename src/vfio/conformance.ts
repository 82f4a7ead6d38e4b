// The conformance suite: one set of checks that runs against any device, a
// mock profile or a real kernel driver, and reports pass/fail per check.
// `npm test` runs it on every shipped mock profile; the kernel lab runs it on
// the real mtty driver; the CLI's `conformance` command on any device.
import { type Arc, planArcs } from './arc-planner.js';
import { VfioError } from './errors.js';
import type { DataSession, VfioDevice } from './device.js';
import { MIGRATION_STATES, type MigrationFlags, type MigrationState, arcOpensDataFd, supportedStates } from './states.js';

export interface ConformanceTarget {
  name: string;
  /** Opens the device under test ('primary') or a second, compatible one ('peer'). */
  open(role: 'primary' | 'peer'): Promise<VfioDevice>;
}

export type CheckStatus = 'pass' | 'fail' | 'skip';

export interface CheckResult {
  name: string;
  status: CheckStatus;
  detail: string;
  durationMs: number;
}

export interface ConformanceReport {
  target: string;
  flags: MigrationFlags | null;
  checks: CheckResult[];
  passed: number;
  failed: number;
  skipped: number;
}

export const CHECK_NAMES = [
  'flags-consistent',
  'single-arcs',
  'multi-step-paths',
  'invalid-arcs-rejected',
  'precopy-info',
  'read-semantics',
  'stop-copy-size',
  'save-restore',
  'corrupt-input-rejected',
  'reset',
] as const;
export type CheckName = (typeof CHECK_NAMES)[number];

class CheckFailure extends Error {}
class CheckSkip extends Error {}

function expect(cond: unknown, message: string): asserts cond {
  if (!cond) throw new CheckFailure(message);
}

const MiB = 1 << 20;
/** Largest sane figure from a device (2^53): beyond it the device is glitching. */
const SANE_BYTES = 2n ** 53n;

async function expectErrno(p: Promise<unknown>, codes: string[], what: string): Promise<string> {
  try {
    await p;
  } catch (err) {
    const code = (err as VfioError).code;
    expect(codes.includes(code), `${what}: expected ${codes.join(' or ')}, got ${code} (${(err as Error).message})`);
    return code;
  }
  throw new CheckFailure(`${what}: expected ${codes.join(' or ')}, but it succeeded`);
}

/** Brings a device back to RUNNING: a SET, or a reset when the SET cannot. */
export async function returnToRunning(dev: VfioDevice): Promise<void> {
  await dev.dataSession?.close().catch(() => {});
  const state = await dev.getState();
  if (state === 'running') return;
  if (state !== 'error' && state !== 'resuming') {
    try {
      await dev.setState('running');
      return;
    } catch {
      /* fall through to reset */
    }
  }
  await dev.reset();
}

type Sink = (bytes: Buffer) => Promise<void>;

/** Reads a save session to its end (STOP_COPY) or its temporary end (PRE_COPY), streaming into `sink`. */
async function drain(session: DataSession, limitBytes: number, sink?: Sink): Promise<{ bytes: number; end: 'end' | 'no-data' | 'limit'; via?: string }> {
  let bytes = 0;
  while (bytes < limitBytes) {
    const r = await session.read(MiB);
    if (r.kind === 'no-data') return { bytes, end: r.kind, via: r.via };
    if (r.kind !== 'data') return { bytes, end: r.kind };
    bytes += r.bytes.length;
    if (sink) await sink(r.bytes);
  }
  return { bytes, end: 'limit' };
}

/** Saves a device's whole state into `sink` (PRE_COPY first where supported), leaving it in STOP_COPY. */
async function saveAll(dev: VfioDevice, flags: MigrationFlags, limitBytes: number, sink: Sink): Promise<number> {
  let session: DataSession | null;
  let bytes = 0;
  if (flags.preCopy) {
    session = await dev.setState('pre-copy');
    expect(session, 'running -> pre-copy returned no data fd');
    bytes += (await drain(session, limitBytes, sink)).bytes;
    await dev.setState('stop-copy');
  } else {
    session = await dev.setState('stop-copy');
    expect(session, 'running -> stop-copy returned no data fd');
  }
  const rest = await drain(session, limitBytes, sink);
  expect(rest.end === 'end', `stop-copy stream did not end within ${limitBytes} bytes`);
  await session.close();
  return bytes + rest.bytes;
}

/**
 * For every pair of supported states (from outside resuming) whose planned
 * path `select` accepts: put the device in `from`, request `to` in one SET,
 * and check the state reached and whether a data fd came back. Returns how
 * many paths were checked.
 */
async function checkPlannedPaths(dev: VfioDevice, flags: MigrationFlags, select: (arcs: Arc[]) => boolean): Promise<number> {
  const states = supportedStates(flags).filter((s) => s !== 'error' && s !== 'resuming');
  let count = 0;
  for (const from of states) {
    for (const to of supportedStates(flags)) {
      if (to === 'error' || to === from) continue;
      let arcs: Arc[];
      try {
        arcs = planArcs(from, to, flags);
      } catch {
        continue;
      }
      if (!select(arcs)) continue;
      await returnToRunning(dev);
      await dev.stepTo(from);
      const session = await dev.setState(to);
      const got = await dev.getState();
      expect(got === to, `${from} -> ${to} (${arcs.map((a) => a.to).join(' -> ')}): device reports ${got}`);
      const opens = arcs.some((a) => arcOpensDataFd(a.from, a.to));
      expect(Boolean(session) === opens, `${from} -> ${to}: data fd ${session ? 'returned' : 'missing'}`);
      if (to === 'resuming') await dev.reset();
      count++;
    }
  }
  return count;
}

interface Ctx {
  dev: VfioDevice;
  flags: MigrationFlags;
  target: ConformanceTarget;
  limitBytes: number;
}

const checks: Record<CheckName, (ctx: Ctx) => Promise<string>> = {
  async 'flags-consistent'({ dev, flags }) {
    expect(flags.stopCopy, 'VFIO_MIGRATION_STOP_COPY is not set (the uAPI requires it)');
    const supported = supportedStates(flags);
    for (const s of MIGRATION_STATES) {
      if (s === 'error' || s === 'running') continue;
      await returnToRunning(dev);
      if (supported.includes(s)) {
        await dev.setState(s);
        expect((await dev.getState()) === s, `SET ${s} succeeded but GET reports ${await dev.getState()}`);
        if (s === 'resuming') await dev.reset();
      } else {
        await expectErrno(dev.setState(s), ['EINVAL'], `SET ${s} (not supported by the flags)`);
        expect((await dev.getState()) === 'running', `a refused SET ${s} changed the state`);
      }
    }
    return `supports ${supported.filter((s) => s !== 'error').join(', ')}`;
  },

  async 'single-arcs'({ dev, flags }) {
    const count = await checkPlannedPaths(dev, flags, (arcs) => arcs.length === 1);
    return `${count} single arcs (arcs out of resuming are checked by save-restore)`;
  },

  async 'multi-step-paths'({ dev, flags }) {
    const count = await checkPlannedPaths(dev, flags, (arcs) => arcs.length > 1);
    return `${count} combination transitions`;
  },

  async 'invalid-arcs-rejected'({ dev, flags }) {
    const tried: string[] = [];
    await returnToRunning(dev);
    await dev.setState('stop-copy');
    for (const to of ['pre-copy', 'pre-copy-p2p'] as MigrationState[]) {
      await expectErrno(dev.setState(to), ['EINVAL'], `stop-copy -> ${to}`);
      expect((await dev.getState()) === 'stop-copy', `refused stop-copy -> ${to} changed the state`);
      tried.push(`stop-copy -> ${to}`);
    }
    await returnToRunning(dev);
    await expectErrno(dev.setState('error'), ['EINVAL'], 'SET error');
    expect((await dev.getState()) === 'running', 'a refused SET error changed the state');
    tried.push('-> error');
    void flags;
    return `rejected without a state change: ${tried.join(', ')}`;
  },

  async 'precopy-info'({ dev, flags }) {
    await returnToRunning(dev);
    if (!flags.preCopy) {
      const s = await dev.setState('stop-copy');
      expect(s, 'no data fd');
      await expectErrno(dev.precopyInfo(s), ['EINVAL'], 'precopy info in stop-copy');
      return 'no PRE_COPY: precopy info refused in stop-copy';
    }
    const stopCopyBefore = await dev.stopCopySize();
    const session = await dev.setState('pre-copy');
    expect(session, 'running -> pre-copy returned no data fd');
    let info = await dev.precopyInfo(session);
    const sane = (v: bigint) => v < SANE_BYTES && v <= 16n * stopCopyBefore + BigInt(MiB);
    expect(sane(info.initialBytes) && sane(info.dirtyBytes), `implausible precopy info: initial ${info.initialBytes}, dirty ${info.dirtyBytes} for a stop-copy size of ${stopCopyBefore}`);
    expect(info.initialBytes > 0n, 'initial_bytes is 0 on entering pre-copy');
    let prevInitial = info.initialBytes;
    let reads = 0;
    while (reads < 64) {
      const r = await session.read(256 * 1024);
      if (r.kind !== 'data') break;
      reads++;
      info = await dev.precopyInfo(session);
      expect(sane(info.initialBytes) && sane(info.dirtyBytes), `implausible precopy info: initial ${info.initialBytes}, dirty ${info.dirtyBytes}`);
      expect(info.initialBytes <= prevInitial, `initial_bytes grew from ${prevInitial} to ${info.initialBytes}`);
      prevInitial = info.initialBytes;
      if (info.initialBytes === 0n) break;
    }
    if (flags.p2p) {
      await dev.setState('pre-copy-p2p');
      await dev.precopyInfo(session);
    }
    await dev.setState('stop-copy');
    await expectErrno(dev.precopyInfo(session), ['EINVAL'], 'precopy info in stop-copy');
    await returnToRunning(dev);
    return `initial_bytes non-increasing over ${reads} reads; refused outside pre-copy`;
  },

  async 'read-semantics'({ dev, flags, limitBytes }) {
    await returnToRunning(dev);
    const notes: string[] = [];
    let session: DataSession | null;
    if (flags.preCopy) {
      session = await dev.setState('pre-copy');
      expect(session, 'no data fd');
      const first = await drain(session, limitBytes);
      expect(first.end === 'no-data', `pre-copy stream never reached its temporary end (ENOMSG) within ${limitBytes} bytes`);
      notes.push(`pre-copy: temporary end after ${first.bytes} bytes (${first.via === 'ENOMSG' ? 'ENOMSG' : 'read returned 0, not ENOMSG'})`);
      await dev.setState('stop-copy');
    } else {
      session = await dev.setState('stop-copy');
      expect(session, 'no data fd');
    }
    const rest = await drain(session, limitBytes);
    expect(rest.end === 'end', 'stop-copy stream did not end');
    const again = await session.read(4096);
    expect(again.kind === 'end', `read after the end of the stop-copy stream returned ${again.kind}`);
    notes.push(`stop-copy: 0 (end) after ${rest.bytes} bytes, and again after that`);
    await dev.setState('stop');
    const stale = await session.read(4096).then((r) => r.kind, (err: VfioError) => err.code);
    expect(stale !== 'data', 'the data fd still produced data after the device left stop-copy');
    notes.push(`read after leaving stop-copy: ${stale}`);
    await session.close();
    await returnToRunning(dev);
    return notes.join('; ');
  },

  async 'stop-copy-size'({ dev, flags, limitBytes }) {
    await returnToRunning(dev);
    const inRunning = await dev.stopCopySize();
    expect(inRunning > 0n && inRunning < SANE_BYTES, `MIG_DATA_SIZE in running: ${inRunning}`);
    await dev.setState('stop');
    const session = await dev.setState('stop-copy');
    expect(session, 'no data fd');
    const atStart = await dev.stopCopySize();
    expect(atStart > 0n && atStart < SANE_BYTES, `MIG_DATA_SIZE in stop-copy: ${atStart}`);
    const all = await drain(session, limitBytes);
    expect(all.end === 'end', 'stop-copy stream did not end');
    await returnToRunning(dev);
    void flags;
    const ratio = Number(atStart) / Math.max(1, all.bytes);
    return `MIG_DATA_SIZE ${inRunning} in running, ${atStart} at stop-copy start; stream was ${all.bytes} bytes (estimate/actual ${ratio.toFixed(3)})`;
  },

  async 'save-restore'({ dev, flags, target, limitBytes }) {
    const peer = await target.open('peer');
    try {
      await returnToRunning(dev);
      await returnToRunning(peer);
      const peerFlags = await peer.migrationFlags();
      expect(JSON.stringify(peerFlags) === JSON.stringify(flags), 'peer has different flags');
      await peer.setState('stop');
      const resume = await peer.setState('resuming');
      expect(resume, 'stop -> resuming returned no data fd');
      const bytes = await saveAll(dev, flags, limitBytes, (b) => resume.write(b));
      await dev.setState('stop');
      await peer.setState('stop');
      await resume.close();
      await peer.setState('running');
      expect((await peer.getState()) === 'running', 'peer is not running after restore');
      let detail = `${bytes} bytes saved and restored`;
      if (dev.kind === 'mock' && peer.kind === 'mock') {
        const saved = dev.mockInfo().savedDigest;
        const loaded = peer.mockInfo().loadedDigest;
        expect(saved !== '' && saved === loaded, `destination content ${loaded} differs from the source's ${saved}`);
        detail += `, digest ${saved} equal on both`;
      }
      await returnToRunning(dev);
      return detail;
    } finally {
      await returnToRunning(peer).catch(() => {});
      await peer.close();
    }
  },

  async 'corrupt-input-rejected'({ dev, flags, target, limitBytes }) {
    const peer = await target.open('peer');
    const outcomes: string[] = [];
    try {
      const expected = Number(await dev.stopCopySize());
      for (const kind of ['corrupted', 'truncated'] as const) {
        await returnToRunning(dev);
        await returnToRunning(peer);
        await peer.setState('stop');
        const session = await peer.setState('resuming');
        expect(session, 'no data fd');
        // Damage the stream: its first 16 bytes overwritten (every driver
        // validates its header; payload checks vary), or everything from the
        // middle on dropped.
        const middle = expected > 0 && expected < Number(SANE_BYTES) ? Math.floor(expected / 2) : 4096;
        let offset = 0;
        let rejected: string | null = null;
        await saveAll(dev, flags, limitBytes, async (chunk) => {
          const start = offset;
          offset += chunk.length;
          if (rejected) return;
          let out: Buffer | null = chunk;
          if (kind === 'corrupted' && start < 16) out = Buffer.from(chunk).fill(0xa5, 0, Math.min(chunk.length, 16 - start));
          if (kind === 'truncated') out = start >= middle ? null : chunk.subarray(0, Math.min(chunk.length, middle - start));
          if (!out || out.length === 0) return;
          try {
            await session.write(out);
          } catch (err) {
            rejected = `write failed with ${(err as VfioError).code}`;
          }
        });
        if (!rejected) {
          try {
            await peer.setState('stop');
          } catch (err) {
            rejected = `resuming -> stop failed with ${(err as VfioError).code}`;
          }
        }
        expect(rejected, `${kind} stream was accepted`);
        outcomes.push(`${kind}: ${rejected}, device then ${await peer.getState()}`);
        await session.close();
        await peer.reset();
      }
      return outcomes.join('; ');
    } finally {
      await returnToRunning(peer).catch(() => {});
      await peer.close();
    }
  },

  async reset({ dev }) {
    await returnToRunning(dev);
    await dev.setState('stop');
    const session = await dev.setState('resuming');
    expect(session, 'no data fd');
    await dev.reset();
    expect((await dev.getState()) === 'running', `after reset from resuming the device is ${await dev.getState()}`);
    const stale = await session.write(Buffer.alloc(64)).then(() => 'accepted', (err: VfioError) => err.code);
    expect(stale !== 'accepted', 'the resume fd still accepted data after reset');
    await session.close();
    // ERROR is reached only through a failing arc; where one fails, reset must leave it.
    const fromError = await reachError(dev);
    if (fromError) {
      expect((await dev.getState()) === 'error', 'not in error');
      await dev.reset();
      expect((await dev.getState()) === 'running', `after reset from error the device is ${await dev.getState()}`);
      return `reset from resuming and from error (${fromError}) leads to running; stale fd refused with ${stale}`;
    }
    return `reset from resuming leads to running; stale fd refused with ${stale}; no arc of this device fails into error, so reset from error was not reachable`;
  },
};

/** Tries the arcs on the save path; returns the arc that left the device in ERROR, if any. */
async function reachError(dev: VfioDevice): Promise<string | null> {
  for (const target of ['running-p2p', 'stop', 'stop-copy'] as MigrationState[]) {
    await returnToRunning(dev);
    try {
      await dev.stepTo(target);
    } catch (err) {
      if ((err as VfioError).stateAfter === 'error') return `${(err as VfioError).arc?.from} -> ${(err as VfioError).arc?.to} failed with ${(err as VfioError).code}`;
    }
  }
  await returnToRunning(dev);
  return null;
}

export interface ConformanceOptions {
  /** Run only these checks. */
  only?: CheckName[];
  /** Upper bound on bytes read from one stream (guards against endless streams). */
  limitBytes?: number;
  onCheck?: (result: CheckResult) => void;
}

export async function runConformance(target: ConformanceTarget, options: ConformanceOptions = {}): Promise<ConformanceReport> {
  const report: ConformanceReport = { target: target.name, flags: null, checks: [], passed: 0, failed: 0, skipped: 0 };
  const dev = await target.open('primary');
  try {
    const flags = await dev.migrationFlags();
    report.flags = flags;
    const stopCopy = await dev.stopCopySize().catch(() => 0n);
    const limitBytes = options.limitBytes ?? Math.min(Number.MAX_SAFE_INTEGER, 4 * Number(stopCopy < SANE_BYTES ? stopCopy : 0n) + 64 * MiB);
    for (const name of CHECK_NAMES) {
      if (options.only && !options.only.includes(name)) continue;
      const t0 = performance.now();
      let result: CheckResult;
      try {
        const detail = await checks[name]({ dev, flags, target, limitBytes });
        result = { name, status: 'pass', detail, durationMs: performance.now() - t0 };
      } catch (err) {
        const status: CheckStatus = err instanceof CheckSkip ? 'skip' : 'fail';
        const detail = err instanceof CheckFailure || err instanceof CheckSkip ? err.message : `${(err as VfioError).code ?? 'error'}: ${(err as Error).message}`;
        result = { name, status, detail, durationMs: performance.now() - t0 };
        await returnToRunning(dev).catch(() => {});
      }
      report.checks.push(result);
      report[result.status === 'pass' ? 'passed' : result.status === 'fail' ? 'failed' : 'skipped']++;
      options.onCheck?.(result);
    }
  } finally {
    await dev.close();
  }
  return report;
}
