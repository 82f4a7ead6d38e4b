// Migration URIs and their sockets: tcp:host:port and unix:path, as QEMU spells them.
import { closeSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { native } from '../vfio/native.js';
import { MigrationError } from './errors.js';
import { type TlsConfig, MigrationTlsError, clientTlsOptions, expectedHostname, looksLikeTls, serverTlsOptions, tlsHandshakeError, verifyClient, verifyServer } from './tls.js';

const SOCKET_BUFFER_BYTES = 8 << 20;
/** Incoming bytes land in slabs of this size, each read filling what is left of one. */
const SLAB_BYTES = 4 << 20;
/** A slab with less room than this is retired (its chunks stay valid) for a fresh one. */
const MIN_READ_BYTES = 256 << 10;
/** TLS reads are handed to the reader in chunks of up to this many bytes (see slabReads). */
const COALESCE_BYTES = 1 << 20;
/** Idle slabs kept for reuse (all connections together). */
const MAX_FREE_SLABS = 16;

/**
 * An accepted connection whose reads land in slabs this module owns: chunks
 * go to one sink (a FrameReader) rather than through 'data' events.
 */
export const directChunks = Symbol('vfio-migration.directChunks');
export interface DirectChunks {
  /**
   * Before a reader attaches: reads exactly `bytes` into a Buffer of that
   * size and no more (a peer that has not identified itself gets no slab and
   * no stream buffer). ERR_MIGRATION_CONNECTION if the connection ends first.
   */
  readExactly(bytes: number): Promise<Buffer>;
  /** Sends every chunk, including those that arrived before, to `sink`; reads go into slabs from now on. */
  attach(sink: (chunk: Buffer) => void): void;
  /**
   * Says a consumer is done with these bytes of received chunks. A slab whose
   * every byte was released is reused for later reads, so releasing bytes
   * still in use corrupts them; bytes never released only cost garbage
   * collection (a slab is then left to the GC).
   */
  release(part: Buffer): void;
}

/**
 * Slabs are reused rather than left to the GC: V8 runs a full mark-compact
 * for every ~64 MiB of new external memory, which at GB/s is dozens per
 * second (measured: ~25% more throughput with reuse).
 */
interface SlabState {
  slab: Buffer;
  /** Bytes read into the slab. */
  filled: number;
  /** Bytes consumers released. */
  released: number;
  /** No more reads go into it. */
  retired: boolean;
}
const slabStates = new WeakMap<ArrayBufferLike, SlabState>();
const freeSlabs: Buffer[] = [];
const slabCounts = { allocated: 0, reused: 0 };

/** Slabs allocated and reused by incoming connections so far (process-wide). */
export function slabStats(): { allocated: number; reused: number; free: number } {
  return { ...slabCounts, free: freeSlabs.length };
}

function newSlab(): SlabState {
  const reused = freeSlabs.pop();
  if (reused) slabCounts.reused++;
  else slabCounts.allocated++;
  const slab = reused ?? Buffer.allocUnsafeSlow(SLAB_BYTES);
  const state: SlabState = { slab, filled: 0, released: 0, retired: false };
  slabStates.set(slab.buffer, state);
  return state;
}

function recycleIfDone(state: SlabState): void {
  if (!state.retired || state.released < state.filled) return;
  slabStates.delete(state.slab.buffer);
  if (freeSlabs.length < MAX_FREE_SLABS) freeSlabs.push(state.slab);
}

function releaseSlabBytes(part: Buffer): void {
  const state = slabStates.get(part.buffer);
  if (!state) return;
  state.released += part.length;
  recycleIfDone(state);
}

/**
 * The fd of a socket net.Server accepted, or null. Node 20 has no public way
 * to it: `net.Socket({ fd, onread })` is public, but an accepted socket's fd
 * is only on its private libuv handle (`_handle.fd`), and net.Server takes no
 * `onread`. This is where the accepted fd is read from a private Node field; it checks
 * what it finds (a non-negative integer, then a socket: see dupSocketFd), and
 * anything else (a Node that moved the field, a TLS socket) means no slab
 * reads: the connection works as Node gives it. TLS connections read into
 * slabs too, through this same fd, with more of Node's internals (see
 * tlsWithSlabReads, which checks them likewise and falls back the same way).
 */
function acceptedFd(accepted: net.Socket): number | null {
  const handle = (accepted as unknown as { _handle?: unknown })._handle;
  const fd = typeof handle === 'object' && handle !== null ? (handle as { fd?: unknown }).fd : undefined;
  return typeof fd === 'number' && Number.isInteger(fd) && fd >= 0 ? fd : null;
}

/**
 * Node gives an accepted socket a new 64 KiB Buffer per read: at GB/s that
 * is ~16,000 reads, callbacks and external allocations per GiB, and the
 * garbage collections they force. A net.Socket built with `onread` reads up
 * to a slab's free space at once into memory we own, but net.Server cannot
 * build one; so the accepted fd is duplicated into one that does, and the
 * original handle closed (the connection lives on in the duplicate). Where
 * the fd is out of reach, the socket is used as it is.
 */
function withSlabReads(accepted: net.Socket): net.Socket {
  const fd = acceptedFd(accepted);
  let copy: number;
  try {
    if (fd === null) throw new Error('no fd');
    // ENOTSOCK or EBADF if the number is not this connection's socket after all.
    copy = native.dupSocketFd(fd);
  } catch {
    // Paused (pauseOnConnect) until a reader attaches: its 'data' listener starts the reads.
    return accepted;
  }
  const reads = slabReads(1);
  let socket: net.Socket;
  try {
    socket = new net.Socket({ fd: copy, readable: true, writable: true, highWaterMark: SOCKET_BUFFER_BYTES, onread: reads.onread } as net.SocketConstructorOpts);
  } catch {
    closeSync(copy);
    return accepted;
  }
  accepted.destroy();
  socket.setNoDelay(true);
  reads.install(socket);
  return socket;
}

/**
 * The reads of a socket built with `onread`: into exactly-sized buffers
 * (readExactly) until a reader attaches, then into slabs (DirectChunks).
 * install() pauses the socket (no reads until asked) and hangs the
 * DirectChunks on it. Reads before install() land in a stand-in of
 * `standInBytes` and are kept for the reader: 1 for a plain socket (never
 * a byte read past what was asked for), more for a TLS one (its handshake
 * must read on, and OpenSSL has the bytes already).
 */
function slabReads(standInBytes: number, coalesce = false): { onread: { buffer: () => Buffer; callback: (bytes: number, buf: Uint8Array) => void }; install(socket: net.Socket): void } {
  // Until a reader attaches, reads go into exactly-sized buffers of
  // readExactly() requests (or a stand-in between requests), never
  // past what was asked for; the first slab is taken at the first slab read.
  let current: SlabState | null = null;
  let want: { buf: Buffer; filled: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  /** The buffer the next read lands in (Node asks for it after every read). */
  let given: { kind: 'slab'; state: SlabState } | { kind: 'own'; buf: Buffer } = { kind: 'own', buf: Buffer.alloc(standInBytes) };
  const early: Buffer[] = [];
  let sink: ((chunk: Buffer) => void) | null = null;
  let socket: net.Socket | null = null;
  /**
   * `coalesce` (TLS): adjacent reads into the same slab go to the reader as
   * one chunk, at the end of this turn of the event loop or once large:
   * OpenSSL gives one 16 KiB record per read, and every chunk costs the
   * reader and the loader (parts, releases) the same whatever its size.
   */
  let pending: { state: SlabState; start: number; end: number } | null = null;
  let flushQueued = false;
  const flush = () => {
    flushQueued = false;
    const p = pending;
    if (!p) return;
    pending = null;
    sink!(p.state.slab.subarray(p.start, p.end));
  };
  const nextBuffer = (): Buffer => {
    if (sink) {
      if (!current || SLAB_BYTES - current.filled < MIN_READ_BYTES) {
        flush();
        if (current) {
          current.retired = true;
          recycleIfDone(current);
        }
        current = newSlab();
      }
      given = { kind: 'slab', state: current };
      return current.slab.subarray(current.filled);
    }
    const buf = want ? want.buf.subarray(want.filled) : given.kind === 'own' && given.buf.length === standInBytes && !want ? given.buf : Buffer.alloc(standInBytes);
    given = { kind: 'own', buf };
    return buf;
  };
  const callback = (bytes: number, buf: Uint8Array) => {
    const g = given;
    if (g.kind === 'slab') {
      const start = g.state.filled;
      g.state.filled += bytes;
      if (!coalesce) {
        sink!(Buffer.from(buf.buffer, buf.byteOffset, bytes));
        return;
      }
      if (pending && pending.state === g.state && pending.end === start) pending.end += bytes;
      else {
        flush();
        pending = { state: g.state, start, end: start + bytes };
      }
      if (pending.end - pending.start >= COALESCE_BYTES) flush();
      else if (!flushQueued) {
        flushQueued = true;
        setImmediate(flush);
      }
      return;
    }
    if (want) {
      // Into the request's own buffer, or the stand-in (copied over).
      if (g.buf.buffer !== want.buf.buffer) {
        const n = Math.min(bytes, want.buf.length - want.filled);
        g.buf.copy(want.buf, want.filled, 0, n);
        // A stand-in larger than the request keeps what is beyond it for later.
        if (n < bytes) early.push(Buffer.from(g.buf.subarray(n, bytes)));
        want.filled += n;
      } else want.filled += bytes;
      if (want.filled === want.buf.length) {
        const done = want;
        want = null;
        // Nothing more is read until asked for.
        socket?.pause();
        done.resolve(done.buf);
      }
      return;
    }
    // Read into a stand-in with nobody asking (paused too late, or a TLS handshake reading on): kept for the reader.
    const chunk = Buffer.from(g.buf.subarray(0, bytes));
    if (sink) sink(chunk);
    else early.push(chunk);
  };
  const install = (sock: net.Socket) => {
    socket = sock;
    // What is held back goes before the end of the stream is seen (these run before the reader's listeners).
    sock.prependListener('end', flush);
    sock.prependListener('close', flush);
    // No reads until asked: a connection nobody reads yet (queued, or a
    // stray one) must not fill memory at the peer's pace.
    sock.pause();
    const failWant = (err: Error) => {
      const w = want;
      want = null;
      w?.reject(err);
    };
    sock.once('end', () => failWant(new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection closed before the expected bytes arrived')));
    sock.once('error', (err) => failWant(new MigrationError('ERR_MIGRATION_CONNECTION', `connection failed: ${err.message}`, { cause: err })));
    const direct: DirectChunks = {
      readExactly(bytes) {
        if (sink) return Promise.reject(new MigrationError('ERR_MIGRATION_STATE', 'readExactly() after a reader attached'));
        if (want) return Promise.reject(new MigrationError('ERR_MIGRATION_STATE', 'readExactly() while another is pending'));
        const buf = Buffer.alloc(bytes);
        // Bytes a stand-in read too early are the start of this request.
        let filled = 0;
        while (early.length && filled < bytes) {
          const c = early[0]!;
          const n = Math.min(c.length, bytes - filled);
          c.copy(buf, filled, 0, n);
          filled += n;
          if (n === c.length) early.shift();
          else early[0] = c.subarray(n);
        }
        if (filled === bytes) return Promise.resolve(buf);
        if (sock.destroyed || sock.readableEnded) return Promise.reject(new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection is closed'));
        return new Promise<Buffer>((resolve, reject) => {
          want = { buf, filled, resolve, reject };
          sock.resume();
        });
      },
      attach(s) {
        sink = s;
        for (const c of early.splice(0)) s(c);
        sock.resume();
      },
      release: releaseSlabBytes,
    };
    // A closed connection's current slab gets no more reads: it may be reused once released.
    sock.once('close', () => {
      failWant(new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection closed before the expected bytes arrived'));
      if (current) {
        current.retired = true;
        recycleIfDone(current);
      }
    });
    Object.defineProperty(sock, directChunks, { value: direct });
  };
  return { onread: { buffer: nextBuffer, callback }, install };
}

/** TLS writes reach OpenSSL in pieces of at most this size (see pacedTlsWrites). */
const TLS_WRITE_PIECE_BYTES = 256 << 10;
/** A TLS 1.3 record's largest plaintext: smaller pieces (frame headers) are merged up to it. */
const TLS_RECORD_BYTES = 16 << 10;

/**
 * Node's TLS socket encrypts each write (or writev batch) whole, in one
 * call, and takes the next only once all of its ciphertext is in the
 * kernel: with 8 MiB of frames queued behind a write, batches of 8-16 MiB
 * (measured) were encrypted while the wire sat idle, then drained while the
 * encryption sat idle, and a batch of several buffers was first copied into
 * one new 8-16 MiB allocation (a copy per byte, and a V8 GC per ~64 MiB of
 * them). Here every batch goes to OpenSSL one piece of at most
 * TLS_WRITE_PIECE_BYTES at a time: a view of the caller's buffer (no copy),
 * small buffers (frame headers) merged into full 16 KiB records, the next
 * piece encrypted while the kernel still sends the last. Order and
 * Writable semantics are unchanged (the callback runs once the whole
 * batch is written), so direct writes (end(), a Pong) stay between frames.
 */
export function pacedTlsWrites(socket: tls.TLSSocket): void {
  const writePiece = net.Socket.prototype._write;
  const run = (chunks: Buffer[], cb: (err?: Error | null) => void) => {
    const pieces: Buffer[] = [];
    let small: Buffer[] = [];
    let smallBytes = 0;
    for (const chunk of chunks) {
      let c = chunk;
      if (smallBytes > 0) {
        const n = Math.min(TLS_RECORD_BYTES - smallBytes, c.length);
        small.push(c.subarray(0, n));
        smallBytes += n;
        c = c.subarray(n);
        if (smallBytes === TLS_RECORD_BYTES) {
          pieces.push(Buffer.concat(small, smallBytes));
          small = [];
          smallBytes = 0;
        }
      }
      while (c.length >= TLS_RECORD_BYTES) {
        // A tail smaller than a record stays with the piece before it.
        const n = c.length - TLS_WRITE_PIECE_BYTES < TLS_RECORD_BYTES ? c.length : TLS_WRITE_PIECE_BYTES;
        pieces.push(c.subarray(0, n));
        c = c.subarray(n);
      }
      if (c.length) {
        small.push(c);
        smallBytes += c.length;
      }
    }
    if (smallBytes) pieces.push(small.length === 1 ? small[0]! : Buffer.concat(small, smallBytes));
    let next = 0;
    let inCall = false;
    let again = false;
    const written = (err?: Error | null) => {
      if (err) return cb(err);
      // A piece written at once calls back inside the call: loop rather than recurse.
      if (inCall) {
        again = true;
        return;
      }
      do {
        again = false;
        if (next === pieces.length) return cb();
        inCall = true;
        writePiece.call(socket, pieces[next++]!, 'buffer' as BufferEncoding, written);
        inCall = false;
      } while (again);
    };
    written();
  };
  const asBuffer = (chunk: unknown, encoding: BufferEncoding): Buffer => (Buffer.isBuffer(chunk) ? chunk : typeof chunk === 'string' ? Buffer.from(chunk, encoding) : Buffer.from((chunk as Uint8Array).buffer, (chunk as Uint8Array).byteOffset, (chunk as Uint8Array).byteLength));
  socket._write = (chunk: unknown, encoding: BufferEncoding, cb: (err?: Error | null) => void) => run([asBuffer(chunk, encoding)], cb);
  socket._writev = (chunks: { chunk: unknown; encoding: BufferEncoding }[], cb: (err?: Error | null) => void) =>
    run(
      chunks.map((c) => asBuffer(c.chunk, c.encoding)),
      cb,
    );
}

export type MigrationUri = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export function parseUri(uri: string): MigrationUri {
  if (typeof uri !== 'string') throw new MigrationError('ERR_MIGRATION_BAD_URI', `migration URI must be a string, got ${typeof uri}`);
  if (uri.startsWith('unix:')) {
    const path = uri.slice(5);
    if (!path) throw new MigrationError('ERR_MIGRATION_BAD_URI', `"${uri}": unix: needs a socket path`);
    return { kind: 'unix', path };
  }
  if (uri.startsWith('tcp:')) {
    const rest = uri.slice(4);
    const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(rest);
    const port = m ? Number(m[3]) : NaN;
    if (!m || !Number.isInteger(port) || port < 0 || port > 65535) throw new MigrationError('ERR_MIGRATION_BAD_URI', `"${uri}": expected tcp:host:port with a port of 0-65535`);
    return { kind: 'tcp', host: m[1] ?? (m[2] || '127.0.0.1'), port };
  }
  throw new MigrationError('ERR_MIGRATION_BAD_URI', `"${uri}": expected tcp:host:port or unix:path`);
}

export function formatUri(u: MigrationUri): string {
  return u.kind === 'unix' ? `unix:${u.path}` : `tcp:${u.host.includes(':') ? `[${u.host}]` : u.host}:${u.port}`;
}

/**
 * TCP keepalive probes after this much idle time (a dead peer's socket is
 * eventually closed by the kernel). The bound that matters comes from
 * heartbeats and the peer timeout: Node sets no TCP_USER_TIMEOUT.
 */
export const KEEPALIVE_IDLE_MS = 5_000;

/**
 * Connects to a migration URI; with `secure`, over TLS, resolved once the
 * handshake is through and the destination verified (certificate, dates,
 * hostname): a destination this end refuses is closed without a byte of
 * the migration (its side sees 'peer-refused').
 */
export function connect(uri: MigrationUri, signal?: AbortSignal, secure?: TlsConfig | null): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    let hostname: string | null = null;
    try {
      if (secure) hostname = expectedHostname(secure, uri);
    } catch (err) {
      reject(err);
      return;
    }
    // Large stream buffers: a 1 MiB frame should not wait for 'drain' on its own.
    const buffers = { highWaterMark: SOCKET_BUFFER_BYTES } as object; // Node >= 18.17 accepts it; @types/node lags
    const where = uri.kind === 'unix' ? { path: uri.path } : { host: uri.host, port: uri.port };
    const socket: net.Socket = secure ? tls.connect({ ...where, ...buffers, ...clientTlsOptions(secure, hostname) }) : net.connect({ ...where, ...buffers });
    let tcpConnected = false;
    const onAbort = () => socket.destroy(new MigrationError('ERR_MIGRATION_CANCELLED', 'cancelled while connecting'));
    signal?.addEventListener('abort', onAbort, { once: true });
    const ready = () => {
      signal?.removeEventListener('abort', onAbort);
      if (secure) pacedTlsWrites(socket as tls.TLSSocket);
      socket.setNoDelay(true);
      socket.setKeepAlive(true, KEEPALIVE_IDLE_MS);
      resolve(socket);
    };
    socket.once('connect', () => {
      tcpConnected = true;
      if (!secure) ready();
    });
    if (secure)
      socket.once('secureConnect', () => {
        const refusal = verifyServer(socket as tls.TLSSocket, secure, hostname);
        if (!refusal) return ready();
        signal?.removeEventListener('abort', onAbort);
        socket.destroy();
        reject(refusal);
      });
    socket.once('error', (err) => {
      signal?.removeEventListener('abort', onAbort);
      if (err instanceof MigrationError) return reject(err);
      const tlsErr = secure && tcpConnected ? tlsHandshakeError(err, 'source', secure) : null;
      if (tlsErr) return reject(tlsErr);
      if (secure && tcpConnected)
        return reject(new MigrationTlsError('handshake', `the destination closed the connection during the TLS handshake (${err.message}): it may not be configured for TLS, or refused this source`, { cause: err }));
      reject(new MigrationError('ERR_MIGRATION_CONNECTION', `cannot connect to ${formatUri(uri)}: ${err.message}`, { cause: err }));
    });
  });
}

/**
 * The server side of TLS on an accepted connection (from listen(uri,
 * { tls: true })): its first bytes must start a TLS handshake (else
 * 'plaintext-refused', with the plaintext socket in `err.socket` to say so
 * on), then the source is verified (certificate chain and dates, or PSK)
 * and authorized (authz). Resolves with the TLS socket, to read frames
 * from; a refusal after the handshake carries the TLS socket in
 * `err.socket` (the source can be told why, encrypted).
 *
 * TLS connections use the normal stream path, not slab reads: the
 * plaintext comes out of OpenSSL (TLSWrap, on the socket's handle) into
 * buffers Node allocates, and a TLSSocket over an accepted socket takes no
 * `onread` buffer (Node ignores it when wrapping a socket).
 */
export function secureAccept(raw: net.Socket, cfg: TlsConfig, onSocket?: (s: tls.TLSSocket) => void): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const done = () => {
      raw.off('readable', onReadable);
      raw.off('close', onClose);
      raw.off('error', onClose);
    };
    const onClose = () => {
      done();
      reject(new MigrationError('ERR_MIGRATION_CONNECTION', 'the connection closed before its first bytes'));
    };
    const onReadable = () => {
      // Two bytes tell a TLS record from a frame; both go back for the handshake.
      const head = raw.read(2) as Buffer | null;
      if (!head) return;
      done();
      if (!looksLikeTls(head)) {
        raw.unshift(head);
        reject(new MigrationTlsError('plaintext-refused', 'this destination requires TLS and the source spoke plaintext: configure TLS on the source too (tls option, --tls-creds or --tls-psk)', { socket: raw }));
        return;
      }
      // Everything read so far (the ClientHello) goes to OpenSSL.
      const rest = raw.read() as Buffer | null;
      const read = rest ? Buffer.concat([head, rest]) : head;
      const slab = tlsWithSlabReads(raw, read, cfg);
      let s: tls.TLSSocket;
      if (slab) s = slab.socket;
      else {
        raw.unshift(read);
        // Fed to OpenSSL by the TLSSocket itself (what its socket has buffered).
        s = new tls.TLSSocket(raw, { ...serverTlsOptions(cfg), highWaterMark: SOCKET_BUFFER_BYTES } as tls.TLSSocketOptions);
      }
      onSocket?.(s);
      const fail = (err: Error) => {
        s.off('secure', onSecure);
        s.off('close', onTlsClose);
        // The connection is unusable: nothing more can be said on it.
        s.destroy();
        reject(tlsHandshakeError(err, 'destination', cfg, s) ?? new MigrationTlsError('handshake', `TLS handshake with the source failed: ${err.message}`, { cause: err }));
      };
      const onTlsClose = () => {
        if (cfg.mode !== 'x509') return fail(new Error('the source closed the connection during the TLS handshake'));
        // A TLS 1.3 client that refuses the server's certificate closes without an alert
        // (Node's client drops the connection before its Finished is out): that is what this looks like.
        s.off('error', fail);
        s.off('secure', onSecure);
        s.destroy();
        reject(new MigrationTlsError('peer-refused', "the source closed the connection during the TLS handshake, after this destination's certificate: it refused it (its CA, dates or hostname: see the source's error)"));
      };
      const onSecure = () => {
        s.off('error', fail);
        s.off('close', onTlsClose);
        // Failures surface through the reads and writes that see them.
        s.on('error', () => {});
        const refusal = verifyClient(s, cfg);
        if (refusal) {
          refusal.socket = s;
          reject(refusal);
          return;
        }
        slab?.install(s);
        pacedTlsWrites(s);
        resolve(s);
      };
      s.once('secure', onSecure);
      s.once('error', fail);
      s.once('close', onTlsClose);
    };
    raw.on('readable', onReadable);
    raw.once('close', onClose);
    raw.once('error', onClose);
    onReadable();
  });
}

/** A listening migration endpoint: 'accepted' gives each incoming connection, ready to read. */
export interface MigrationServer extends net.Server {
  on(event: 'accepted', listener: (socket: net.Socket) => void): this;
  on(event: string, listener: (...args: any[]) => void): this; // eslint-disable-line @typescript-eslint/no-explicit-any
}

/** What a TLSWrap handle offers beyond a stream handle (Node internals, checked before use). */
interface TlsHandle {
  open(fd: number): number;
  receive(data: Buffer): void;
}

/**
 * Slab reads for a TLS connection: the plaintext comes out of OpenSSL in
 * records of at most 16 KiB, each a JS callback, so what matters is that
 * each lands in a reused slab rather than a new Buffer (1 GiB of 16 KiB
 * Buffers is 65,536 external allocations and the full GCs they force). A
 * TLSSocket takes an `onread` buffer only when it owns its handle, so it
 * is built without a socket, the accepted fd duplicated into its handle
 * (as withSlabReads does), and the bytes already read (the ClientHello)
 * fed to OpenSSL. null (the caller wraps the socket as it is) where Node's
 * handle does not offer that.
 */
function tlsWithSlabReads(raw: net.Socket, read: Buffer, cfg: TlsConfig): { socket: tls.TLSSocket; install(s: net.Socket): void } | null {
  const fd = acceptedFd(raw);
  if (fd === null) return null;
  let copy: number;
  try {
    copy = native.dupSocketFd(fd);
  } catch {
    return null;
  }
  const reads = slabReads(16 << 10, true);
  let s: tls.TLSSocket | null = null;
  let handle: TlsHandle;
  try {
    // `pipe`: a unix socket's fd goes into a Pipe handle, a TCP one's into a TCP handle.
    s = new tls.TLSSocket(undefined as unknown as net.Socket, { ...serverTlsOptions(cfg), highWaterMark: SOCKET_BUFFER_BYTES, onread: reads.onread, pipe: raw.remoteAddress === undefined } as tls.TLSSocketOptions);
    const h = (s as unknown as { _handle?: Partial<TlsHandle> })._handle;
    if (typeof h?.open !== 'function' || typeof h.receive !== 'function') throw new Error('no TLSWrap handle');
    handle = h as TlsHandle;
    const err = handle.open(copy);
    if (err) throw new Error(`open: ${err}`);
  } catch {
    // Unopened, the handle does not own the copy.
    closeSync(copy);
    s?.destroy();
    return null;
  }
  // Connected already (the accepted fd): reads start when the socket initialises (next tick).
  (s as unknown as { connecting: boolean }).connecting = false;
  raw.destroy();
  process.nextTick(() => {
    if (!s!.destroyed) handle.receive(read);
  });
  return { socket: s, install: reads.install };
}

/** `tls`: connections are given as accepted (paused), for secureAccept(); else re-wrapped for slab reads. */
export function listen(uri: MigrationUri, options: { tls?: boolean } = {}): Promise<{ server: MigrationServer; uri: MigrationUri }> {
  return new Promise((resolve, reject) => {
    // Paused until re-wrapped for slab reads: no byte may be read by the original handle.
    const server = net.createServer({ noDelay: true, highWaterMark: SOCKET_BUFFER_BYTES, pauseOnConnect: true } as net.ServerOpts) as MigrationServer;
    server.on('connection', (accepted: net.Socket) => {
      const s = options.tls ? accepted : withSlabReads(accepted);
      s.setKeepAlive(true, KEEPALIVE_IDLE_MS);
      server.emit('accepted', s);
    });
    server.once('error', (err) => reject(new MigrationError('ERR_MIGRATION_CONNECTION', `cannot listen on ${formatUri(uri)}: ${err.message}`, { cause: err })));
    const onListening = () => {
      const addr = server.address();
      const bound: MigrationUri = typeof addr === 'object' && addr ? { kind: 'tcp', host: addr.address, port: addr.port } : uri;
      resolve({ server, uri: bound });
    };
    if (uri.kind === 'unix') server.listen(uri.path, onListening);
    else server.listen(uri.port, uri.host, onListening);
  });
}
