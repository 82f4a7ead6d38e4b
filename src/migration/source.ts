// The source side of a migration: connects, checks the destination in a
// handshake, runs precopy iterations until the pending stop-copy data fits the
// downtime limit, then stops the VM and streams the rest. Any failure or
// cancel leaves the VM running with every device back in RUNNING.
import { randomUUID } from 'node:crypto';
import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { MigrationEvents, type MigrationEventMap, type MigrationEventName, type MigrationStatus } from './events.js';
import { MigrationError, describeError } from './errors.js';
import type { DeviceInfo, HandlerContext, PendingBytes, SectionOutput, StateHandler } from './handler.js';
import { AbortGuard } from './abort-guard.js';
import type { VmControl } from './vm.js';
import { type MigrationCapabilities, type MigrationParameters, DEFAULT_CAPABILITIES, DEFAULT_PARAMETERS, mergeCapabilities, mergeParameters } from './params.js';
import { type Channel, PeerWatch, RateLimiter, makeChannel, sectionOutput, withTimeout } from './channels.js';
import { FrameType, WIRE_VERSION, encodeFrame } from './wire.js';
import { type HelloMessage, type RunningMessage, type SourcePhase, messagePayload, parseMessage, sourceMeaning } from './protocol/index.js';
import { type MigrationUri, connect, parseUri } from './transport.js';
import { type TlsOptions, channelBinding, checkTlsOptions, loadTlsConfig, tlsErrorFromPeer } from './tls.js';
import { recordControlMs } from './switchover-history.js';
import { BandwidthMeter, sumBytes, saneMs, subtractBytes, MAX_REPORTED_BYTES } from './accounting.js';
import { type DowntimeSplit, DowntimePolicy, type PolicyDecision, type PolicyKind, MIN_RATE_EVIDENCE_MS, assumptionParameter } from './policy.js';

/** Bytes sent but not arrived above which the path counts as saturated (its arrival rate is its capacity). */
const SATURATED_QUEUE_BYTES = 1 << 20;
/** The destination reports every 10 ms while data moves: a longer gap is a destination that was not reading (an initial load holding up its channel), not the path's rate. */
const MAX_ARRIVAL_INTERVAL_MS = 100;
/** Longest wait, after the end of the stream, for the destination to load and stop every device. */
const READY_TIMEOUT_MS = 60_000;
/** Longest wait, after the commit, for the destination to say the VM runs (then the outcome is unknown). */
const RUNNING_TIMEOUT_MS = 60_000;
/** Longest time the main channel stays open after a Cancel, for the destination to read it (see #fail). */
const CANCEL_LINGER_MS = 2_000;

export interface MigrationInfo {
  status: MigrationStatus;
  totalTimeMs: number;
  setupTimeMs: number;
  downtimeMs: number | null;
  /** null until the bandwidth is known. */
  expectedDowntimeMs: number | null;
  /** The expected downtime in parts, each with what it rests on (null before the first pass). */
  expectedDowntime: DowntimeSplit | null;
  /** The limit the switchover aimed for (downtime-limit, or the dynamic limit once it ramped). */
  downtimeLimitInForceMs: number;
  /** After a switchover: the downtime in the same parts, measured. */
  measuredSwitchover: MeasuredSwitchover | null;
  /** Of which data-size-independent device time (arcs, load beyond the transfer), ms. */
  expectedDeviceTimeMs: number;
  /** After a failed or aborted switchover: VM stop to the VM running again here, ms. */
  vmDowntimeOnAbortMs: number | null;
  /** System-wide: RAM and every device. */
  remainingBytes: number;
  iterations: number;
  transferredBytes: number;
  bandwidthBytesPerSec: number;
  throughputMbps: number;
  bytesByKind: Record<string, number>;
  bytesByChannel: number[];
  devices: DeviceInfo[];
  stalled: boolean;
  suggestedDowntimeLimitMs: number | null;
  switchoverAcked: boolean;
  warnings: string[];
  error?: { code: string; message: string };
  /** Per section: the source's digest at stop and the destination's after load (mock devices, synthetic RAM). */
  digests?: { section: string; source: string | null; destination: string | null; match: boolean | null }[];
}

/** The switchover as it happened, in the parts of the estimate. */
export interface MeasuredSwitchover {
  downtimeMs: number;
  /** VM stop to every device in stop-copy (quiesce and stop arcs). */
  sourceArcsMs: number;
  /** Stop-copy data, from the devices' stop to the end of the stream. */
  dataMs: number;
  /** End of the stream to the destination's ReadyToRun (load still queued, resuming -> stop). */
  destinationLoadMs: number;
  /** Commit to the destination's Running (its resume arcs and a round trip). */
  destinationResumeMs: number;
  /**
   * The control cost: the two exchanges' transit (twice the commit -> running
   * round trip less the destination's work in it) and the destination's work
   * in them besides its arcs. What the estimate's overhead stands for.
   */
  controlMs: number;
  stopCopyBytes: number;
  /** Stop-copy throughput under the switchover's contention (devices stopped, all channels busy); null when too little moved. */
  stopCopyBytesPerSec: number | null;
}

export interface MigrateOptions {
  channels?: number;
  signal?: AbortSignal;
  /** ms to wait for the destination's handshake answer. */
  handshakeTimeoutMs?: number;
}

export interface SourceOptions {
  handlers: StateHandler[];
  vm: VmControl;
  /** The convergence policy; 'classic' reproduces QEMU's bytes-over-bandwidth rule (for comparison). */
  policy?: PolicyKind;
  capabilities?: Partial<MigrationCapabilities>;
  parameters?: Partial<MigrationParameters>;
  /** TLS on every channel (x509 with this host's client certificate, or PSK) and the destination's expected hostname: see TlsOptions. */
  tls?: TlsOptions;
}

/** One migration's working set, handed from phase to phase. */
interface SourceRun {
  /** The handlers' context on the way forward: its signal is the abort guard's. */
  ctx: HandlerContext;
  /** The context of the hooks that finish or roll back (saveCleanup): its signal stays live. */
  finishCtx: HandlerContext;
  /** saveSetup was called: a rollback brings every handler back. */
  setupStarted: boolean;
  /** max-bandwidth, shared by every section's output. */
  limiter: RateLimiter;
  outputs: SectionOutput[];
}

export class MigrationSource extends MigrationEvents {
  /** The TLS options (credentials are read by migrate()); null: plaintext. */
  readonly tls: TlsOptions | null;
  readonly handlers: StateHandler[];
  readonly vm: VmControl;
  #caps: MigrationCapabilities;
  #params: MigrationParameters;
  #status: MigrationStatus = 'none';
  #channels: Channel[] = [];
  #t0 = 0;
  #setupDoneAt = 0;
  #stoppedAt = 0;
  #downtimeMs: number | null = null;
  #endAt = 0;
  #iterations = 0;
  #transferred = 0;
  #bytesByKind: Record<string, number> = {};
  /**
   * Pass-level send rate over the last second of passes (the first pass,
   * cold, is left out). The switchover rate is the larger of this and the
   * arrival rate: the shorter the windows, the more the larger of two noisy
   * figures over-reads (500 ms windows read 180 MiB/s of a 119 MiB/s link once).
   */
  #bandwidth = new BandwidthMeter(1000);
  /**
   * Every pass that sent anything, the first and the small ones included:
   * the fallback when no pass filled the pipe. A small state goes out whole
   * in the first pass and a slow device then re-dirties less than a full
   * pass: without it the bandwidth stayed unknown, and the switchover never
   * came (seen: 600 passes in 60 s, 350 KB left, "measuring the bandwidth").
   */
  #anyPass = new BandwidthMeter(1000);
  #pending: PendingBytes[] = [];
  #expectedDowntimeMs: number | null = null;
  #warnings: string[] = [];
  #digests: MigrationInfo['digests'];
  #error?: { code: string; message: string };
  #vmStoppedByUs = false;
  readonly policy: DowntimePolicy;
  #switchoverAcked = false;
  /** Initial-data renewals (device REINITs) announced so far; only an ACK covering all of them counts. */
  #initialRenewals = 0;
  #returnPathDone: Promise<void> | null = null;
  /** Section bytes the destination reported as loaded. */
  #destLoadedBytes = 0;
  /** Section bytes the destination reported as arrived. */
  #destReceivedBytes = 0;
  /** When the last LoadReport arrived (performance.now()). */
  #destReportAtMs: number | null = null;
  #destinationError: Error | null = null;
  #running: { resolve: (m: RunningMessage) => void; reject: (e: Error) => void } | null = null;
  #readyToRun: { resolve: () => void; reject: (e: Error) => void } | null = null;
  /** Commit sent: the VM belongs to the destination unless it says it is not running. */
  #committed = false;
  /** The destination reported a failure after which it runs nothing (its VM stopped, devices reset). */
  #destinationNotRunning = false;
  /** The destination said the VM runs there: nothing after that is a failure of the migration. */
  #runningThere = false;
  /** Assumed arcs already warned of ("device side arc"). */
  #assumedWarned = new Set<string>();
  /** What the switchover decision promised: checked against the measured downtime. */
  #promise: { expectedMs: number | null; limitMs: number; split: DowntimeSplit } | null = null;
  /** Switchover milestones, performance.now(): devices stopped, stream sent, destination ready, commit sent. */
  #marks = { stopped: 0, streamed: 0, ready: 0, committed: 0, running: 0 };
  /** What the destination said of its work in the two exchanges (Running). */
  #exchangeWork: { readyWorkMs: number; resumeWorkMs: number; exchangeArcsMs: number } | null = null;
  /** Stop-copy bytes and their transfer rate at the switchover (devices stopped, all channels busy). */
  #switchoverBytes = 0;
  /** The outcome is unknown and the source waits for resumeOnSource(). */
  #awaitingResume: { ctx: HandlerContext } | null = null;

  constructor(options: SourceOptions) {
    super();
    if (!Array.isArray(options.handlers) || options.handlers.length === 0) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', 'a migration needs at least one state handler');
    if (options.handlers.length > 65535) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', 'at most 65535 state handlers');
    this.handlers = options.handlers;
    this.vm = options.vm;
    this.#caps = mergeCapabilities(DEFAULT_CAPABILITIES, options.capabilities);
    this.#params = mergeParameters(DEFAULT_PARAMETERS, options.parameters);
    this.policy = new DowntimePolicy(this.handlers, options.policy ?? 'device-aware');
    this.tls = options.tls === undefined ? null : checkTlsOptions(options.tls, 'source');
  }

  get status(): MigrationStatus {
    return this.#status;
  }

  get capabilities(): MigrationCapabilities {
    return { ...this.#caps };
  }

  get parameters(): MigrationParameters {
    return { ...this.#params };
  }

  setCapabilities(update: Partial<MigrationCapabilities>): void {
    if (this.#status !== 'none') throw new MigrationError('ERR_MIGRATION_STATE', `capabilities cannot change while the migration is ${this.#status}`);
    this.#caps = mergeCapabilities(this.#caps, update);
  }

  /** Parameters may change at any time (e.g. raising downtime-limit on a stalled migration). */
  setParameters(update: Partial<MigrationParameters>): void {
    this.#params = mergeParameters(this.#params, update);
  }

  #setStatus(status: MigrationStatus, reason?: { code: string; message: string }): void {
    this.#status = status;
    this.emitEvent('MIGRATION', reason ? { status, reason } : { status });
  }

  /** Emits where a throwing listener must not change the outcome (past the commit). */
  #emitSafely<K extends MigrationEventName>(event: K, data: MigrationEventMap[K]): void {
    try {
      this.emitEvent(event, data);
    } catch (err) {
      // Past the commit a listener's bug must not turn a migration into a failure.
      this.#warnings.push(`a ${event} listener threw: ${describeError(err).message}`);
    }
  }

  #warn(message: string, data?: Record<string, unknown>): void {
    if (!this.#warnings.includes(message)) {
      this.#warnings.push(message);
      if (this.#warnings.length > 50) this.#warnings.shift();
    }
    this.emitEvent('MIGRATION_WARNING', data ? { message, data } : { message });
  }

  /** A handler context: `signal` is the abort guard's on the way forward, a live one where hooks finish or roll back. */
  #context(signal: AbortSignal): HandlerContext {
    return {
      signal,
      emit: (event, data) => this.emitEvent(event, data),
      warn: (message, data) => this.#warn(message, data),
    };
  }

  /** Cancels the migration: the VM keeps (or resumes) running on this side. */
  cancel(reason = 'cancelled by the user'): void {
    if (['none', 'completed', 'failed', 'cancelled'].includes(this.#status)) return;
    if (this.#committed) {
      this.#warn(`cancel ignored: the source already committed the VM to the destination (${reason})`);
      return;
    }
    this.#setStatus('cancelling');
    this.#fail(new MigrationError('ERR_MIGRATION_CANCELLED', reason));
  }

  /** The abort guard: its first failure ends every phase (see #teardown) and aborts the handlers' ctx.signal. */
  readonly #guard = new AbortGuard((err) => this.#teardown(err));

  #fail(err: Error): void {
    this.#guard.fail(err);
  }

  /** At the first failure: every wait and every send ends at once, and the destination is told why. */
  #teardown(err: Error): void {
    this.#running?.reject(err);
    this.#readyToRun?.reject(err);
    this.#watch?.stop();
    // Every send, pending or later, fails at once: a send stuck on a silent
    // peer must end now, or nothing after it (the rollback, the VM's resume)
    // would ever run.
    for (const ch of this.#channels) ch.writer.abort(err);
    const code = (err as MigrationError).code;
    const main = this.#channels[0];
    // A failure of this side's own (a cancel, an abort, a device) is said to
    // the destination, also with data in flight: the Cancel goes behind what
    // the main channel has queued (at most its socket buffer), then a FIN.
    // The main channel stays open, read and discarded, until the destination
    // closes it or CANCEL_LINGER_MS passed: closing it with unread bytes
    // would send a reset, and a reset discards the Cancel at the destination.
    // The data channels go at once (the destination waits for the main
    // channel's word before it blames their end; see destination.ts).
    if (main && err !== this.#destinationError && code !== 'ERR_MIGRATION_PEER_TIMEOUT' && code !== 'ERR_MIGRATION_CONNECTION' && !main.socket.destroyed && !main.socket.writableEnded) {
      main.reader.discard();
      main.socket.end(Buffer.concat(encodeFrame(FrameType.Cancel, 0, messagePayload(FrameType.Cancel, { reason: err.message.slice(0, 65536), ...(code ? { code } : {}) }))));
      const linger = setTimeout(() => main.socket.destroy(), CANCEL_LINGER_MS);
      linger.unref();
      this.#lingering = main.socket;
      this.#lingerDone = new Promise((resolve) =>
        main.socket.once('close', () => {
          clearTimeout(linger);
          resolve();
        }),
      );
    }
    // The destination keeps a failed connection open until this side closes
    // it, so a report it sent has been read by the time this runs.
    for (const ch of this.#channels) if (ch.socket !== this.#lingering) ch.socket.destroy();
  }

  /** The main channel, closing after a Cancel (see #teardown), and its close. */
  #lingering: Socket | null = null;
  #lingerDone: Promise<void> | null = null;

  /** The destination's liveness (heartbeats on the return path), from its handshake answer to the end. */
  #watch: PeerWatch | null = null;

  // ---- the migration, phase by phase ----

  /**
   * Migrates to `uri`: handshake, setup, precopy, switchover, commit, in that
   * order. A failure before the commit ends in #rollback (the VM runs here
   * again); past it, the outcome is unknown unless the destination says.
   */
  async migrate(uri: string, options: MigrateOptions = {}): Promise<MigrationInfo> {
    if (this.#status !== 'none') throw new MigrationError('ERR_MIGRATION_STATE', `migrate() was already called (status ${this.#status})`);
    const target = parseUri(uri);
    const channelCount = options.channels ?? 1;
    if (!Number.isInteger(channelCount) || channelCount < 1 || channelCount > 64) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `channels must be an integer from 1 to 64, got ${channelCount}`);
    const onAbort = () => this.cancel(String(options.signal?.reason ?? 'aborted'));
    options.signal?.addEventListener('abort', onAbort, { once: true });
    if (options.signal?.aborted) this.#fail(new MigrationError('ERR_MIGRATION_CANCELLED', 'aborted before start'));
    this.#t0 = performance.now();
    this.#setStatus('setup');
    const run: SourceRun = {
      ctx: this.#context(this.#guard.signal),
      finishCtx: this.#context(new AbortController().signal),
      setupStarted: false,
      limiter: new RateLimiter(0), // made by #setup, with the outputs
      outputs: [],
    };
    try {
      this.#guard.check();
      const main = await this.#handshake(target, channelCount, options.handshakeTimeoutMs ?? 10_000);
      await this.#setup(run);
      await this.#precopy(run);
      await this.#switchover(run, main);
      await this.#commit(main);
      return await this.#complete(run);
    } catch (err) {
      if (this.#runningThere) return this.#completedDespite(err);
      throw await this.#rollback(run, err as Error);
    } finally {
      this.#watch?.stop();
      options.signal?.removeEventListener('abort', onAbort);
      for (const ch of this.#channels) if (ch.socket !== this.#lingering) ch.socket.destroy();
      // The VM already runs here again; the caller (a CLI about to exit) gets
      // the result once the destination has read the Cancel (at most CANCEL_LINGER_MS).
      if (this.#lingerDone) await this.#lingerDone;
    }
  }

  /** Handshake: every channel connected and the destination's answer read, before any device changes state. */
  async #handshake(target: MigrationUri, channelCount: number, answerTimeoutMs: number): Promise<Channel> {
    const migrationId = randomUUID();
    const secure = this.tls ? await loadTlsConfig(this.tls, 'source') : null;
    const main = makeChannel(0, await connect(target, this.#guard.signal, secure));
    this.#channels.push(main);
    this.#guard.check();
    const hello: HelloMessage = {
      wireVersion: WIRE_VERSION,
      migrationId,
      channels: channelCount,
      sections: this.handlers.map((h) => {
        const { id, kind, compat } = h.describe();
        return { id, kind, compat };
      }),
      capabilities: this.#caps,
      parameters: this.#params,
    };
    await main.writer.writeMessage(FrameType.Hello, hello);
    for (let i = 1; i < channelCount; i++) {
      const ch = makeChannel(i, await connect(target, this.#guard.signal, secure));
      this.#channels.push(ch);
      // Over TLS, proof that this channel comes from the main channel's source.
      const binding = channelBinding(main.socket, ch.socket, i);
      await ch.writer.writeMessage(FrameType.ChannelHello, { migrationId, index: i, ...(binding ? { binding } : {}) });
    }
    const answer = await withTimeout(main.reader.next(), answerTimeoutMs, 'the destination did not answer the handshake');
    if (!answer) throw new MigrationError('ERR_MIGRATION_CONNECTION', 'the destination closed the connection during the handshake');
    if (sourceMeaning(this.#phase, answer.type) === 'refused') {
      const e = parseMessage(FrameType.Error, answer);
      if (e.code === 'ERR_MIGRATION_TLS') throw tlsErrorFromPeer(e, 'destination refused');
      const code = e.code === 'ERR_MIGRATION_INCOMPATIBLE' || e.code === 'ERR_MIGRATION_BUSY' ? e.code : 'ERR_MIGRATION_DESTINATION';
      throw new MigrationError(code, `destination refused: ${e.message}`);
    }
    const ack = parseMessage(FrameType.HelloAck, answer);
    if (ack.wireVersion !== WIRE_VERSION) throw new MigrationError('ERR_MIGRATION_INCOMPATIBLE', `the destination acknowledged wire version ${ack.wireVersion}, this side speaks ${WIRE_VERSION}`);
    this.#phase = 'precopy';
    this.#returnPathDone = this.#returnPath(main);
    this.#watchDestination(main);
    return main;
  }

  /** Liveness both ways from here: heartbeats on the main channel, and a destination silent for peer-timeout (stopped, cut off) fails the migration. */
  #watchDestination(main: Channel): void {
    const peerTimeoutMs = this.#params['peer-timeout'];
    this.#watch = new PeerWatch({
      timeoutMs: peerTimeoutMs,
      readers: () => [main.reader],
      writer: main.writer,
      onSilent: (silentMs) =>
        this.#fail(new MigrationError('ERR_MIGRATION_PEER_TIMEOUT', `the destination sent nothing for ${silentMs.toFixed(0)} ms (peer-timeout ${peerTimeoutMs} ms): it is stopped or cut off`)),
    });
    this.#watch.start();
  }

  /** Setup: every handler's saveSetup, then each section's output on its channel. */
  async #setup(run: SourceRun): Promise<void> {
    run.setupStarted = true;
    await this.#guard.settle(this.handlers.map((h) => h.saveSetup(run.ctx)));
    this.#guard.check();
    this.#setupDoneAt = performance.now();
    this.#setStatus('active');
    run.limiter = new RateLimiter(this.#params['max-bandwidth']);
    run.outputs = this.handlers.map((h, i) => {
      const ch = this.#channelFor(h, i);
      const kind = h.describe().kind;
      return sectionOutput(ch, i, run.limiter, this.#guard.signal, (n) => {
        this.#transferred += n;
        this.#bytesByKind[kind] = (this.#bytesByKind[kind] ?? 0) + n;
      }, () => {
        // The ACK in hand no longer covers this section's initial load;
        // switchover waits for one that counts this renewal.
        this.#initialRenewals++;
        this.#switchoverAcked = false;
        this.emitEvent('INITIAL_RENEWED', { device: h.describe().id, section: i, renewals: this.#initialRenewals, afterMs: performance.now() - this.#t0 });
      });
    });
  }

  /** Precopy: passes while the VM runs, until the policy says the switchover fits the limit in force. */
  async #precopy(run: SourceRun): Promise<void> {
    const probing = new Set(this.#caps['x-probe-switchover-arcs'] ? this.handlers.filter((h) => h.probeSwitchover) : []);
    for (;;) {
      this.#guard.check();
      run.limiter.bytesPerSec = this.#params['max-bandwidth'];
      this.#iterations++;
      // The probe walks each device's reversible switchover arcs once its
      // initial bytes are out, all devices at once as at the switchover.
      if (probing.size > 0) {
        const done = await this.#guard.settle([...probing].map((h) => h.probeSwitchover!(run.ctx)));
        [...probing].forEach((h, i) => done[i] && probing.delete(h));
        this.#guard.check();
      }
      const decision = await this.#decide(probing.size > 0);
      // With the probe on, the switchover waits for it (as for the ACK): its figures are what the promise rests on.
      if (decision.switchover && probing.size === 0) {
        this.#promise = { expectedMs: decision.expectedDowntimeMs, limitMs: decision.limitInForceMs, split: decision.split };
        return;
      }
      await this.#sendPass(run, decision);
    }
  }

  /** One pass's switchover decision, said in MIGRATION_PASS (and MIGRATION_STALLED, and a warning per assumed arc). */
  async #decide(probePending: boolean): Promise<PolicyDecision> {
    this.#pending = await this.#guard.settle(this.handlers.map((h) => h.pending(true)));
    const bandwidth = this.#switchoverBandwidth();
    const decision = this.policy.evaluate({
      nowMs: performance.now(),
      pending: this.#pending,
      measuredBandwidthBytesPerSec: bandwidth.bytesPerSec,
      bandwidthMeter: bandwidth.meter,
      bandwidthCoveredMs: bandwidth.coveredMs,
      params: this.#params,
      switchoverAckRequired: this.#caps['switchover-ack'],
      // A handler that saw a REINIT it has not announced yet withdraws the ACK already.
      switchoverAcked: this.#switchoverAcked && !this.handlers.some((h) => h.initialRenewPending),
      iteration: this.#iterations,
      inTransitBytes: subtractBytes(this.#transferred, Math.max(this.#destReceivedBytes, this.#destLoadedBytes)),
      inTransitReportAgeMs: this.#destReportAtMs === null ? 0 : performance.now() - this.#destReportAtMs,
      awaitingLoadBytes: subtractBytes(this.#destReceivedBytes, this.#destLoadedBytes),
    });
    this.#expectedDowntimeMs = decision.expectedDowntimeMs;
    // Arcs a pending probe will measure are not warned of yet.
    for (const a of probePending ? [] : decision.split.unmeasured) {
      const key = `${a.device} ${a.side} ${a.arc}`;
      if (this.#assumedWarned.has(key)) continue;
      this.#assumedWarned.add(key);
      const param = assumptionParameter(a.step);
      this.#warn(`${a.device}: arc ${a.arc} (${a.side}) was never measured, probed or learned; the expected downtime assumes ${a.ms.toFixed(0)} ms (${param})`, { device: a.device, arc: a.arc, side: a.side, assumedMs: a.ms, parameter: param });
    }
    this.emitEvent('MIGRATION_PASS', {
      pass: this.#iterations,
      remainingBytes: decision.remainingBytes,
      stopcopyBytes: decision.stopcopyBytes,
      expectedDowntimeMs: decision.expectedDowntimeMs,
      bandwidthBytesPerSec: decision.bandwidthBytesPerSec,
      expectedDowntime: decision.split,
      downtimeLimitMs: decision.limitInForceMs,
      // Why this pass did or did not switch over (what a stuck migration waits for).
      reason: decision.reason,
    });
    if (decision.stalledNow) {
      const ceiling = this.#params['x-downtime-limit-ceiling'];
      const suggested = decision.suggestedDowntimeLimitMs!;
      const message =
        decision.limitRaisedTo !== null
          ? `stalled: ${decision.split.summary}; the dynamic limit in force rises to ${decision.limitRaisedTo} ms (ceiling ${ceiling} ms)`
          : ceiling > 0 && decision.limitInForceMs >= ceiling
            ? `stalled at the dynamic limit's ceiling: ${decision.split.summary}; raise x-downtime-limit-ceiling to ${suggested} ms to converge`
            : `stalled: ${decision.split.summary}; raise downtime-limit to ${suggested} ms to converge`;
      this.emitEvent('MIGRATION_STALLED', { pass: this.#iterations, remainingBytes: decision.remainingBytes, suggestedDowntimeLimitMs: suggested, downtimeLimitMs: decision.limitInForceMs, expectedDowntime: decision.split, message });
    }
    return decision;
  }

  /** One precopy pass: each channel's sections send up to the pass's budget, the channels in parallel. */
  async #sendPass(run: SourceRun, decision: PolicyDecision): Promise<void> {
    const budget = decision.iterationBudgetBytes;
    const t = performance.now();
    const groups = this.#groupsByChannel();
    const sent = await this.#guard.settle(
      groups.map(async (idx) => {
        let n = 0;
        for (const i of idx) n += await this.handlers[i]!.savePrecopy(budget, run.outputs[i]!);
        return n;
      }),
    );
    const bytes = sumBytes(sent);
    const ms = performance.now() - t;
    // Only sends that filled the pipe say something about the link.
    // The first pass runs cold (code not yet optimized, the path starting from empty): not the path's rate.
    if (bytes >= 256 * 1024 && this.#iterations > 1) this.#bandwidth.record(bytes, ms);
    if (bytes > 0) this.#anyPass.record(bytes, ms);
    // A pass that found (almost) nothing waits out its window for dirty
    // data to build up, instead of spinning through thousands of passes.
    if (bytes < 256 * 1024 && ms < decision.idleWaitMs) await sleep(decision.idleWaitMs - ms, undefined, { signal: this.#guard.signal }).catch(() => {});
  }

  /**
   * Switchover: stop the VM; every device reaches a P2P state before any
   * device stops (the P2P rule); then stop-copy for all, in parallel, until
   * the destination says it has loaded and stopped every device. The abort
   * guard bounds it (switchover-abort), from the VM's stop on.
   */
  async #switchover(run: SourceRun, main: Channel): Promise<void> {
    this.#guard.check();
    this.#setStatus('device');
    this.#stoppedAt = performance.now();
    this.#phase = 'switchover';
    await this.vm.stop();
    this.#vmStoppedByUs = true;
    // Armed before anything is sent: a send stuck on a silent peer must not delay the bound.
    this.#armSwitchoverAbort();
    try {
      // Durations on this host's monotonic clock: the destination's wall clock may differ from ours.
      await main.writer.writeMessage(FrameType.Switchover, { abortAfterMs: this.#abortAfterMs(), sentAfterStopMs: performance.now() - this.#stoppedAt });
      await this.#guard.settle(this.handlers.map((h) => h.saveQuiesce?.(run.ctx)));
      this.#guard.check();
      await this.#guard.settle(this.handlers.map((h) => h.saveStop(run.ctx)));
      this.#guard.check();
      this.#marks.stopped = performance.now();
      const bytesAtStop = this.#transferred;
      const groups = this.#groupsByChannel();
      await this.#guard.settle(
        groups.map(async (idx) => {
          for (const i of idx) await this.handlers[i]!.saveComplete(run.outputs[i]!);
        }),
      );
      await this.#guard.settle(this.#channels.map((ch) => ch.writer.write(FrameType.EndOfStream, 0)));
      this.#marks.streamed = performance.now();
      this.#switchoverBytes = this.#transferred - bytesAtStop;
      // Two-phase end: the destination loads and stops every device, says it
      // is ready, and runs nothing until this side commits. Before the
      // commit a failure rolls back here; after it, this side never resumes
      // the VM by itself, so a lost connection cannot leave it running twice.
      await withTimeout(
        new Promise<void>((resolve, reject) => {
          this.#readyToRun = { resolve, reject };
          if (this.#guard.failure) reject(this.#guard.failure);
        }),
        READY_TIMEOUT_MS,
        `the destination did not report ready within ${READY_TIMEOUT_MS} ms of the end of the stream`,
      );
      this.#guard.check();
      this.#marks.ready = performance.now();
    } finally {
      this.#guard.disarm();
    }
  }

  /**
   * Commit: the VM belongs to the destination from the moment the Commit
   * may leave (it can arrive even if the write then fails here), unless the
   * destination says it does not run it; then its Running, with its digests.
   */
  async #commit(main: Channel): Promise<void> {
    this.#committed = true;
    this.#phase = 'committed';
    this.#marks.committed = performance.now();
    await main.writer.write(FrameType.Commit, 0);
    this.#emitSafely('MIGRATION_COMMITTED', { afterStopMs: performance.now() - this.#stoppedAt });
    const running = await withTimeout(
      new Promise<RunningMessage>((resolve, reject) => {
        this.#running = { resolve, reject };
        if (this.#guard.failure) reject(this.#guard.failure);
      }),
      RUNNING_TIMEOUT_MS,
      `the destination did not report running within ${RUNNING_TIMEOUT_MS} ms of the commit`,
    );
    this.#runningThere = true;
    this.#phase = 'done';
    this.#marks.running = performance.now();
    this.#downtimeMs = this.#marks.running - this.#stoppedAt;
    this.#exchangeWork = { readyWorkMs: running.readyWorkMs, resumeWorkMs: running.resumeWorkMs, exchangeArcsMs: running.exchangeArcsMs };
    this.#digests = this.handlers.map((h, i) => {
      const src = h.digest?.('saved') ?? null;
      const dst = running.digests[i] ?? null;
      return { section: h.describe().id, source: src, destination: dst, match: src && dst ? src === dst : null };
    });
  }

  /** The VM runs on the destination: what fails from here on is only a warning. */
  async #complete(run: SourceRun): Promise<MigrationInfo> {
    this.#checkPromise();
    // The next migration of these devices starts from the control cost seen here.
    if (this.#measured) recordControlMs(this.policy.deviceSetKey, this.#measured.controlMs);
    const cleanup = await Promise.allSettled(this.handlers.map((h) => h.saveCleanup('completed', run.finishCtx)));
    for (const r of cleanup) if (r.status === 'rejected') this.#warn(`cleanup after completion: ${describeError(r.reason).message}`);
    this.#endAt = performance.now();
    this.#setStatus('completed');
    return this.query();
  }

  /** A throw after the destination said the VM runs (only a listener or a digest can): the migration completed all the same. */
  #completedDespite(err: unknown): MigrationInfo {
    this.#warn(`after completion: ${describeError(err).message}`);
    if (!this.#endAt) this.#endAt = performance.now();
    if (this.#status !== 'completed') this.#setStatus('completed');
    return this.query();
  }

  /**
   * Rollback, the one place a failed migration ends: devices back to
   * RUNNING (reset from ERROR), then the VM resumes here; past the commit
   * (unless the destination said it runs nothing) the VM stays stopped and
   * the outcome is unknown. Returns the error migrate() rejects with.
   */
  async #rollback(run: SourceRun, err: Error): Promise<Error> {
    this.#fail(this.#guard.failure ?? err);
    // A failure seen here first (a broken pipe) is often the echo of one the
    // destination reports on the return path: give that report a moment
    // (not past the switchover-abort bound, and not when the reason is known).
    const failedCode = (this.#guard.failure as MigrationError | null)?.code;
    const known = this.#destinationError || failedCode === 'ERR_MIGRATION_SWITCHOVER_ABORTED' || failedCode === 'ERR_MIGRATION_PEER_TIMEOUT' || failedCode === 'ERR_MIGRATION_CANCELLED';
    const abortAfter = this.#vmStoppedByUs ? this.#abortAfterMs() : 0;
    const waitMs = abortAfter > 0 ? Math.min(250, Math.max(0, this.#stoppedAt + abortAfter - performance.now())) : 250;
    if (this.#returnPathDone && !known && waitMs > 0) await Promise.race([this.#returnPathDone, sleep(waitMs)]);
    let cause = this.#destinationError ?? this.#guard.failure ?? err;
    if (this.#committed && !this.#destinationNotRunning) {
      // The destination may be running the VM: resuming here could run it twice.
      cause = new MigrationError('ERR_MIGRATION_OUTCOME_UNKNOWN', `the migration failed after the source committed the VM to the destination (${describeError(cause).message}): the VM may be running there, so it stays stopped here; call resumeOnSource() once the destination is known not to run it`, { cause });
      this.#error = describeError(cause);
      this.#awaitingResume = { ctx: run.finishCtx };
      this.#endAt = performance.now();
      this.#setStatus('failed', this.#error);
      return cause;
    }
    this.#error = describeError(cause);
    if (run.setupStarted) {
      const results = await Promise.allSettled(this.handlers.map((h) => h.saveCleanup('failed', run.finishCtx)));
      for (const r of results) if (r.status === 'rejected') this.#warn(`rollback: ${describeError(r.reason).message}`);
    }
    if (this.#vmStoppedByUs && !this.vm.running) {
      await this.vm.resume();
      this.#resumedAfterMs = performance.now() - this.#stoppedAt;
    }
    this.#endAt = performance.now();
    this.#setStatus((cause as MigrationError).code === 'ERR_MIGRATION_CANCELLED' ? 'cancelled' : 'failed', this.#error);
    return cause;
  }

  /**
   * After ERR_MIGRATION_OUTCOME_UNKNOWN, once the management app knows the
   * destination does not run the VM: devices back to RUNNING (reset from
   * ERROR if needed) and the VM resumes here.
   */
  async resumeOnSource(): Promise<void> {
    const pending = this.#awaitingResume;
    if (!pending) throw new MigrationError('ERR_MIGRATION_STATE', `nothing to resume: resumeOnSource() follows an ERR_MIGRATION_OUTCOME_UNKNOWN failure (status ${this.#status})`);
    this.#awaitingResume = null;
    const results = await Promise.allSettled(this.handlers.map((h) => h.saveCleanup('failed', pending.ctx)));
    for (const r of results) if (r.status === 'rejected') this.#warn(`resume on source: ${describeError(r.reason).message}`);
    if (this.#vmStoppedByUs && !this.vm.running) {
      await this.vm.resume();
      this.#resumedAfterMs = performance.now() - this.#stoppedAt;
    }
  }

  /**
   * With switchover-abort, the downtime past which the switchover is aborted:
   * downtime-limit plus switchover-limit (a limit of 300 and 10 bounds the
   * downtime to 310 ms, as the QEMU proposal puts it). 0 = never.
   */
  #abortAfterMs(): number {
    return this.#caps['switchover-abort'] ? this.#params['downtime-limit'] + this.#params['switchover-limit'] : 0;
  }

  /** The switchover bound on this host's monotonic clock, from the VM's stop. */
  #armSwitchoverAbort(): void {
    const after = this.#abortAfterMs();
    this.#guard.armBound(this.#stoppedAt, after, (measured) => {
      // The destination's abort (or another failure) got here first: it was said already.
      if (this.#guard.failure) return;
      this.emitEvent('SWITCHOVER_ABORT', { measuredDowntimeMs: measured, abortAfterMs: after, side: 'source' });
      this.#fail(new MigrationError('ERR_MIGRATION_SWITCHOVER_ABORTED', `switchover aborted: downtime reached ${measured.toFixed(0)} ms, past downtime-limit + switchover-limit (${after} ms); the VM resumes on the source`));
    });
  }

  /**
   * The rate the stop-copy data will move at. At the switchover every channel
   * is busy and devices only stream, so what counts is what the whole path
   * (devices, both hosts' CPUs, the link) delivers when saturated: the
   * destination's arrival rate over report intervals in which bytes queued
   * behind the link at their start. A pass-level send rate also counts time
   * spent producing data, and under-states it (by 2x seen on a 2 Gbit/s
   * link). The classic policy keeps QEMU's pass-level figure.
   */
  #switchoverBandwidth(): { bytesPerSec: number; meter: 'arriving' | 'sent'; coveredMs: number } {
    // The fallback only once two passes after the first found little to send:
    // a second pass that fills the pipe is the better figure.
    const sentMeter = this.#bandwidth.bytesPerSec > 0 || this.#iterations <= 3 ? this.#bandwidth : this.#anyPass;
    const sent = { bytesPerSec: sentMeter.bytesPerSec, meter: 'sent' as const, coveredMs: sentMeter.coveredMs };
    if (this.policy.kind === 'classic') return sent;
    // Both under-state the path (one counts time spent producing data, the other
    // intervals in which the queue ran dry): the larger is the better bound,
    // if it rests on as much sending. Under max-bandwidth the queue may have
    // built up once, in pass 1: that one 11 ms sample then out-rated the
    // sent meter and, being too thin to trust, held the switchover for 40 s.
    const arriving = this.#arrival.bytesPerSec;
    const arrivalEnough = this.#arrival.coveredMs >= Math.min(sent.coveredMs, MIN_RATE_EVIDENCE_MS);
    return arriving >= sent.bytesPerSec && arrivalEnough ? { bytesPerSec: arriving, meter: 'arriving', coveredMs: this.#arrival.coveredMs } : sent;
  }

  /** The last second of reports (~100 at 10 ms). */
  #arrival = new BandwidthMeter(1000);
  #lastArrival: { atMs: number; receivedBytes: number; queuedBytes: number } | null = null;

  #recordArrival(): void {
    const now = performance.now();
    const queued = subtractBytes(this.#transferred, this.#destReceivedBytes);
    const last = this.#lastArrival;
    // Conditioned on the queue at the start only: requiring it at the end too
    // keeps just the intervals in which the path slowed down (a biased, low figure).
    if (last && last.queuedBytes >= SATURATED_QUEUE_BYTES && now - last.atMs <= MAX_ARRIVAL_INTERVAL_MS && this.#iterations > 1) this.#arrival.record(this.#destReceivedBytes - last.receivedBytes, now - last.atMs);
    this.#lastArrival = { atMs: now, receivedBytes: this.#destReceivedBytes, queuedBytes: queued };
  }

  /**
   * The switchover's control cost, measured. The end of stream -> ready
   * exchange also carries the drain of the last data, so its transit is
   * taken as the commit -> running exchange's (same messages, same hops).
   */
  #controlMs(): number {
    const w = this.#exchangeWork;
    const m = this.#marks;
    if (!w) return 0;
    const transitMs = Math.max(0, m.running - m.committed - w.resumeWorkMs);
    return saneMs(2 * transitMs + Math.max(0, w.readyWorkMs + w.resumeWorkMs - w.exchangeArcsMs));
  }

  /** The switchover as measured, in the parts the estimate has (ms), and the stop-copy rate it saw. */
  #measuredSwitchover(): MeasuredSwitchover | null {
    const m = this.#marks;
    if (!m.stopped || !m.streamed || !m.ready || !m.committed || this.#downtimeMs === null) return null;
    const dataMs = m.streamed - m.stopped;
    return {
      downtimeMs: this.#downtimeMs,
      sourceArcsMs: m.stopped - this.#stoppedAt,
      dataMs,
      // From the end of the stream to ReadyToRun: the load still queued and the resuming -> stop arc.
      destinationLoadMs: m.ready - m.streamed,
      // From the commit to Running: the destination's resume arcs and the round trip.
      destinationResumeMs: this.#stoppedAt + this.#downtimeMs - m.committed,
      controlMs: this.#controlMs(),
      stopCopyBytes: this.#switchoverBytes,
      stopCopyBytesPerSec: dataMs > 0 && this.#switchoverBytes > 0 ? (this.#switchoverBytes / dataMs) * 1000 : null,
    };
  }

  /**
   * A promise broken is always said: a downtime above the limit in force
   * becomes a MIGRATION_WARNING with each part measured against its estimate.
   * The arcs seen are already in the arc history, so the next migration of
   * the same models expects them.
   */
  #checkPromise(): void {
    const measured = this.#measuredSwitchover();
    this.#measured = measured;
    const promise = this.#promise;
    if (!measured || !promise || measured.downtimeMs <= promise.limitMs) return;
    const e = promise.split;
    const f = (v: number) => v.toFixed(0);
    const message =
      `downtime ${f(measured.downtimeMs)} ms exceeded the limit in force (${promise.limitMs} ms); expected ${promise.expectedMs === null ? 'unknown' : f(promise.expectedMs)} ms. ` +
      `measured vs expected: source arcs ${f(measured.sourceArcsMs)} vs ${f(e.sourceArcsMs)}, data ${f(measured.dataMs)} vs ${f(e.dataMs)}, ` +
      `destination load ${f(measured.destinationLoadMs)} vs ${f(e.loadMs)}, destination resume ${f(measured.destinationResumeMs)} vs ${f(e.destinationArcsMs)}` +
      (e.unmeasured.length ? `; assumed arcs: ${e.unmeasured.map((a) => `${a.device} ${a.arc}`).join(', ')}` : '');
    this.#emitSafely('MIGRATION_WARNING', { message, data: { kind: 'downtime-exceeded', limitMs: promise.limitMs, expectedMs: promise.expectedMs, expected: e, measured } });
    if (!this.#warnings.includes(message)) this.#warnings.push(message);
  }

  #measured: MeasuredSwitchover | null = null;

  /** Time from VM stop to the VM running again on the source, after an aborted or failed switchover. */
  #resumedAfterMs: number | null = null;

  #channelFor(h: StateHandler, index: number): Channel {
    // Each handler says where its data goes: the main channel, or spread over the extra ones.
    if (this.#channels.length === 1 || h.channelPlacement !== 'spread') return this.#channels[0]!;
    const spreadBefore = this.handlers.slice(0, index).filter((x) => x.channelPlacement === 'spread').length;
    return this.#channels[1 + (spreadBefore % (this.#channels.length - 1))]!;
  }

  #groupsByChannel(): number[][] {
    const groups = new Map<number, number[]>();
    this.handlers.forEach((h, i) => {
      const c = this.#channelFor(h, i).index;
      groups.set(c, [...(groups.get(c) ?? []), i]);
    });
    return [...groups.values()];
  }

  /** Where this side is, for what the destination's frames mean (protocol/end.ts). */
  #phase: SourcePhase = 'handshake';

  async #returnPath(main: Channel): Promise<void> {
    try {
      for (;;) {
        const frame = await main.reader.next();
        if (!frame) {
          if (this.#status !== 'completed') this.#fail(new MigrationError('ERR_MIGRATION_CONNECTION', 'the destination closed the connection'));
          return;
        }
        switch (sourceMeaning(this.#phase, frame.type)) {
          case 'initial-loaded':
            // Informational: the ACK that matters comes once every section is in.
            parseMessage(FrameType.InitialLoaded, frame);
            break;
          case 'alive':
            // Liveness only: the watch counts every byte that arrives.
            parseMessage(FrameType.Heartbeat, frame);
            break;
          case 'ping':
            // At once, ahead of nothing else queued: the destination times the round trip.
            if (!main.socket.writableEnded) main.socket.write(Buffer.concat(encodeFrame(FrameType.Pong, 0, messagePayload(FrameType.Pong, parseMessage(FrameType.Ping, frame)))));
            break;
          case 'report': {
            const m = parseMessage(FrameType.LoadReport, frame);
            this.#destLoadedBytes = Math.max(this.#destLoadedBytes, m.loadedBytes);
            this.#destReceivedBytes = Math.max(this.#destReceivedBytes, m.receivedBytes);
            this.#destReportAtMs = performance.now();
            this.#recordArrival();
            for (const r of m.sections) {
              if (r.section >= this.handlers.length) continue;
              this.policy.recordDestinationArcs(r.section, r.arcs); // validated with the message
              if (r.loadMsPerMiB !== null) this.policy.recordLoadRate(r.section, r.loadMsPerMiB);
            }
            break;
          }
          case 'ack': {
            const m = parseMessage(FrameType.SwitchoverAck, frame);
            // An ACK sent before the destination took the latest renewal is
            // stale (it was in flight): wait for the next one.
            if (m.renewals < this.#initialRenewals) break;
            if (m.renewals > this.#initialRenewals) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `SwitchoverAck: covers ${m.renewals} initial-data renewals, the source announced ${this.#initialRenewals}`);
            this.#switchoverAcked = true;
            this.emitEvent('SWITCHOVER_ACK', { afterMs: performance.now() - this.#t0, renewals: m.renewals });
            break;
          }
          case 'ready':
            parseMessage(FrameType.ReadyToRun, frame);
            this.#readyToRun?.resolve();
            break;
          case 'running':
            this.#running?.resolve(parseMessage(FrameType.Running, frame));
            break;
          case 'failed-before-commit':
          case 'failed-after-commit': {
            const e = parseMessage(FrameType.Error, frame);
            // Before the commit nothing ever ran there; after it, only the destination's word says so.
            if (this.#phase !== 'committed' || e.notRunning === true) this.#destinationNotRunning = true;
            // Both sides run the bound; when the destination's clock fires first, this side's
            // listeners still learn that the switchover was aborted (and by which side).
            if (e.code === 'ERR_MIGRATION_SWITCHOVER_ABORTED' && this.#phase === 'switchover' && !this.#guard.failure)
              this.#emitSafely('SWITCHOVER_ABORT', { measuredDowntimeMs: performance.now() - this.#stoppedAt, abortAfterMs: this.#abortAfterMs(), side: 'destination' });
            this.#destinationError = new MigrationError(e.code === 'ERR_MIGRATION_SWITCHOVER_ABORTED' ? 'ERR_MIGRATION_SWITCHOVER_ABORTED' : 'ERR_MIGRATION_DESTINATION', `destination failed: ${e.message}`);
            this.#fail(this.#destinationError);
            return;
          }
          case 'late':
            break;
          case 'accepted':
          case 'refused':
            // Handshake answers are read by migrate() before this loop starts.
            throw new MigrationError('ERR_MIGRATION_PROTOCOL', `a second handshake answer (${FrameType[frame.type]})`);
        }
        frame.release();
      }
    } catch (err) {
      if (!this.#guard.failure && this.#status !== 'completed') this.#fail(err as Error);
    }
  }

  /** What QEMU's query-migrate says, where it applies. */
  query(): MigrationInfo {
    const now = this.#endAt || performance.now();
    const totalTimeMs = this.#t0 ? now - this.#t0 : 0;
    const remainingBytes = sumBytes(this.#pending.map((p) => Math.max(p.precopyBytes, p.stopcopyBytes)));
    const info: MigrationInfo = {
      status: this.#status,
      totalTimeMs,
      setupTimeMs: this.#setupDoneAt ? this.#setupDoneAt - this.#t0 : 0,
      downtimeMs: this.#downtimeMs,
      expectedDowntimeMs: this.#expectedDowntimeMs === null ? null : saneMs(this.#expectedDowntimeMs),
      expectedDowntime: this.#promise?.split ?? this.policy.last?.split ?? null,
      downtimeLimitInForceMs: this.#promise?.limitMs ?? this.policy.limitInForceMs(this.#params),
      measuredSwitchover: this.#measured,
      remainingBytes: this.#status === 'completed' ? 0 : Math.min(remainingBytes, MAX_REPORTED_BYTES),
      iterations: this.#iterations,
      transferredBytes: this.#transferred,
      bandwidthBytesPerSec: this.#bandwidth.bytesPerSec,
      throughputMbps: totalTimeMs > 0 ? (this.#transferred * 8) / 1e6 / (totalTimeMs / 1000) : 0,
      bytesByKind: { ...this.#bytesByKind },
      bytesByChannel: this.#channels.map((c) => c.dataBytes),
      devices: this.handlers
        .map((h, i) => {
          const d = h.deviceInfo?.();
          const est = this.policy.last?.devices[i];
          return d && est ? { ...d, expectedSwitchover: est } : d;
        })
        .filter((d): d is DeviceInfo => !!d),
      expectedDeviceTimeMs: this.policy.last?.deviceTimeMs ?? 0,
      vmDowntimeOnAbortMs: this.#resumedAfterMs,
      stalled: this.policy.stalled,
      suggestedDowntimeLimitMs: this.policy.suggestedDowntimeLimitMs,
      switchoverAcked: this.#switchoverAcked,
      warnings: [...this.#warnings],
    };
    if (this.#error) info.error = this.#error;
    if (this.#digests) info.digests = this.#digests;
    return info;
  }
}
