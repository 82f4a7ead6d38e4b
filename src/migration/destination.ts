// The destination side: accepts a migration, checks it in the handshake
// before any device changes state, loads sections as they arrive (each
// channel in parallel), then brings every device and the VM to running and
// reports back on the return path.
import type net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { MigrationEvents, type MigrationStatus } from './events.js';
import { MigrationError, describeError } from './errors.js';
import { type HandlerContext, type StateHandler, stepsCriticalMs } from './handler.js';
import { AbortGuard } from './abort-guard.js';
import type { VmControl } from './vm.js';
import { type Channel, PeerWatch, makeChannel, settleAll, withTimeout } from './channels.js';
import { type Frame, FrameType, WIRE_VERSION, encodeFrame, readFirstFrame, verifyFrame } from './wire.js';
import { type MigrationServer, formatUri, listen, parseUri, secureAccept } from './transport.js';
import { type TlsConfig, type TlsOptions, MigrationTlsError, checkChannelBinding, checkTlsOptions, loadTlsConfig, tlsNotConfigured } from './tls.js';
import { type ChannelHelloMessage, type DestinationPhase, type HelloMessage, type LoadReportMessage, type RunningMessage, destinationMeaning, isSendableArcEstimate, messagePayload, parseMessage } from './protocol/index.js';
import { DEFAULT_PARAMETERS } from './params.js';

/** Section loads one channel may have queued on the devices at once. */
const MAX_INFLIGHT_LOADS = 4;
/** Longest wait for the source's Commit after ReadyToRun (it answers at once unless gone). */
const COMMIT_TIMEOUT_MS = 30_000;
/** Shortest interval between two LoadReports while data loads. */
const LOAD_REPORT_INTERVAL_MS = 10;
/** Up to this many bytes of already-arrived data frames go to a device in one write. */
const COALESCE_BYTES = 8 << 20;
/**
 * After this side failed or finished, a connection stays open (what arrives
 * is dropped) until the source closes it, at most this long: closing first
 * would reset the connection under a source that has not yet read the
 * report (a unix socket's half-close even fails its next write at once).
 */
const LINGER_MS = 2_000;
/** Round trips measured after the handshake (the shortest counts), and their spacing. */
const PINGS = 3;
const PING_SPACING_MS = 20;
/**
 * When a channel fails (a reset, an end mid-frame), this long for the main
 * channel to give the source's reason first: a source that cancels with data
 * in flight closes its data channels at once, its Cancel queued on the main one.
 */
const REASON_GRACE_MS = 1_000;
/** Defaults of DestinationOptions. */
const HANDSHAKE_TIMEOUT_MS = 10_000;
const MAX_PENDING_CONNECTIONS = 32;
/** All first frames being read at once, bytes (each Hello is at most 1 MiB). */
const HANDSHAKE_BYTES_BUDGET = 4 << 20;

export interface DestinationOptions {
  /** TLS on every channel (x509 with client certificates, or PSK), and who may migrate here (authz): see TlsOptions. */
  tls?: TlsOptions;
  handlers: StateHandler[];
  vm: VmControl;
  /** ms a new connection has to identify itself (Hello or ChannelHello) and be taken into a migration. */
  handshakeTimeoutMs?: number;
  /** Connections not yet taken into a migration, at most; more are closed at once. */
  maxPendingConnections?: number;
}

export interface IncomingResult {
  status: MigrationStatus;
  totalTimeMs: number;
  loadMs: number;
  /** VM stop on the source to VM running here, on this host's monotonic clock (the stop estimated from the Switchover frame's arrival, see #armAbort). */
  downtimeMs: number | null;
  digests: (string | null)[];
  sectionBytes: number[];
  error?: { code: string; message: string };
}

export interface IncomingOptions {
  signal?: AbortSignal;
  /** ms to wait for all channels once the main one said hello. */
  channelTimeoutMs?: number;
}

/** A connection not yet taken into a migration. */
interface Conn {
  /** The socket frames are read from and refusals said on (TLS: once the source is verified). */
  socket: net.Socket | null;
  /** The socket holding the connection (TLS: the TLS socket from the handshake on). */
  live: net.Socket;
  closed(): void;
  /** The handshake deadline passed before the TLS handshake was through. */
  expired?: boolean;
}

/** A connection that sent a valid first frame and waits to be taken into a migration. */
interface Offer {
  socket: net.Socket;
  frame: Frame;
  /** The first frame's message, validated (a Hello or a ChannelHello, as frame.type says). */
  message: HelloMessage | ChannelHelloMessage;
  /** Taken: no longer counted as pending, its handshake deadline cleared. */
  take(): void;
}

/** One incoming migration's state, made fresh by each incoming(): nothing of one migration reaches the next. */
class IncomingRun {
  readonly t0 = performance.now();
  /** The abort guard: its first failure ends every phase, lets go of the channels and aborts ctx.signal. */
  readonly guard: AbortGuard;
  /** The handlers' context before the commit: its signal is the guard's. */
  readonly ctx: HandlerContext;
  /** The context of the hooks that finish or roll back (loadResume*, loadCleanup): its signal stays live. */
  readonly finishCtx: HandlerContext;
  channels: Channel[] = [];
  /** The source's liveness, from the handshake's answer to the commit. */
  watch: PeerWatch | null = null;
  /** Where this migration is, for what the source's frames mean (protocol/end.ts). */
  phase: DestinationPhase = 'loading';
  /** loadSetup was called: a rollback resets every handler. */
  setupStarted = false;
  /** The source committed: this side runs the VM whatever happens to the connection. */
  committed = false;
  /** Sections whose initial bytes have not loaded yet (switchover-ack waits for them). */
  initialPending = new Set<number>();
  acked = false;
  /** InitialRenewed frames taken (sections whose initial bytes started over); each ACK says how many it covers. */
  initialRenewals = 0;
  /** Half the shortest round trip measured on the main channel (null: none measured). */
  oneWayMs: number | null = null;
  /** Pings sent and not answered yet: seq -> performance.now() at the send. */
  pings = new Map<number, number>();
  /** Section payload bytes received, per section (filled once data flows). */
  sectionBytes: number[] = [];
  /** Section bytes the devices have finished loading (the source subtracts them from what it sent). */
  loadedBytes = 0;
  /** The source's VM stop on this host's monotonic clock, from the Switchover frame (0 before it). */
  sourceStoppedAt = 0;
  /** The switchover bound the source sent (ms after its stop), and whether an abort of it was said here. */
  abortAfterMs = 0;
  abortSaid = false;
  loadStart = 0;
  loadEnd = 0;
  /** When ReadyToRun left, and when the Commit arrived (performance.now()): the destination's work in the two exchanges. */
  readySentAt = 0;
  commitAt = 0;

  constructor(context: (signal: AbortSignal) => HandlerContext, teardown: (run: IncomingRun, err: Error) => void) {
    this.guard = new AbortGuard((err) => teardown(this, err));
    this.ctx = context(this.guard.signal);
    this.finishCtx = context(new AbortController().signal);
  }
}

export class MigrationDestination extends MigrationEvents {
  readonly handlers: StateHandler[];
  readonly vm: VmControl;
  readonly handshakeTimeoutMs: number;
  readonly maxPendingConnections: number;
  #server: MigrationServer | null = null;
  #status: MigrationStatus = 'none';
  #sockets = new Set<net.Socket>();
  /** Connections not yet taken into a migration (reading their first frame, or parked). */
  #pendingConnections = 0;
  #handshakeBytes = 0;
  /** Sockets closing after their migration: close() waits for them (bounded by LINGER_MS). */
  #lingering = new Map<net.Socket, Promise<void>>();
  /** A Hello that came while no incoming() waited (at most one; more are told busy). */
  #parkedHello: Offer | null = null;
  /** ChannelHellos that came before their Hello (their deadline still runs). */
  #parkedChannels: Offer[] = [];
  #helloWaiter: ((o: Offer) => void) | null = null;
  /** The migration being set up or run; its extra channels are matched against it. */
  #session: { migrationId: string; offer: ((o: Offer) => void) | null; run: IncomingRun } | null = null;
  #running = false;
  uri: string | null = null;

  /** The TLS options (credentials are read by listen()); null: plaintext. */
  readonly tls: TlsOptions | null;
  #tls: TlsConfig | null = null;

  constructor(options: DestinationOptions) {
    super();
    if (!Array.isArray(options.handlers) || options.handlers.length === 0) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', 'a migration needs at least one state handler');
    this.handlers = options.handlers;
    this.vm = options.vm;
    const positive = (name: string, v: unknown, dflt: number) => {
      if (v === undefined) return dflt;
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `${name} must be a positive integer, got ${JSON.stringify(v)}`);
      return v;
    };
    this.handshakeTimeoutMs = positive('handshakeTimeoutMs', options.handshakeTimeoutMs, HANDSHAKE_TIMEOUT_MS);
    this.maxPendingConnections = positive('maxPendingConnections', options.maxPendingConnections, MAX_PENDING_CONNECTIONS);
    this.tls = options.tls === undefined ? null : checkTlsOptions(options.tls, 'destination');
  }

  get status(): MigrationStatus {
    return this.#status;
  }

  /** Connections that have not been taken into a migration yet (for monitoring and tests). */
  get pendingConnections(): number {
    return this.#pendingConnections;
  }

  /**
   * Starts listening; returns the bound URI (tcp port 0 picks a free port).
   * From here every connection is served at once, whatever the others do:
   * it must identify itself within handshakeTimeoutMs; a bad first frame
   * gets a typed Error frame and costs that connection only.
   */
  async listen(uri: string): Promise<string> {
    const parsed = parseUri(uri);
    if (this.tls) this.#tls = await loadTlsConfig(this.tls, 'destination');
    const { server, uri: bound } = await listen(parsed, { tls: !!this.#tls });
    this.#server = server;
    server.on('accepted', (s: net.Socket) => this.#onAccepted(s));
    this.uri = formatUri(bound);
    return this.uri;
  }

  #setStatus(status: MigrationStatus, reason?: { code: string; message: string }): void {
    this.#status = status;
    this.emitEvent('MIGRATION', reason ? { status, reason } : { status });
  }

  // ---- connections before a migration takes them ----

  #onAccepted(s: net.Socket): void {
    this.#sockets.add(s);
    s.on('close', () => this.#sockets.delete(s));
    // Failures surface through the reads and writes that see them.
    s.on('error', () => {});
    if (this.#pendingConnections >= this.maxPendingConnections) {
      s.destroy();
      return;
    }
    this.#pendingConnections++;
    let counted = true;
    const uncount = () => {
      if (!counted) return;
      counted = false;
      this.#pendingConnections--;
      clearTimeout(deadline);
    };
    // With TLS, `socket` is the TLS socket once the source is verified (none can be told anything mid-handshake);
    // `live` is the socket that holds the connection (the TLS one from the handshake on).
    const conn: Conn = {
      socket: this.#tls ? null : s,
      live: s,
      closed: () => {
        uncount();
        if (conn.socket) this.#unpark(conn.socket);
      },
    };
    const deadline = setTimeout(() => {
      if (!conn.socket) {
        conn.expired = true;
        return conn.live.destroy();
      }
      this.#unpark(conn.socket);
      this.#refuse(conn.socket, new MigrationError('ERR_MIGRATION_PROTOCOL', `no migration took this connection within the ${this.handshakeTimeoutMs} ms handshake deadline`));
    }, this.handshakeTimeoutMs);
    deadline.unref();
    s.once('close', () => {
      // A socket that handed its connection to a TLS one is no longer it.
      if (conn.live === s) conn.closed();
    });
    void this.#identify(s, uncount, conn);
  }

  /** TLS: the source's handshake, verification and authorization, before any frame of it is read. */
  async #secure(raw: net.Socket, conn: Conn): Promise<net.Socket> {
    const s = await secureAccept(raw, this.#tls!, (t) => {
      // The TLS socket holds the connection from now on (counted, closed by close(), its end the connection's):
      // destroying the raw one under it would cut what it still sends.
      conn.live = t;
      this.#sockets.delete(raw);
      this.#sockets.add(t);
      t.on('error', () => {});
      t.once('close', () => {
        this.#sockets.delete(t);
        conn.closed();
      });
    });
    conn.socket = s;
    return s;
  }

  async #identify(raw: net.Socket, take: () => void, conn: Conn): Promise<void> {
    let frame: Frame;
    let message: HelloMessage | ChannelHelloMessage;
    let s = raw;
    try {
      if (this.#tls) s = await this.#secure(raw, conn);
      frame = await readFirstFrame(s, {
        reserve: (bytes) => {
          if (this.#handshakeBytes + bytes > HANDSHAKE_BYTES_BUDGET) return false;
          this.#handshakeBytes += bytes;
          return true;
        },
        unreserve: (bytes) => (this.#handshakeBytes -= bytes),
      });
      message = frame.type === FrameType.Hello ? parseMessage(FrameType.Hello, frame) : parseMessage(FrameType.ChannelHello, frame);
    } catch (err) {
      const on = (err as MigrationTlsError).socket;
      if (this.#tls && s === raw && !on) {
        // Nothing can be said on a failed handshake: closed, reported here.
        raw.destroy();
        this.#reportRefusal(conn.expired ? new MigrationTlsError('handshake', `no TLS handshake completed within the ${this.handshakeTimeoutMs} ms handshake deadline`) : err);
        return;
      }
      this.#refuse(on ?? s, this.#explainFirstFrameError(err, s !== raw));
      return;
    }
    if (s.destroyed) return;
    const offer: Offer = { socket: s, frame, message, take };
    if (frame.type === FrameType.Hello) this.#offerHello(offer);
    else this.#offerChannel(offer);
  }

  /** A first-frame failure in TLS terms where it has some: a TLS client at a plaintext destination, a TLS source gone without a word. */
  #explainFirstFrameError(err: unknown, secured: boolean): unknown {
    const e = err as MigrationError;
    // A TLS record starts 0x16 0x03: its first four bytes read as magic 0x1603....
    if (!this.#tls && e?.code === 'ERR_MIGRATION_PROTOCOL' && /magic 0x1603/.test(e.message)) return tlsNotConfigured();
    if (secured && e?.code === 'ERR_MIGRATION_CONNECTION')
      return new MigrationTlsError('peer-refused', `the source closed the TLS connection before its first frame: it refused this destination (its certificate's CA, dates or hostname: see the source's error)`);
    return err;
  }

  /** Every connection refused before a migration took it, with its typed reason (CONNECTION_REFUSED). */
  #reportRefusal(err: unknown): void {
    try {
      this.emitEvent('CONNECTION_REFUSED', describeError(err));
    } catch {
      // A throwing listener changes nothing for the connection.
    }
  }

  /** Says why in an Error frame (a typed code) and closes: this connection only. */
  #refuse(s: net.Socket, err: unknown): void {
    this.#reportRefusal(err);
    if (s.destroyed) return;
    const e = describeError(err);
    try {
      s.end(Buffer.concat(encodeFrame(FrameType.Error, 0, messagePayload(FrameType.Error, { code: e.code.slice(0, 64), message: e.message.slice(0, 65536), notRunning: true, ...(e.reason ? { reason: e.reason } : {}) }))));
    } catch {
      // A socket that cannot take the report is closed all the same.
    }
    setTimeout(() => s.destroy(), 1000).unref();
  }

  #unpark(s: net.Socket): void {
    if (this.#parkedHello?.socket === s) this.#parkedHello = null;
    this.#parkedChannels = this.#parkedChannels.filter((o) => o.socket !== s);
  }

  #offerHello(o: Offer): void {
    if (this.#session) return this.#refuse(o.socket, new MigrationError('ERR_MIGRATION_BUSY', 'the destination is running another migration'));
    const waiter = this.#helloWaiter;
    if (waiter) {
      this.#helloWaiter = null;
      return waiter(o);
    }
    if (this.#parkedHello) return this.#refuse(o.socket, new MigrationError('ERR_MIGRATION_BUSY', 'another source is about to migrate to this destination'));
    // Between two migrations: the next incoming() takes it (its deadline runs meanwhile).
    this.#parkedHello = o;
  }

  #offerChannel(o: Offer): void {
    const m = o.message as ChannelHelloMessage;
    const session = this.#session;
    if (session && session.migrationId === m.migrationId) {
      if (session.offer) return session.offer(o);
      return this.#refuse(o.socket, this.#unbound(o, session.run.channels[0]) ?? new MigrationError('ERR_MIGRATION_PROTOCOL', `migration ${m.migrationId} takes no more channels`));
    }
    // Its Hello may still be on its way: kept (paused, within the pending
    // cap) until a migration with its id takes it or its deadline passes.
    this.#parkedChannels.push(o);
  }

  /** The next Hello: a parked one, or the next to arrive. */
  #nextHello(signal?: AbortSignal): Promise<Offer> {
    const parked = this.#parkedHello;
    if (parked) {
      this.#parkedHello = null;
      return Promise.resolve(parked);
    }
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        this.#helloWaiter = null;
        // The reason alone, as for a cancel during a migration.
        reject(new MigrationError('ERR_MIGRATION_CANCELLED', String(signal?.reason ?? 'cancelled while waiting for a source')));
      };
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#closeWaiter = () => {
        signal?.removeEventListener('abort', onAbort);
        reject(new MigrationError('ERR_MIGRATION_CANCELLED', 'the destination was closed'));
      };
      this.#helloWaiter = (o) => {
        this.#closeWaiter = null;
        signal?.removeEventListener('abort', onAbort);
        resolve(o);
      };
    });
  }
  #closeWaiter: (() => void) | null = null;

  // ---- one migration ----

  /** A handler context: `signal` is the abort guard's before the commit, a live one where hooks finish or roll back. */
  #context(signal: AbortSignal): HandlerContext {
    return {
      signal,
      emit: (event, data) => this.emitEvent(event, data),
      warn: (message, data) => this.emitEvent('MIGRATION_WARNING', data ? { message, data } : { message }),
    };
  }

  /** At a migration's first failure (its abort guard's teardown): every channel let go. */
  #teardown(run: IncomingRun, err: Error): void {
    run.watch?.stop();
    // A silent source gets no linger: nothing it sends will arrive.
    const silent = (err as MigrationError).code === 'ERR_MIGRATION_PEER_TIMEOUT';
    for (const ch of run.channels) if (ch) this.#release(ch, silent);
  }

  /** Done with a channel: dropped at once, or (after what was said last) kept open, unread, until the source closes it. */
  #release(ch: Channel, destroy: boolean): void {
    const s = ch.socket;
    if (s.destroyed || this.#lingering.has(s)) return;
    if (destroy) {
      s.destroy();
      return;
    }
    ch.reader.discard();
    this.#lingering.set(
      s,
      new Promise<void>((resolve) => {
        const timer = setTimeout(() => s.destroy(), LINGER_MS);
        timer.unref();
        s.once('end', () => s.destroy());
        s.once('close', () => {
          clearTimeout(timer);
          this.#lingering.delete(s);
          resolve();
        });
      }),
    );
  }

  /**
   * Accepts and runs one incoming migration: waits for a source's Hello
   * (strangers, malformed connections and a second source meanwhile cost
   * only their own connection), runs it, and resolves with the result; a
   * failure rejects with the error (its `result` says more). Call it again
   * for the next migration, or use serve().
   */
  async incoming(options: IncomingOptions = {}): Promise<IncomingResult> {
    if (!this.#server) throw new MigrationError('ERR_MIGRATION_STATE', 'call listen() before incoming()');
    if (this.#running) throw new MigrationError('ERR_MIGRATION_STATE', `a migration is already running here (status ${this.#status})`);
    this.#running = true;
    // A destination serves migration after migration: its event history is
    // this migration's (kept whole, it would grow with every one served).
    this.history.length = 0;
    this.#status = 'none';
    try {
      const offer = await this.#nextHello(options.signal);
      return await this.#run(offer, options);
    } finally {
      this.#session = null;
      this.#running = false;
    }
  }

  /**
   * Serves migrations one after the other until close() (or the signal):
   * yields each one's result, failed ones included (with `error`). After a
   * failure before the commit the devices are reset and the next source is
   * served.
   */
  async *serve(options: IncomingOptions = {}): AsyncGenerator<IncomingResult, void, undefined> {
    while (this.#server && !options.signal?.aborted) {
      try {
        yield await this.incoming(options);
      } catch (err) {
        const result = (err as { result?: IncomingResult }).result;
        if (!this.#server || options.signal?.aborted || !result) return;
        yield result;
      }
    }
  }

  /** One migration, phase by phase; a failure ends in #rollback. */
  async #run(offer: Offer, options: IncomingOptions): Promise<IncomingResult> {
    const run = new IncomingRun((signal) => this.#context(signal), (r, err) => this.#teardown(r, err));
    const onAbort = () => run.guard.fail(new MigrationError('ERR_MIGRATION_CANCELLED', String(options.signal?.reason ?? 'aborted')));
    options.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      offer.take();
      const hello = offer.message as HelloMessage;
      const main = await this.#handshake(run, offer, hello, options.channelTimeoutMs ?? 10_000);
      await this.#setup(run, main, hello);
      await this.#load(run, main, hello);
      await this.#switchover(run, main);
      await this.#commit(run);
      // The VM runs here now: nothing after this may stop it (the source gave
      // it up), so what still fails is only a warning.
      return await this.#complete(run, main);
    } catch (err) {
      throw await this.#rollback(run, err as Error);
    } finally {
      run.watch?.stop();
      options.signal?.removeEventListener('abort', onAbort);
      // Closed once the source has read what was said last (or after LINGER_MS).
      for (const ch of run.channels) if (ch) this.#release(ch, false);
    }
  }

  /** Handshake: the Hello checked against this side's handlers, and every channel of the migration taken. */
  async #handshake(run: IncomingRun, offer: Offer, hello: HelloMessage, channelTimeoutMs: number): Promise<Channel> {
    this.#session = { migrationId: hello.migrationId, offer: null, run };
    const main = makeChannel(0, offer.socket, { deferDataChecksums: true });
    run.channels[0] = main;
    this.#setStatus('setup');
    const mismatch = this.#compatibility(hello);
    if (mismatch) throw new MigrationError('ERR_MIGRATION_INCOMPATIBLE', mismatch);
    await this.#acceptChannels(run, hello, channelTimeoutMs);
    return main;
  }

  /** Setup: every device to resuming, then the handshake's answer, the round trips and the liveness watch. */
  async #setup(run: IncomingRun, main: Channel, hello: HelloMessage): Promise<void> {
    run.setupStarted = true;
    await run.guard.settle(this.handlers.map((h) => h.loadSetup(run.ctx, { probeArcs: hello.capabilities['x-probe-switchover-arcs'] })));
    run.guard.check();
    // Every device with initial bytes must load them before the source may switch over.
    this.handlers.forEach((h, i) => {
      if (h.hasInitialData?.()) run.initialPending.add(i);
    });
    await main.writer.writeMessage(FrameType.HelloAck, { wireVersion: WIRE_VERSION });
    // Round trips on the main channel while it is still quiet: half the
    // shortest is the one-way delay the switchover-abort clock takes off.
    this.#pingMain(run, main);
    // From here the source sends heartbeats too: a silent one is stopped or cut off.
    const peerTimeoutMs = hello.parameters['peer-timeout'] ?? DEFAULT_PARAMETERS['peer-timeout'];
    run.watch = new PeerWatch({
      timeoutMs: peerTimeoutMs,
      readers: () => run.channels.map((ch) => ch?.reader),
      writer: main.writer,
      onSilent: (silentMs) => {
        if (run.committed) return;
        run.guard.fail(new MigrationError('ERR_MIGRATION_PEER_TIMEOUT', `the source sent nothing for ${silentMs.toFixed(0)} ms (peer-timeout ${peerTimeoutMs} ms): it is stopped or cut off; the VM stays with the source`));
      },
    });
    run.watch.start();
    await this.#sendLoadReport(run, main);
    this.#setStatus('active');
    if (hello.capabilities['switchover-ack'] && run.initialPending.size === 0) await this.#sendAck(run, main);
  }

  /** Load: every channel's sections loaded as they arrive, up to each channel's end of stream (the Switchover frame comes on the way). */
  async #load(run: IncomingRun, main: Channel, hello: HelloMessage): Promise<void> {
    run.loadStart = performance.now();
    // Tell the source how far arrival and loading got, every 10 ms while
    // either moves: also while a slow load holds everything up (arrivals
    // still count), and no more often (per-MiB reports cost a fast link dearly).
    let reported = { received: -1, loaded: -1 };
    const reporter = setInterval(() => {
      const received = run.channels.reduce((n, ch) => n + (ch ? ch.reader.bytesArrived : 0), 0);
      if (received === reported.received && run.loadedBytes === reported.loaded) return;
      reported = { received, loaded: run.loadedBytes };
      void this.#sendLoadReport(run, main).catch(() => {});
    }, LOAD_REPORT_INTERVAL_MS);
    try {
      // One channel's failure (a corrupt frame) fails the migration at once:
      // the main channel's loop would otherwise wait for frames that a source
      // held up by the switchover ACK never sends (its heartbeats keep it alive).
      const loops = run.channels.map((ch) => this.#channelLoop(run, ch, hello));
      await settleAll(
        loops.map((loop, i) =>
          loop.catch(async (err: Error) => {
            // A data channel that reset or ended mid-stream: a source that
            // cancels with data in flight closes them at once and queues its
            // Cancel on the main channel, so its word is waited for (briefly)
            // before the connection is blamed.
            if (i > 0 && (err as MigrationError).code === 'ERR_MIGRATION_CONNECTION' && !run.guard.failure) {
              const said = await Promise.race([loops[0]!.then(() => null, (e: Error) => e), sleep(REASON_GRACE_MS, null, { ref: false })]);
              const code = (said as MigrationError | null)?.code;
              if (code === 'ERR_MIGRATION_CANCELLED' || code === 'ERR_MIGRATION_SWITCHOVER_ABORTED') err = said!;
            }
            run.guard.fail(err);
            throw err;
          }),
        ),
      );
    } finally {
      clearInterval(reporter);
    }
    run.loadEnd = performance.now();
    run.guard.check();
  }

  /**
   * Switchover: everything arrived; every device validated and stopped,
   * then ReadyToRun and the source's Commit (until then the source may
   * still resume the VM itself, and the abort guard's bound stops here).
   */
  async #switchover(run: IncomingRun, main: Channel): Promise<void> {
    await run.guard.settle(this.handlers.map((h) => h.loadFinish(run.ctx)));
    run.guard.check();
    await this.#awaitCommit(run, main);
    run.watch?.stop();
  }

  /** Commit: RUNNING_P2P for all before any device runs (the P2P rule), then the VM. Nothing cancels it. */
  async #commit(run: IncomingRun): Promise<void> {
    await settleAll(this.handlers.map((h) => h.loadResumeP2P?.(run.finishCtx)));
    await settleAll(this.handlers.map((h) => h.loadResume?.(run.finishCtx)));
    await this.vm.resume();
  }

  /**
   * Rollback, the one place a failed migration ends: the source is told why
   * (before the connections go) and the devices reset; past the commit the
   * VM is stopped first, so that the source may resume it. Returns the error
   * incoming() rejects with, its `result` attached.
   */
  async #rollback(run: IncomingRun, err: Error): Promise<Error> {
    const cause = run.guard.failure ?? err;
    run.guard.disarm();
    // The source's clock reached the bound first: its abort is said here too.
    if ((cause as MigrationError).code === 'ERR_MIGRATION_SWITCHOVER_ABORTED' && !run.abortSaid && run.sourceStoppedAt) {
      run.abortSaid = true;
      try {
        this.emitEvent('SWITCHOVER_ABORT', { measuredDowntimeMs: performance.now() - run.sourceStoppedAt, abortAfterMs: run.abortAfterMs, side: 'source' });
      } catch {
        // A throwing listener changes nothing in the rollback.
      }
    }
    const main = run.channels[0];
    // `notRunning`: the source may resume the VM. True before this side's
    // commit (nothing ever ran here, even if this crosses the source's
    // Commit); after it, only once the VM is stopped and the devices reset.
    const tellSource = async () => {
      if (main && !main.socket.destroyed) await main.writer.writeMessage(FrameType.Error, errorMessage(cause)).catch(() => {});
      run.guard.fail(cause);
    };
    const stopHere = async () => {
      if (this.vm.running) await this.vm.stop();
      await Promise.allSettled(this.handlers.map((h) => h.loadCleanup?.('failed', run.finishCtx)));
    };
    if (run.committed) {
      await stopHere();
      await tellSource();
    } else {
      // Tell the source why before the connections go.
      await tellSource();
      if (run.setupStarted) await stopHere();
    }
    const error = describeError(cause);
    this.#setStatus((cause as MigrationError).code === 'ERR_MIGRATION_CANCELLED' ? 'cancelled' : 'failed', error);
    const e = cause as Error & { result?: IncomingResult };
    e.result = { status: this.#status, totalTimeMs: performance.now() - run.t0, loadMs: run.loadEnd ? run.loadEnd - run.loadStart : 0, downtimeMs: null, digests: [], sectionBytes: run.sectionBytes, error };
    return cause;
  }

  /** After the VM resumed here: report, clean up; failures are warnings (the VM keeps running). */
  async #complete(run: IncomingRun, main: Channel): Promise<IncomingResult> {
    const warn = (what: string, err: unknown) => {
      try {
        this.emitEvent('MIGRATION_WARNING', { message: `${what} after the VM started here: ${describeError(err).message}` });
      } catch {
        // A throwing listener changes nothing here.
      }
    };
    const downtimeMs = run.sourceStoppedAt ? performance.now() - run.sourceStoppedAt : null;
    const digests = this.handlers.map((h) => {
      try {
        return h.digest?.('loaded') ?? null;
      } catch (err) {
        warn('digest', err);
        return null;
      }
    });
    const now = performance.now();
    const resumeArcs = this.handlers.map((h) => h.resumeArcs?.().filter((a) => a.basis === 'measured') ?? []);
    const running: RunningMessage = {
      digests,
      loadMs: run.loadEnd - run.loadStart,
      resumeMs: now - run.loadEnd,
      readyWorkMs: Math.max(0, run.readySentAt - run.loadEnd),
      resumeWorkMs: Math.max(0, now - run.commitAt),
      exchangeArcsMs: stepsCriticalMs(resumeArcs, ['finish', 'resume-p2p', 'resume']),
    };
    // Whether or not the source hears of it.
    await main.writer.writeMessage(FrameType.Running, running).catch(() => {});
    try {
      this.#setStatus('completed');
    } catch (err) {
      warn('a MIGRATION listener', err);
    }
    const cleanup = await Promise.allSettled(this.handlers.map((h) => h.loadCleanup?.('completed', run.finishCtx)));
    for (const r of cleanup) if (r.status === 'rejected') warn('cleanup', r.reason);
    return { status: 'completed', totalTimeMs: performance.now() - run.t0, loadMs: run.loadEnd - run.loadStart, downtimeMs, digests, sectionBytes: run.sectionBytes };
  }

  /** Tells the source what this side's devices need at switchover (for its downtime estimate). */
  async #sendLoadReport(run: IncomingRun, main: Channel): Promise<void> {
    const sections: LoadReportMessage['sections'] = [];
    this.handlers.forEach((h, section) => {
      if (!h.resumeArcs) return;
      // Only what the message may carry: a handler's glitch must not fail the migration here.
      const loadMsPerMiB = h.loadMsPerMiB?.() ?? null;
      const arcs = (h.reportArcs?.() ?? h.resumeArcs()).filter(isSendableArcEstimate).slice(0, 64);
      sections.push({ section, arcs, loadMsPerMiB: loadMsPerMiB !== null && Number.isFinite(loadMsPerMiB) && loadMsPerMiB >= 0 ? loadMsPerMiB : null });
    });
    // Arrived counts what sits in this side's buffers too: it has crossed the link.
    const receivedBytes = run.channels.reduce((n, ch) => n + (ch ? ch.reader.bytesArrived : 0), 0);
    await main.writer.writeMessage(FrameType.LoadReport, { sections, receivedBytes, loadedBytes: run.loadedBytes });
  }

  /** Says every device is loaded and stopped, and waits for the source's Commit. */
  async #awaitCommit(run: IncomingRun, main: Channel): Promise<void> {
    // From here the source decides: it aborts (and says so) or commits.
    run.guard.disarm();
    run.phase = 'ready';
    run.readySentAt = performance.now();
    await main.writer.write(FrameType.ReadyToRun, 0);
    // A source that never answers (gone without a FIN) must not keep this side waiting forever.
    const nextControl = async () => {
      for (;;) {
        const f = await main.reader.next();
        if (!f) return f;
        const meaning = destinationMeaning(run.phase, f.type);
        if (meaning === 'commit') {
          parseMessage(FrameType.Commit, f);
          return meaning;
        }
        if (meaning === 'cancelled') throw sourceGaveUp(f);
        if (meaning === 'pong') this.#onPong(run, parseMessage(FrameType.Pong, f).seq);
        else parseMessage(FrameType.Heartbeat, f);
        f.release();
      }
    };
    const answer = await withTimeout(nextControl(), COMMIT_TIMEOUT_MS, `no commit from the source within ${COMMIT_TIMEOUT_MS} ms: the VM stays with the source`);
    if (!answer) throw run.guard.failure ?? new MigrationError('ERR_MIGRATION_CONNECTION', 'the source went away before committing: the VM stays with the source');
    run.committed = true;
    run.commitAt = performance.now();
    run.phase = 'committed';
  }

  /** A few pings, spaced so that each goes out alone; answers go to #onPong. */
  #pingMain(run: IncomingRun, main: Channel): void {
    for (let seq = 0; seq < PINGS; seq++) {
      const timer = setTimeout(() => {
        if (main.socket.destroyed || run.phase !== 'loading') return;
        run.pings.set(seq, performance.now());
        void main.writer.writeMessage(FrameType.Ping, { seq }).catch(() => {});
      }, seq * PING_SPACING_MS);
      timer.unref();
    }
  }

  #onPong(run: IncomingRun, seq: number): void {
    const sentAt = run.pings.get(seq);
    if (sentAt === undefined) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `a Pong for ping ${seq}, which was not sent or was answered already`);
    run.pings.delete(seq);
    const oneWayMs = (performance.now() - sentAt) / 2;
    run.oneWayMs = run.oneWayMs === null ? oneWayMs : Math.min(run.oneWayMs, oneWayMs);
  }

  async #sendAck(run: IncomingRun, main: Channel): Promise<void> {
    if (run.acked) return;
    run.acked = true;
    await main.writer.writeMessage(FrameType.SwitchoverAck, { renewals: run.initialRenewals });
  }

  #compatibility(hello: HelloMessage): string | null {
    if (hello.wireVersion !== WIRE_VERSION) return `wire version ${hello.wireVersion} is not ${WIRE_VERSION}`;
    if (!Array.isArray(hello.sections)) return 'the hello lists no sections';
    if (hello.sections.length !== this.handlers.length) return `the source has ${hello.sections.length} sections, the destination ${this.handlers.length}`;
    for (let i = 0; i < this.handlers.length; i++) {
      const mine = this.handlers[i]!.describe();
      const theirs = hello.sections[i]!;
      if (theirs.kind !== mine.kind || theirs.compat !== mine.compat)
        return `section ${i} (${theirs.id}) is ${theirs.kind} "${theirs.compat}" on the source but ${mine.kind} "${mine.compat}" here (${mine.id})`;
    }
    if (!Number.isInteger(hello.channels) || hello.channels < 1 || hello.channels > 64) return `bad channel count ${hello.channels}`;
    return null;
  }

  /**
   * Over TLS, an extra channel must prove it comes from the source of the
   * main channel (channel binding): the migration id it names is no secret
   * from another authorized client. null when it does (or without TLS).
   */
  #unbound(o: Offer, main: Channel | undefined): MigrationTlsError | null {
    if (!this.#tls || !main) return null;
    const m = o.message as ChannelHelloMessage & { binding?: string };
    return checkChannelBinding(main.socket, o.socket, m.index, m.binding);
  }

  /** Takes the extra channels of this migration (ChannelHellos with its id, each index once) until all are in. */
  async #acceptChannels(run: IncomingRun, hello: HelloMessage, timeoutMs: number): Promise<void> {
    const session = this.#session!;
    let missing = hello.channels - 1;
    let done: (() => void) | null = null;
    const adopt = (o: Offer) => {
      const m = o.message as ChannelHelloMessage;
      const unbound = this.#unbound(o, run.channels[0]);
      if (unbound) return this.#refuse(o.socket, unbound);
      if (m.index >= hello.channels || run.channels[m.index]) {
        this.#refuse(o.socket, new MigrationError('ERR_MIGRATION_PROTOCOL', `migration ${m.migrationId} has no free channel ${m.index} (it has ${hello.channels})`));
        return;
      }
      o.take();
      run.channels[m.index] = makeChannel(m.index, o.socket, { deferDataChecksums: true });
      if (--missing === 0) done?.();
    };
    session.offer = adopt;
    try {
      for (const o of this.#parkedChannels.filter((p) => (p.message as ChannelHelloMessage).migrationId === hello.migrationId)) {
        this.#unpark(o.socket);
        adopt(o);
      }
      if (missing > 0)
        await withTimeout(
          new Promise<void>((resolve) => (done = resolve)),
          timeoutMs,
          `only ${hello.channels - missing} of ${hello.channels} channels connected within ${timeoutMs} ms`,
        );
    } finally {
      session.offer = null;
      done = null;
    }
  }

  async #channelLoop(run: IncomingRun, ch: Channel, hello: HelloMessage): Promise<void> {
    const main = run.channels[0]!;
    run.sectionBytes = run.sectionBytes.length ? run.sectionBytes : this.handlers.map(() => 0);
    // Loads in flight on the devices' data threads (see #loadData).
    const inflight: Promise<void>[] = [];
    const settleLoads = async () => {
      while (inflight.length) await inflight.shift();
    };
    // A frame taken while gathering data that turned out to be something else.
    let carried: Frame | null = null;
    for (;;) {
      run.guard.check();
      const frame = carried ?? (await ch.reader.next());
      carried = null;
      if (!frame) throw new MigrationError('ERR_MIGRATION_CONNECTION', `the source closed channel ${ch.index} before the end of the stream`);
      const handler = this.handlers[frame.section];
      const meaning = destinationMeaning(run.phase, frame.type);
      // The Switchover, Commit and Pong frames belong on the main channel.
      if ((meaning === 'switchover' || meaning === 'pong') && ch !== main) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `a ${FrameType[frame.type]} frame on data channel ${ch.index}`);
      switch (meaning) {
        case 'data':
          if (!handler) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `data for unknown section ${frame.section}`);
          carried = await this.#loadData(run, ch, handler, frame, inflight);
          break;
        case 'initial-sent': {
          parseMessage(FrameType.InitialSent, frame);
          if (!handler) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `initial marker for unknown section ${frame.section}`);
          // Everything before the marker has been loaded once the loads settle.
          await settleLoads();
          await handler.loadInitialDone?.();
          await main.writer.writeMessage(FrameType.InitialLoaded, { section: frame.section });
          await this.#sendLoadReport(run, main);
          run.initialPending.delete(frame.section);
          if (hello.capabilities['switchover-ack'] && run.initialPending.size === 0) await this.#sendAck(run, main);
          break;
        }
        case 'initial-renewed': {
          parseMessage(FrameType.InitialRenewed, frame);
          if (!handler?.hasInitialData?.()) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `initial-data renewal for section ${frame.section}, which has no initial data`);
          // The section's new initial bytes follow: its initial load is
          // pending again, and so is the ACK (reusable, as QEMU 11.1's).
          run.initialRenewals++;
          run.initialPending.add(frame.section);
          run.acked = false;
          break;
        }
        case 'switchover': {
          const m = parseMessage(FrameType.Switchover, frame);
          run.phase = 'switchover';
          // On this host's monotonic clock: the source's stop is this frame's
          // arrival less its time on the source and on the way (half the
          // handshake's round trip). The hosts' wall clocks never meet.
          run.sourceStoppedAt = performance.now() - (m.sentAfterStopMs + (run.oneWayMs ?? 0));
          run.abortAfterMs = m.abortAfterMs;
          this.#armSwitchoverAbort(run, m.abortAfterMs);
          break;
        }
        case 'alive':
          parseMessage(FrameType.Heartbeat, frame);
          break;
        case 'pong':
          this.#onPong(run, parseMessage(FrameType.Pong, frame).seq);
          break;
        case 'end-of-stream':
          parseMessage(FrameType.EndOfStream, frame);
          await settleLoads();
          return;
        case 'cancelled':
          throw sourceGaveUp(frame);
        case 'commit':
        case 'late':
          throw new MigrationError('ERR_MIGRATION_PROTOCOL', `unexpected ${FrameType[frame.type]} frame on channel ${ch.index}`);
      }
      // Control frames are parsed by now (data frames go once loaded, above).
      if (frame.type !== FrameType.SectionData) frame.release();
    }
  }

  /**
   * A section's data to its device: the data frames of this section already
   * here go in one write (fewer, larger loads), issued without waiting for
   * the previous one (the device's data thread runs them in order); at most
   * MAX_INFLIGHT_LOADS queued. Returns a frame taken while gathering that
   * turned out to be something else.
   */
  async #loadData(run: IncomingRun, ch: Channel, handler: StateHandler, frame: Frame, inflight: Promise<void>[]): Promise<Frame | null> {
    let carried: Frame | null = null;
    const parts = [...frame.parts];
    const frames = [frame];
    let gathered = frame.length;
    while (handler.byteStream && gathered < COALESCE_BYTES) {
      const next = ch.reader.nextIfBuffered();
      if (!next) break;
      if (next.type !== FrameType.SectionData || next.section !== frame.section) {
        carried = next;
        break;
      }
      parts.push(...next.parts);
      frames.push(next);
      gathered += next.length;
    }
    // Checked where the bytes are loaded (off the event loop) if the handler can; else here.
    let loading: Promise<void>;
    if (handler.loadChecked) {
      // An empty frame has no bytes to check on the device's thread: check it here.
      frames.filter((f) => f.parts.length === 0).forEach(verifyFrame);
      const checksums = frames.filter((f) => f.parts.length > 0).map((f) => ({ parts: f.parts.length, crc32c: f.checksum }));
      loading = handler.loadChecked(parts, checksums);
    } else {
      frames.forEach(verifyFrame);
      loading = handler.load(parts);
    }
    // Once the device has them, the bytes' memory can take new reads.
    void loading.finally(() => frames.forEach((f) => f.release())).catch(() => {});
    const load = loading.then(() => {
      run.loadedBytes += gathered;
    });
    load.catch(() => {}); // awaited by the channel loop; this only keeps it from counting as unhandled meanwhile
    inflight.push(load);
    if (inflight.length >= MAX_INFLIGHT_LOADS) await inflight.shift();
    ch.dataBytes += gathered;
    run.sectionBytes[frame.section]! += gathered;
    return carried;
  }

  /**
   * The destination measures too, on its own monotonic clock from the
   * source's stop as estimated when the Switchover frame arrived (a skewed
   * wall clock shifts nothing): past the source's threshold it aborts,
   * tells the source, and cleans up.
   */
  #armSwitchoverAbort(run: IncomingRun, abortAfterMs: number): void {
    run.guard.armBound(run.sourceStoppedAt, abortAfterMs, (measured) => {
      if (this.#status === 'completed' || run.guard.failure) return;
      run.abortSaid = true;
      this.emitEvent('SWITCHOVER_ABORT', { measuredDowntimeMs: measured, abortAfterMs, side: 'destination' });
      const err = new MigrationError('ERR_MIGRATION_SWITCHOVER_ABORTED', `switchover aborted on the destination: ${measured.toFixed(0)} ms since the source stopped, past downtime-limit + switchover-limit (${abortAfterMs} ms)`);
      const main = run.channels[0];
      const tell = main && !main.socket.destroyed ? main.writer.writeMessage(FrameType.Error, errorMessage(err)).catch(() => {}) : Promise.resolve();
      void tell.then(() => run.guard.fail(err));
    });
  }

  /**
   * Stops listening and closes every connection; a finished migration's
   * connections first get up to LINGER_MS for the source to read the last
   * report (see #release). A waiting incoming() rejects (cancelled).
   */
  async close(): Promise<void> {
    const server = this.#server;
    this.#server = null;
    this.#closeWaiter?.();
    this.#closeWaiter = null;
    this.#helloWaiter = null;
    for (const s of this.#sockets) if (!this.#lingering.has(s)) s.destroy();
    await Promise.all([...this.#lingering.values()]);
    await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  }
}

/** The source's Cancel: a switchover it aborted keeps that code; anything else is a cancel. */
function sourceGaveUp(frame: Frame): MigrationError {
  const m = parseMessage(FrameType.Cancel, frame);
  const reason = m.reason || 'no reason given';
  if (m.code === 'ERR_MIGRATION_SWITCHOVER_ABORTED') return new MigrationError('ERR_MIGRATION_SWITCHOVER_ABORTED', `the source aborted the switchover: ${reason}`);
  return new MigrationError('ERR_MIGRATION_CANCELLED', `the source cancelled: ${reason}`);
}

/** This side's failure as the source reads it: nothing runs here. */
function errorMessage(err: unknown): { code: string; message: string; notRunning: boolean } {
  const e = describeError(err);
  return { code: e.code.slice(0, 64), message: e.message.slice(0, 65536), notRunning: true };
}
