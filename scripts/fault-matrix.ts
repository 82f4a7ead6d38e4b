// npm run test:faults: the fault matrix. Phase (setup, precopy, switchover,
// stop-copy, destination load, after commit) x fault, each row a real
// migration between two processes (scripts/fault-peer.ts: source and
// destination, mock devices), the fault injected from the JSON events and
// phase marks the processes print. Every applicable row must hold its
// invariant:
// - before the commit: the migration fails (or is cancelled) within a bound,
//   the VM runs on the source with every device RUNNING and its digest
//   intact (a device reset from ERROR loses its state: said, and allowed only
//   where a source arc fails into ERROR), a stopped VM is resumed within
//   downtime-limit + switchover-limit, no fd or socket is left behind on
//   either side, and a surviving destination resets its devices and answers
//   the next source;
// - after the commit: the migration completes, or the source reports the
//   outcome unknown (exit 3, VM stopped) and the VM runs in exactly one
//   place once the management app (this script) decided: left stopped when
//   the destination runs it, resumeOnSource() when it does not;
// - a stranger on the port costs the migration nothing.
// Ends with "N passed, N failed" (rows); exits 1 if any row failed.
//   node dist/scripts/fault-matrix.js [--only <substring of "phase/fault">] [--verbose]
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { onJsonLines } from '../src/json-lines.js';
import { FrameType, FRAME_HEADER_BYTES, encodeFrame, jsonPayload, WIRE_VERSION } from '../src/migration/wire.js';
import type { MockProfileInput } from '../src/vfio/mock-profile.js';
import { DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS } from '../src/migration/params.js';
import { createNetns, type Netns } from '../test/helpers.js';
import type { PeerSpec } from './fault-peer.js';

const PEER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), 'fault-peer.js');

/** Liveness bound of every row: short, so that the matrix runs in minutes. */
const PEER_TIMEOUT_MS = 1500;
/** A slow arc or load that makes its phase last long enough to be hit. */
const SLOW_MS = 1200;
/** The switchover bound (switchover-abort on): a VM stopped longer is resumed on the source. */
const DOWNTIME_LIMIT_MS = 3000;
const SWITCHOVER_LIMIT_MS = 500;
/** The switchover-limit rows: a downtime the estimate did not see coming is aborted at 700 + 200 ms. */
const TIGHT_LIMIT_MS = 700;
const TIGHT_SWITCHOVER_LIMIT_MS = 200;
/** Slack on a loaded 2-core machine (process scheduling, device arcs in flight). */
const MARGIN_MS = 1000;
/** A row's migration must end this soon after its fault: detection (peer-timeout) plus a slow arc in flight. */
const END_BOUND_MS = PEER_TIMEOUT_MS + SLOW_MS + MARGIN_MS;

const PHASES = ['setup', 'precopy', 'switchover', 'stop-copy', 'destination load', 'after commit'] as const;
type Phase = (typeof PHASES)[number];

type Line = Record<string, unknown>;
interface Hook {
  side: 'source' | 'destination';
  match: (l: Line) => boolean;
  delayMs: number;
}

const status = (s: string) => (l: Line) => l.event === 'MIGRATION' && (l.data as { status: string }).status === s;
const mark = (m: string) => (l: Line) => l.mark === m;

/** Devices slowed down so that each phase lasts about SLOW_MS; the hook fires inside it. */
const PHASE_SETUP: Record<Phase, { source?: Partial<MockProfileInput>; destination?: Partial<MockProfileInput>; both?: Partial<MockProfileInput>; hook: Hook }> = {
  setup: { source: { arcLatencyMs: { default: 2, 'running>pre-copy': SLOW_MS } }, hook: { side: 'source', match: mark('saveSetup'), delayMs: 250 } },
  // The source's reads are capped (the destination's writes are not: no load cost the estimate would count).
  precopy: { both: { stateBytes: '12MiB' }, source: { maxBytesPerSec: '8MiB' }, hook: { side: 'source', match: status('active'), delayMs: 400 } },
  switchover: { source: { arcLatencyMs: { default: 2, 'pre-copy>pre-copy-p2p': SLOW_MS } }, hook: { side: 'source', match: mark('saveQuiesce'), delayMs: 250 } },
  'stop-copy': { both: { stopCopyOnlyBytes: '10MiB' }, source: { maxBytesPerSec: '8MiB' }, hook: { side: 'source', match: mark('saveComplete'), delayMs: 300 } },
  'destination load': { destination: { arcLatencyMs: { default: 2, 'resuming>stop': SLOW_MS } }, hook: { side: 'destination', match: mark('loadFinish'), delayMs: 250 } },
  'after commit': { destination: { arcLatencyMs: { default: 2, 'stop>running-p2p': SLOW_MS } }, hook: { side: 'source', match: (l) => l.event === 'MIGRATION_COMMITTED', delayMs: 200 } },
};

/** Two NIC VFs that dirty nothing: a digest that changed means state was lost. */
const BASE: Partial<MockProfileInput> = { stateBytes: '2MiB', dirtyWorkingSetBytes: '1MiB', stopCopyOnlyBytes: '256KiB', dirtyBytesPerSec: 0, arcLatencyMs: { default: 2 }, loadInitialMs: 0, loadMsPerMiB: 0 };
const DEVICES: [string, number][] = [['nic-vf', 2]];

type Expect = 'rollback' | 'complete' | 'after-commit' | 'no-switchover';

/** What the proxy between the two ends does to the stream. */
type ProxyFault =
  | { kind: 'reset' }
  | { kind: 'corrupt' | 'truncate'; dir: 'up' | 'down'; type?: FrameType }
  | { kind: 'drop'; dir: 'up' | 'down'; type: FrameType };

interface Plan {
  expect: Expect;
  /** Extra profile fields per side (a fault, a slow part). */
  source?: Partial<MockProfileInput>;
  destination?: Partial<MockProfileInput>;
  parameters?: Record<string, number>;
  capabilities?: Record<string, boolean>;
  timeoutMs?: number;
  netns?: boolean;
  /** A proxy in between; `armed` at once, or when the hook fires. */
  proxy?: { fault: ProxyFault; atStart?: boolean };
  /** What happens when the hook fires (none: the fault is in the profile). */
  inject?: (r: RowRun) => Promise<void> | void;
  /** A source device reset from ERROR (its state lost) is this row's documented outcome. */
  sourceResetAllowed?: boolean;
  /** The destination dies with the fault. */
  destinationDies?: boolean;
  /** Checks of the row's own (strangers' answers). */
  extra?: (r: RowRun) => string[];
}

interface Fault {
  name: string;
  /** A plan, or why the fault means nothing in that phase (one word). */
  plan(phase: Phase): Plan | string;
}

const beforeCommit = (phase: Phase): Expect => (phase === 'after commit' ? 'after-commit' : 'rollback');
/** The data-carrying phases: a corrupt or cut frame is a SectionData one there. */
const dataPhase = (phase: Phase) => phase === 'precopy' || phase === 'stop-copy';

const FAULTS: Fault[] = [
  {
    name: 'connection reset',
    plan: (phase) => ({ expect: beforeCommit(phase), proxy: { fault: { kind: 'reset' } } }),
  },
  {
    name: 'SIGKILL destination',
    plan: (phase) => ({ expect: beforeCommit(phase), destinationDies: true, inject: (r) => r.signalDestination('SIGKILL') }),
  },
  {
    name: 'SIGSTOP destination > peer-timeout',
    plan: (phase) => ({
      expect: beforeCommit(phase),
      inject: async (r) => {
        r.signalDestination('SIGSTOP');
        // Continued once the source has given up (or peer-timeout + 1 s at most): it finds the source gone.
        await Promise.race([r.sourceResult, sleep(PEER_TIMEOUT_MS + SLOW_MS + 2000)]);
        await sleep(300);
        r.signalDestination('SIGCONT');
      },
    }),
  },
  {
    name: 'silent partition (netns)',
    plan: (phase) => ({
      expect: beforeCommit(phase),
      netns: true,
      inject: async (r) => {
        r.netns!.cut();
        // Healed once both ends have given up: nothing may cross the link meanwhile.
        await Promise.race([Promise.all([r.sourceResult, r.destinationResult]), sleep(PEER_TIMEOUT_MS * 2 + SLOW_MS + 2000)]);
        r.netns!.heal();
      },
    }),
  },
  {
    name: 'source arc fails into ERROR',
    plan: (phase) => {
      const fault = (arc: string) => ({ faults: [{ arc, errno: 'EIO', intoError: true, times: 1 }] });
      if (phase === 'setup') return { expect: 'rollback', source: fault('running>pre-copy'), sourceResetAllowed: true };
      // The probe walks pre-copy -> pre-copy-p2p while the VM runs.
      if (phase === 'precopy') return { expect: 'rollback', source: fault('pre-copy>pre-copy-p2p'), capabilities: { 'x-probe-switchover-arcs': true }, sourceResetAllowed: true };
      if (phase === 'switchover') return { expect: 'rollback', source: fault('pre-copy>pre-copy-p2p'), sourceResetAllowed: true };
      return phase === 'stop-copy' ? 'no-arc' : 'destination-side';
    },
  },
  {
    name: 'destination arc fails into ERROR',
    plan: (phase) => {
      const fault = (arc: string) => ({ faults: [{ arc, errno: 'EIO', intoError: true, times: 1 }] });
      if (phase === 'setup') return { expect: 'rollback', destination: fault('stop>resuming') };
      if (phase === 'destination load') return { expect: 'rollback', destination: fault('resuming>stop') };
      // The destination fails after the commit, stops, resets and says so: the source rolls back.
      if (phase === 'after commit') return { expect: 'after-commit', destination: fault('stop>running-p2p') };
      return 'no-arc';
    },
  },
  {
    name: 'corrupt stream (byte flipped)',
    plan: (phase) => ({
      expect: beforeCommit(phase),
      // After the commit the only frame is the destination's Running.
      proxy: { fault: phase === 'after commit' ? { kind: 'corrupt', dir: 'down', type: FrameType.Running } : { kind: 'corrupt', dir: 'up', type: dataPhase(phase) ? FrameType.SectionData : undefined } },
    }),
  },
  {
    name: 'truncated stream',
    plan: (phase) => ({
      expect: beforeCommit(phase),
      proxy: { fault: phase === 'after commit' ? { kind: 'truncate', dir: 'down', type: FrameType.Running } : { kind: 'truncate', dir: 'up', type: dataPhase(phase) ? FrameType.SectionData : undefined } },
    }),
  },
  {
    name: 'missing switchover ACK',
    plan: (phase) =>
      // The ACK comes in precopy, once the initial bytes loaded; only then does it matter.
      phase === 'precopy'
        ? { expect: 'no-switchover', proxy: { fault: { kind: 'drop', dir: 'down', type: FrameType.SwitchoverAck }, atStart: true }, timeoutMs: 4000 }
        : phase === 'setup'
          ? 'pre-ack'
          : 'post-ack',
  },
  {
    name: 'switchover-limit exceeded',
    plan: (phase) => {
      // A downtime the estimate did not see coming: the abort resumes the VM at downtime-limit + switchover-limit.
      const tight = { 'downtime-limit': TIGHT_LIMIT_MS, 'switchover-limit': TIGHT_SWITCHOVER_LIMIT_MS, 'x-assumed-p2p-arc-ms': 20 };
      if (phase === 'switchover') return { expect: 'rollback', parameters: tight, source: { arcLatencyMs: { default: 2, 'pre-copy>pre-copy-p2p': 1500 } } };
      // The stop-copy data moves at 8 MiB/s, not at the 1 GiB/s the parameter promises.
      if (phase === 'stop-copy') return { expect: 'rollback', parameters: { ...tight, 'avail-switchover-bandwidth': 2 ** 30 } };
      if (phase === 'destination load') return { expect: 'rollback', parameters: tight };
      return phase === 'after commit' ? 'committed' : 'VM-running';
    },
  },
  {
    name: 'cancel (source SIGTERM)',
    // After the commit a cancel is ignored: the migration completes.
    plan: (phase) => ({ expect: phase === 'after commit' ? 'complete' : 'rollback', inject: (r) => r.signalSource('SIGTERM') }),
  },
  {
    name: 'stranger on the port',
    plan: () => ({
      expect: 'complete',
      inject: (r) => r.strangers(),
      extra: (r) => r.strangerProblems(),
    }),
  },
];

// ---- a proxy that can reset, corrupt, truncate or drop frames ----

class FaultProxy {
  readonly server: net.Server;
  readonly pairs: { client: net.Socket; upstream: net.Socket }[] = [];
  fault: ProxyFault | null = null;
  /** What the fault did (for the row's report). */
  done: string | null = null;
  port = 0;

  constructor(readonly target: { host: string; port: number }) {
    this.server = net.createServer((client) => this.#pair(client));
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as net.AddressInfo).port;
    return `tcp:127.0.0.1:${this.port}`;
  }

  arm(fault: ProxyFault): void {
    this.fault = fault;
    if (fault.kind === 'reset') {
      this.done = `reset ${this.pairs.length} connection(s)`;
      for (const p of this.pairs) {
        p.client.resetAndDestroy();
        p.upstream.resetAndDestroy();
      }
    }
  }

  #pair(client: net.Socket): void {
    const upstream = net.connect(this.target.port, this.target.host);
    client.on('error', () => {});
    upstream.on('error', () => {});
    this.pairs.push({ client, upstream });
    this.#pump(client, upstream, 'up');
    this.#pump(upstream, client, 'down');
  }

  /** Forwards whole frames, so that one can be changed or dropped; keeps backpressure. */
  #pump(from: net.Socket, to: net.Socket, dir: 'up' | 'down'): void {
    let chunks: Buffer[] = [];
    let buffered = 0;
    let cut = false;
    const take = (n: number): Buffer => {
      const all = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
      chunks = all.length > n ? [all.subarray(n)] : [];
      buffered -= n;
      return all.subarray(0, n);
    };
    const peekLength = (): number => {
      const head = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
      chunks = [head];
      return head.readUInt32BE(8);
    };
    from.on('data', (chunk: Buffer) => {
      if (cut) return;
      chunks.push(chunk);
      buffered += chunk.length;
      while (buffered >= FRAME_HEADER_BYTES) {
        const total = FRAME_HEADER_BYTES + peekLength();
        if (buffered < total) break;
        const frame = Buffer.from(take(total));
        const type = frame.readUInt8(5) as FrameType;
        const f = this.fault;
        if (f && f.kind !== 'reset' && f.dir === dir && (f.type === undefined || f.type === type)) {
          if (f.kind === 'drop') {
            this.done = `dropped ${FrameType[type]}`;
            continue;
          }
          this.fault = null;
          if (f.kind === 'corrupt') {
            // A payload byte, or the header's checksum of an empty frame.
            const at = frame.length > FRAME_HEADER_BYTES ? FRAME_HEADER_BYTES + Math.floor((frame.length - FRAME_HEADER_BYTES) / 2) : 12;
            frame[at] = frame[at]! ^ 0x40;
            this.done = `flipped byte ${at} of a ${FrameType[type]} frame (${dir})`;
          } else {
            // Half of the frame, then the end of this direction's stream.
            const keep = Math.max(8, Math.floor(frame.length / 2));
            to.end(frame.subarray(0, keep));
            this.done = `cut a ${FrameType[type]} frame after ${keep} of ${frame.length} bytes (${dir})`;
            cut = true;
            chunks = [];
            from.resume();
            return;
          }
        }
        if (!to.destroyed && !to.writableEnded && !to.write(frame)) {
          from.pause();
          to.once('drain', () => from.resume());
        }
      }
    });
    from.on('end', () => {
      if (!cut && !to.writableEnded) to.end();
    });
    from.on('close', (hadError) => {
      if (hadError && !to.destroyed) to.resetAndDestroy();
      else if (!cut) setTimeout(() => to.destroy(), 3000).unref();
    });
  }

  close(): void {
    this.server.close();
    for (const p of this.pairs) {
      p.client.destroy();
      p.upstream.destroy();
    }
  }
}

// ---- one row ----

interface Peer {
  proc: ChildProcess;
  lines: { at: number; line: Line }[];
  waitFor(match: (l: Line) => boolean, timeoutMs: number): Promise<Line | null>;
  exit: Promise<number | null>;
  stderr: () => string;
}

function startPeer(argv: string[], netns?: string): Peer {
  const args = [PEER, ...argv];
  const proc = netns ? spawn('ip', ['netns', 'exec', netns, process.execPath, ...args], { stdio: ['pipe', 'pipe', 'pipe'] }) : spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const lines: Peer['lines'] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  let exited = false;
  proc.stderr!.on('data', (d) => (stderr += d));
  proc.stdin!.on('error', () => {});
  onJsonLines(proc.stdout!, (o) => {
    lines.push({ at: performance.now(), line: o });
    for (const w of [...waiters]) w();
  });
  const exit = new Promise<number | null>((resolve) =>
    proc.on('close', (code, signal) => {
      exited = true;
      for (const w of [...waiters]) w();
      resolve(code ?? (signal ? -1 : null));
    }),
  );
  const waitFor = (match: (l: Line) => boolean, timeoutMs: number) =>
    new Promise<Line | null>((resolve) => {
      const check = () => {
        const hit = lines.find((x) => match(x.line));
        if (hit || exited) {
          waiters.delete(check);
          clearTimeout(timer);
          resolve(hit?.line ?? null);
        }
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        resolve(null);
      }, timeoutMs);
      waiters.add(check);
      check();
    });
  return { proc, lines, waitFor, exit, stderr: () => stderr };
}

class RowRun {
  src!: Peer;
  dst!: Peer;
  srcPid = 0;
  dstPid = 0;
  dstUri = '';
  netns: Netns | null = null;
  sourceResult!: Promise<Line | null>;
  destinationResult!: Promise<Line | null>;
  #strangers: { name: string; socket: net.Socket; answer: string | null; closed: boolean }[] = [];

  signalDestination(sig: NodeJS.Signals): void {
    try {
      process.kill(this.dstPid, sig);
    } catch {
      // Gone already.
    }
  }

  signalSource(sig: NodeJS.Signals): void {
    try {
      process.kill(this.srcPid, sig);
    } catch {
      // Gone already.
    }
  }

  /** Three strangers at once: garbage bytes, a second source's Hello, an idle connection. */
  strangers(): void {
    const [, host, port] = /^tcp:(.*):(\d+)$/.exec(this.dstUri)!;
    const hello = { wireVersion: WIRE_VERSION, migrationId: `stranger-${process.pid}`, channels: 1, sections: [], capabilities: DEFAULT_CAPABILITIES, parameters: DEFAULT_PARAMETERS };
    const sends: [string, Buffer | null][] = [
      ['garbage', Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')],
      ['second source', Buffer.concat(encodeFrame(FrameType.Hello, 0, jsonPayload(hello)))],
      ['idle', null],
    ];
    for (const [name, bytes] of sends) {
      const socket = net.connect(Number(port), host!);
      const s = { name, socket, answer: null as string | null, closed: false };
      socket.on('error', () => {});
      let got = Buffer.alloc(0);
      socket.on('data', (d: Buffer) => {
        got = Buffer.concat([got, d]);
        if (got.length >= FRAME_HEADER_BYTES && got.length >= FRAME_HEADER_BYTES + got.readUInt32BE(8)) {
          const type = got.readUInt8(5);
          const payload = got.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + got.readUInt32BE(8));
          s.answer = type === FrameType.Error ? String((JSON.parse(payload.toString()) as { code: string }).code) : FrameType[type] ?? String(type);
        }
      });
      socket.on('close', () => (s.closed = true));
      if (bytes) socket.write(bytes);
      this.#strangers.push(s);
    }
  }

  strangerProblems(): string[] {
    const problems: string[] = [];
    const by = (n: string) => this.#strangers.find((s) => s.name === n);
    if (by('garbage')?.answer !== 'ERR_MIGRATION_PROTOCOL') problems.push(`garbage got ${by('garbage')?.answer}`);
    if (by('second source')?.answer !== 'ERR_MIGRATION_BUSY') problems.push(`second source got ${by('second source')?.answer}`);
    return problems;
  }

  strangerSummary(): string {
    return this.#strangers.map((s) => `${s.name}:${s.answer ?? (s.closed ? 'closed' : 'open')}`).join(' ');
  }

  dropStrangers(): void {
    for (const s of this.#strangers) s.socket.destroy();
  }
}

interface RowReport {
  phase: Phase;
  fault: string;
  na?: string;
  ok: boolean;
  problems: string[];
  cells: Record<string, string>;
  ms: number;
}

/** The phase a moment falls into, from the milestones both ends printed before it. */
function phaseAt(run: RowRun, at: number): string {
  const seen = (peer: Peer, match: (l: Line) => boolean) => peer.lines.some((x) => x.at <= at && match(x.line));
  if (seen(run.src, (l) => l.event === 'MIGRATION_COMMITTED')) return 'after commit';
  if (seen(run.dst, mark('loadFinish'))) return 'destination load';
  if (seen(run.src, mark('saveComplete'))) return 'stop-copy';
  if (seen(run.src, status('device'))) return 'switchover';
  if (seen(run.src, status('active'))) return 'precopy';
  if (seen(run.src, status('setup'))) return 'setup';
  return 'none';
}

async function runRow(phase: Phase, fault: Fault, verbose: boolean): Promise<RowReport> {
  const t0 = performance.now();
  const planned = fault.plan(phase);
  if (typeof planned === 'string') return { phase, fault: fault.name, na: planned, ok: true, problems: [], cells: {}, ms: 0 };
  const plan = planned;
  const setup = PHASE_SETUP[phase];
  const merge = (...parts: (Partial<MockProfileInput> | undefined)[]): Partial<MockProfileInput> => {
    const out: Partial<MockProfileInput> = {};
    for (const p of parts) if (p) Object.assign(out, p, p.arcLatencyMs && out.arcLatencyMs ? { arcLatencyMs: { ...out.arcLatencyMs, ...p.arcLatencyMs } } : {});
    return out;
  };
  const srcSpec: PeerSpec = { mock: DEVICES, overrides: merge(BASE, setup.both, setup.source, plan.source) };
  const dstSpec: PeerSpec = { mock: DEVICES, overrides: merge(BASE, setup.both, setup.destination, plan.destination) };
  const parameters = { 'downtime-limit': DOWNTIME_LIMIT_MS, 'switchover-limit': SWITCHOVER_LIMIT_MS, 'peer-timeout': PEER_TIMEOUT_MS, 'x-assumed-p2p-arc-ms': 20, ...plan.parameters };
  const capabilities = { 'switchover-ack': true, 'switchover-abort': true, ...plan.capabilities };
  const run = new RowRun();
  const problems: string[] = [];
  const cells: Record<string, string> = {};
  let proxy: FaultProxy | null = null;
  try {
    if (plan.netns) run.netns = createNetns();
    const listen = run.netns ? `tcp:${run.netns.nsIp}:0` : 'tcp:127.0.0.1:0';
    run.dst = startPeer(['destination', '--listen', listen, '--spec', JSON.stringify(dstSpec), '--options', JSON.stringify({ handshakeTimeoutMs: 3000 })], run.netns?.name);
    const listening = await run.dst.waitFor((l) => !!l.listening, 15_000);
    if (!listening) throw new Error(`the destination did not listen: ${run.dst.stderr().slice(-500)}`);
    run.dstPid = listening.pid as number;
    run.dstUri = listening.listening as string;
    let to = run.dstUri;
    if (plan.proxy) {
      const [, host, port] = /^tcp:(.*):(\d+)$/.exec(run.dstUri)!;
      proxy = new FaultProxy({ host: host!, port: Number(port) });
      to = await proxy.listen();
      if (plan.proxy.atStart) proxy.arm(plan.proxy.fault);
    }
    run.src = startPeer(['source', '--to', to, '--spec', JSON.stringify(srcSpec), '--source', JSON.stringify({ capabilities, parameters, channels: 3, timeoutMs: plan.timeoutMs })]);
    const ready = await run.src.waitFor((l) => !!l.ready, 15_000);
    if (!ready) throw new Error(`the source did not start: ${run.src.stderr().slice(-500)}`);
    run.srcPid = (ready.ready as { pid: number }).pid;
    const srcBefore = ready.ready as { deviceDigests: string[]; fds: number; sockets: number };
    run.sourceResult = run.src.waitFor((l) => !!l.result, 60_000);
    run.destinationResult = run.dst.waitFor((l) => !!l.result, 60_000);

    // The fault, from the hook.
    let injectedAt = 0;
    let injectedPhase = '-';
    const hookPeer = setup.hook.side === 'source' ? run.src : run.dst;
    const injection = (async () => {
      if (plan.proxy?.atStart) {
        injectedAt = performance.now();
        injectedPhase = 'start';
        return;
      }
      if (!plan.inject && !plan.proxy) return;
      const hit = await Promise.race([hookPeer.waitFor(setup.hook.match, 30_000), run.sourceResult.then(() => null)]);
      if (!hit) return;
      await sleep(setup.hook.delayMs);
      injectedAt = performance.now();
      injectedPhase = phaseAt(run, injectedAt);
      if (plan.proxy) proxy!.arm(plan.proxy.fault);
      await plan.inject?.(run);
    })();

    const srcResultLine = await run.sourceResult;
    if (!srcResultLine) throw new Error(`the source printed no result: ${run.src.stderr().slice(-800)}`);
    const endedAt = run.src.lines.find((x) => x.line.result)!.at;
    const sr = srcResultLine.result as Line & { status: string; error?: { code: string; message: string }; exitCode: number; vmRunning: boolean; states: string[]; deviceDigests: string[]; vmDowntimeOnAbortMs: number | null; downtimeMs: number | null };
    const migDigests = (srcResultLine.result as { digests?: { match: boolean | null }[] }).digests;

    // The destination's outcome (none if it died).
    type DestResult = Line & { status: string; error?: { code: string }; vmRunning: boolean; states: string[] };
    let dr = null as DestResult | null;
    if (!plan.destinationDies) {
      // A stopped destination reports once it is continued; a partitioned one after its own peer-timeout.
      const line = await Promise.race([run.destinationResult, sleep(PEER_TIMEOUT_MS * 2 + SLOW_MS * 2 + 4000).then(() => null)]);
      dr = (line?.result as DestResult | undefined) ?? null;
    }
    await injection;

    // The management app's decision after an unknown outcome.
    let vmSrc = sr.vmRunning;
    let srcStates = sr.states;
    let srcDigests = sr.deviceDigests;
    if (sr.exitCode === 3) {
      const destRuns = dr?.status === 'completed';
      run.src.proc.stdin!.write(destRuns ? 'leave\n' : 'resume\n');
      const d = await run.src.waitFor((l) => !!l.decision, 10_000);
      const dd = d?.decision as { action: string; vmRunning: boolean; states: string[]; deviceDigests: string[] } | undefined;
      if (!dd) problems.push('no decision after the unknown outcome');
      else {
        vmSrc = dd.vmRunning;
        srcStates = dd.states;
        srcDigests = dd.deviceDigests;
      }
      cells.decision = destRuns ? 'left stopped' : 'resumeOnSource';
    }
    const srcFinal = (await run.src.waitFor((l) => !!l.final, 10_000))?.final as { before: { fds: number; sockets: number }; after: { fds: number; sockets: number }; base: { fds: number }; end: { fds: number } } | undefined;
    const srcExit = await Promise.race([run.src.exit, sleep(5000).then(() => 'hung')]);

    // A surviving destination that failed must answer the next source.
    let relisten = '-';
    let dstSettled: { fds: number; sockets: number } | undefined;
    if (dr && !plan.destinationDies) {
      dstSettled = (await run.dst.waitFor((l) => !!l.settled, 8000))?.settled as typeof dstSettled;
      if (dr.status !== 'completed') relisten = await probeRelisten(run);
    }
    run.dropStrangers();
    const dstLines = run.dst.lines;
    const dstListen = listening as { fds: number; sockets: number };

    // ---- the row's cells ----
    const srcCode = sr.error?.code?.replace('ERR_MIGRATION_', '') ?? '';
    cells.phaseSeen = injectedPhase === '-' ? failurePhase(run) : injectedPhase;
    cells.source = `${sr.status}${srcCode ? ` ${srcCode}` : ''} exit ${srcExit}`;
    cells.destination = plan.destinationDies ? 'killed' : dr ? `${dr.status}${dr.error ? ` ${dr.error.code.replace('ERR_MIGRATION_', '')}` : ''}${relisten !== '-' ? `, next: ${relisten}` : ''}` : 'no result';
    const vmDst = !!dr?.vmRunning;
    cells.vm = vmSrc && !vmDst ? 'source' : vmDst && !vmSrc ? 'destination' : vmSrc && vmDst ? 'BOTH' : 'nowhere';
    const stoppedMs = sr.vmDowntimeOnAbortMs ?? (sr.status === 'completed' ? sr.downtimeMs : null);
    const bound = capabilities['switchover-abort'] ? parameters['downtime-limit'] + parameters['switchover-limit'] : null;
    cells.downtime = stoppedMs === null ? (sr.exitCode === 3 ? 'unknown' : '-') : `${stoppedMs.toFixed(0)}${sr.status === 'completed' ? '' : `/${bound ?? '-'}`}`;
    cells.ended = injectedAt ? `${(endedAt - injectedAt).toFixed(0)}` : '-';
    cells.devices = `${srcStates.join(',')} / ${plan.destinationDies ? '-' : (dr?.states ?? ['?']).join(',')}`;
    const intact = srcDigests.every((d, i) => d === srcBefore.deviceDigests[i]);
    const matched = migDigests?.length ? migDigests.every((d) => d.match === true) : null;
    cells.digests = sr.status === 'completed' ? (matched ? 'match' : 'MISMATCH') : intact ? 'intact' : 'reset';
    cells.fdsSrc = srcFinal ? `${srcFinal.before.fds}->${srcFinal.after.fds} (${srcFinal.base.fds}->${srcFinal.end.fds})` : '?';
    cells.socksSrc = srcFinal ? `${srcFinal.before.sockets}->${srcFinal.after.sockets}` : '?';
    cells.fdsDst = dstSettled ? `${dstListen.fds}->${dstSettled.fds}` : '-';
    cells.socksDst = dstSettled ? `${dstListen.sockets}->${dstSettled.sockets}` : '-';
    if (proxy?.done) cells.proxy = proxy.done;
    if (plan.extra) cells.strangers = run.strangerSummary();

    // ---- the invariants ----
    const wantPhase = plan.proxy?.atStart ? 'start' : phase;
    if (cells.phaseSeen !== wantPhase) problems.push(`fault hit ${cells.phaseSeen}, not ${wantPhase}`);
    // A row whose fault is there from the start (the ACK never comes) ends at the source's own timeout.
    const endBoundMs = plan.timeoutMs ? plan.timeoutMs + MARGIN_MS : END_BOUND_MS;
    if (injectedAt && endedAt - injectedAt > endBoundMs && sr.exitCode !== 3) problems.push(`ended ${(endedAt - injectedAt).toFixed(0)} ms after the fault (bound ${endBoundMs})`);
    if (srcFinal) {
      // Left stopped (the destination runs the VM), the devices keep their stop-copy data fds until closed: only sockets count then.
      const leftStopped = cells.decision === 'left stopped';
      if ((!leftStopped && srcFinal.after.fds !== srcFinal.before.fds) || srcFinal.after.sockets !== srcFinal.before.sockets) problems.push(`source fds ${srcFinal.before.fds}->${srcFinal.after.fds}, sockets ${srcFinal.before.sockets}->${srcFinal.after.sockets}`);
      if (srcFinal.end.fds !== srcFinal.base.fds) problems.push(`source fds after closing its devices ${srcFinal.base.fds}->${srcFinal.end.fds}`);
    } else problems.push('source printed no final counts');
    if (dstSettled && (dstSettled.fds !== dstListen.fds || dstSettled.sockets !== dstListen.sockets)) problems.push(`destination fds ${dstListen.fds}->${dstSettled.fds}, sockets ${dstListen.sockets}->${dstSettled.sockets}`);
    if (cells.vm === 'BOTH' || cells.vm === 'nowhere') problems.push(`VM runs ${cells.vm}`);
    const completedCleanly = () => {
      if (sr.status !== 'completed' || srcExit !== 0) problems.push(`source ${cells.source}`);
      if (dr?.status !== 'completed') problems.push(`destination ${cells.destination}`);
      if (cells.vm !== 'destination') problems.push(`VM on ${cells.vm}`);
      if (!matched) problems.push('digests do not match');
    };
    const rolledBack = () => {
      if (!['failed', 'cancelled'].includes(sr.status) || ![1, 143].includes(srcExit as number)) problems.push(`source ${cells.source}`);
      if (!vmSrc) problems.push('VM not running on the source');
      if (srcStates.some((s) => s !== 'running')) problems.push(`source devices ${srcStates}`);
      if (!intact) {
        const resetWarned = run.src.lines.some((x) => x.line.event === 'MIGRATION_WARNING' && /resetting it/.test(String((x.line.data as { message: string }).message)));
        if (!plan.sourceResetAllowed || !resetWarned) problems.push('source digests changed');
      }
      if (stoppedMs !== null && bound !== null && stoppedMs > bound + MARGIN_MS) problems.push(`VM stopped ${stoppedMs.toFixed(0)} ms, bound ${bound} + ${MARGIN_MS}`);
      if (!plan.destinationDies) {
        if (!dr) problems.push('destination gave no result');
        else {
          if (dr.status === 'completed' || dr.vmRunning) problems.push(`destination ${dr.status}, VM running there ${dr.vmRunning}`);
          if (dr.states.some((s) => s !== 'running')) problems.push(`destination devices ${dr.states}`);
          if (relisten !== 'INCOMPATIBLE') problems.push(`destination answered the next source with ${relisten}`);
        }
      }
    };
    if (plan.expect === 'complete') completedCleanly();
    else if (plan.expect === 'rollback') rolledBack();
    else if (plan.expect === 'no-switchover') {
      rolledBack();
      if (run.src.lines.some((x) => status('device')(x.line))) problems.push('the source switched over without the ACK');
    } else {
      // After the commit: completed, or unknown with the VM in exactly one place, or rolled back on the destination's word.
      if (sr.status === 'completed') completedCleanly();
      else if (sr.exitCode === 3) {
        if (sr.vmRunning) problems.push('VM ran on the source before the decision');
        if (cells.vm === 'source' && (srcStates.some((s) => s !== 'running') || !intact)) problems.push(`source after resume: ${srcStates} ${cells.digests}`);
        if (cells.vm === 'destination' && !matched && !(dr?.status === 'completed')) problems.push('destination runs the VM without a completed load');
      } else if (dr && dr.status !== 'completed') rolledBack();
      else problems.push(`source ${cells.source} but destination ${cells.destination}`);
    }
    problems.push(...(plan.extra?.(run) ?? []));
    void dstLines;
  } catch (err) {
    problems.push(`harness: ${(err as Error).message}`);
  } finally {
    // The peers' lines: all with --verbose, the last ones of a row the harness could not finish.
    const harnessFailed = problems.some((p) => p.startsWith('harness:'));
    if (verbose || harnessFailed) {
      console.log(`--- ${phase} / ${fault.name}`);
      for (const [who, p] of [['src', run.src], ['dst', run.dst]] as const) {
        if (!p) continue;
        const shown = p.lines.filter((x) => x.line.event !== 'MIGRATION_WARNING');
        for (const x of verbose ? shown : shown.slice(-12)) console.log(`  ${who} ${(x.at - t0).toFixed(0).padStart(6)} ${JSON.stringify(x.line).slice(0, 300)}`);
        if (p.stderr()) console.log(`  ${who} stderr: ${p.stderr().slice(-500)}`);
      }
      if (proxy) console.log(`  proxy: ${proxy.done ?? 'did nothing'}`);
    }
    proxy?.close();
    for (const p of [run.src, run.dst]) {
      if (!p) continue;
      p.proc.kill('SIGCONT');
      p.proc.kill('SIGTERM');
      const gone = await Promise.race([p.exit.then(() => true), sleep(5000).then(() => false)]);
      if (!gone) {
        p.proc.kill('SIGKILL');
        problems.push('a peer did not exit on SIGTERM');
      }
    }
    if (run.dstPid) {
      // Inside a network namespace the process is ip's child: make sure it is gone.
      try {
        process.kill(run.dstPid, 'SIGKILL');
      } catch {
        // Gone.
      }
    }
    if (run.netns) run.netns.destroy();
  }
  return { phase, fault: fault.name, ok: problems.length === 0, problems, cells, ms: performance.now() - t0 };
}

/** For rows whose fault sits in a profile: the phase of the first failure either end reported. */
function failurePhase(run: RowRun): string {
  const failed = (l: Line) => l.event === 'MIGRATION' && ['failed', 'cancelling', 'cancelled'].includes((l.data as { status: string }).status);
  const first = [...run.src.lines, ...run.dst.lines].filter((x) => failed(x.line) || (x.line.event === 'MIGRATION_WARNING' && /resetting it|EIO/.test(JSON.stringify(x.line.data)))).sort((a, b) => a.at - b.at)[0];
  return first ? phaseAt(run, first.at - 0.001) : 'none';
}

/** A Hello the destination cannot take (no sections): a destination that serves again says INCOMPATIBLE. */
async function probeRelisten(run: RowRun): Promise<string> {
  const [, host, port] = /^tcp:(.*):(\d+)$/.exec(run.dstUri)!;
  const hello = { wireVersion: WIRE_VERSION, migrationId: `probe-${process.pid}`, channels: 1, sections: [], capabilities: DEFAULT_CAPABILITIES, parameters: DEFAULT_PARAMETERS };
  return new Promise<string>((resolve) => {
    const socket = net.connect(Number(port), host!);
    let got = Buffer.alloc(0);
    const done = (answer: string) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(answer);
    };
    const timer = setTimeout(() => done('no answer'), 5000);
    socket.on('error', (e) => done(`error ${(e as NodeJS.ErrnoException).code}`));
    socket.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length >= FRAME_HEADER_BYTES && got.length >= FRAME_HEADER_BYTES + got.readUInt32BE(8)) {
        const payload = got.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + got.readUInt32BE(8));
        done(got.readUInt8(5) === FrameType.Error ? String((JSON.parse(payload.toString()) as { code: string }).code).replace('ERR_MIGRATION_', '') : FrameType[got.readUInt8(5)] ?? '?');
      }
    });
    socket.on('close', () => done('closed'));
    socket.write(Buffer.concat(encodeFrame(FrameType.Hello, 0, jsonPayload(hello))));
  });
}

function table(rows: RowReport[]): string {
  const cols: [string, (r: RowReport) => string][] = [
    ['phase', (r) => r.phase],
    ['fault', (r) => r.fault],
    ['result', (r) => (r.na ? `n/a (${r.na})` : r.ok ? 'ok' : 'FAIL')],
    ['hit', (r) => r.cells.phaseSeen ?? ''],
    ['source', (r) => r.cells.source ?? ''],
    ['destination', (r) => r.cells.destination ?? ''],
    ['VM', (r) => (r.cells.vm ? `${r.cells.vm}${r.cells.decision ? ` (${r.cells.decision})` : ''}` : '')],
    ['down/bound ms', (r) => r.cells.downtime ?? ''],
    ['end ms', (r) => r.cells.ended ?? ''],
    ['devices src/dst', (r) => r.cells.devices ?? ''],
    ['digests', (r) => r.cells.digests ?? ''],
    ['fds src (closed)', (r) => r.cells.fdsSrc ?? ''],
    ['socks src', (r) => r.cells.socksSrc ?? ''],
    ['fds dst', (r) => r.cells.fdsDst ?? ''],
    ['socks dst', (r) => r.cells.socksDst ?? ''],
    ['row s', (r) => (r.na ? '' : (r.ms / 1000).toFixed(1))],
  ];
  const widths = cols.map(([h, f]) => Math.max(h.length, ...rows.map((r) => f(r).length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ').trimEnd();
  const out = [line(cols.map(([h]) => h)), widths.map((w) => '-'.repeat(w)).join('-|-')];
  for (const r of rows) out.push(line(cols.map(([, f]) => f(r))));
  return out.join('\n');
}

async function main(): Promise<number> {
  const { values } = parseArgs({ options: { only: { type: 'string' }, verbose: { type: 'boolean' } } });
  const t0 = performance.now();
  const rows: RowReport[] = [];
  console.log(`fault matrix: ${PHASES.length} phases x ${FAULTS.length} faults, peer-timeout ${PEER_TIMEOUT_MS} ms, switchover bound ${DOWNTIME_LIMIT_MS}+${SWITCHOVER_LIMIT_MS} ms (switchover-limit rows ${TIGHT_LIMIT_MS}+${TIGHT_SWITCHOVER_LIMIT_MS}), 2 nic-vf mock devices, 3 channels (main + one per device)`);
  for (const fault of FAULTS) {
    for (const phase of PHASES) {
      if (values.only && !`${phase}/${fault.name}`.includes(values.only)) continue;
      const r = await runRow(phase, fault, !!values.verbose);
      rows.push(r);
      const extra = [r.cells.proxy, r.cells.strangers].filter(Boolean).join('; ');
      if (!r.na) console.log(`${r.ok ? 'ok  ' : 'FAIL'} ${phase} / ${fault.name} (${(r.ms / 1000).toFixed(1)} s)${extra ? ` [${extra}]` : ''}${r.ok ? '' : `: ${r.problems.join('; ')}`}`);
    }
  }
  console.log(`\n${table(rows)}\n`);
  const applicable = rows.filter((r) => !r.na);
  const failed = applicable.filter((r) => !r.ok);
  for (const r of failed) console.log(`FAIL ${r.phase} / ${r.fault}: ${r.problems.join('; ')}`);
  console.log(`${rows.length - applicable.length} n/a; matrix took ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  console.log(`${applicable.length - failed.length} passed, ${failed.length} failed`);
  return failed.length ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
