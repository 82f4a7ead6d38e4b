// TLS on the migration stream, configured as QEMU configures it: a
// tls-creds-x509 directory or a tls-creds-psk keys file, tls-authz (who may
// migrate into this host) and tls-hostname. This module loads credentials,
// verifies peers (both ends complete the TLS handshake and then check the
// peer themselves, so that each can say why it refuses: Node's own rejection
// closes the connection without a word), matches client identities against
// the authz list, binds extra channels to the main channel's TLS session,
// and maps TLS failures to typed errors naming their reason.
import { createHmac, timingSafeEqual } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import type net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { MigrationError } from './errors.js';

/** TLS settings of one end (the same on every channel of a migration, tcp: or unix:). */
export interface TlsOptions {
  /**
   * A QEMU tls-creds-x509 directory: ca-cert.pem (the CA(s) peers must be
   * signed by), server-cert.pem + server-key.pem (the destination's),
   * client-cert.pem + client-key.pem (the source's), ca-crl.pem (optional).
   * Authentication is mutual: a destination refuses a source without a
   * client certificate from its CA.
   */
  creds?: string;
  /** A QEMU tls-creds-psk keys file: `username:hexkey` lines (the alternative to `creds`). */
  psk?: string;
  /** PSK: the username (the key's line) the source presents; default "qemu", as QEMU's. */
  pskUsername?: string;
  /**
   * Destination: the client identities allowed to migrate here (QEMU's
   * authz-list), glob patterns (`*`, `?`). x509: a pattern matches the
   * client certificate's subject DN in RFC 4514 order (`CN=src.example,O=Example,C=GB`)
   * or one of its subject alternative names (`DNS:src.example`,
   * `IP:10.0.0.2`, `email:...`, `URI:...`); PSK: the username. Unset: any
   * peer that passed the certificate (or key) check.
   */
  authz?: string[];
  /** Source: the name the destination's certificate must carry (default: the tcp: URI's host; required for unix:). */
  hostname?: string;
}

/** Why a TLS peer was refused (MigrationTlsError.reason). */
export type TlsReason =
  /** Bad TLS options or credential files (missing, unreadable, malformed). */
  | 'config'
  /** This end requires TLS and the peer spoke plaintext. */
  | 'plaintext-refused'
  /** A TLS client reached a destination that is not configured for TLS. */
  | 'tls-not-configured'
  /** The peer's certificate is not signed by a CA this end trusts. */
  | 'unknown-ca'
  | 'expired'
  | 'not-yet-valid'
  /** Any other certificate verification failure (revoked, bad signature, wrong purpose). */
  | 'bad-certificate'
  /** The source presented no client certificate. */
  | 'no-certificate'
  /** The destination's certificate does not carry the expected hostname. */
  | 'hostname-mismatch'
  /** The client identity is outside the destination's authz list. */
  | 'not-authorized'
  /** The pre-shared key (or its username) does not match the peer's. */
  | 'psk-mismatch'
  /** An extra channel could not prove it belongs to the migration it named. */
  | 'channel-binding'
  /** The peer closed the connection after the TLS handshake without a word (it refused this end). */
  | 'peer-refused'
  /** Any other TLS handshake failure. */
  | 'handshake';

export const TLS_REASONS: readonly TlsReason[] = [
  'config', 'plaintext-refused', 'tls-not-configured', 'unknown-ca', 'expired', 'not-yet-valid', 'bad-certificate',
  'no-certificate', 'hostname-mismatch', 'not-authorized', 'psk-mismatch', 'channel-binding', 'peer-refused', 'handshake',
];

/** ERR_MIGRATION_TLS with the reason; `socket`: a connection on which the peer can still be told why (an Error frame). */
export class MigrationTlsError extends MigrationError {
  readonly reason: TlsReason;
  socket?: net.Socket;

  constructor(reason: TlsReason, message: string, options?: { cause?: unknown; socket?: net.Socket }) {
    super('ERR_MIGRATION_TLS', message, options);
    this.reason = reason;
    // Not enumerable: errors are logged and serialised, sockets are not data.
    if (options?.socket) Object.defineProperty(this, 'socket', { value: options.socket, enumerable: false, writable: true });
  }
}

/** Loaded credentials of one end: everything connect/accept need, read once. */
export interface TlsConfig {
  mode: 'x509' | 'psk';
  role: 'source' | 'destination';
  context: tls.SecureContext;
  /** PSK: username -> key (destination: every line; source: its own). */
  pskKeys: Map<string, Buffer>;
  pskUsername: string;
  authz: string[] | null;
  hostname: string | null;
}

/** TLS 1.3 only; AES-128-GCM first (the fastest with AES-NI; TLS 1.3 PSKs here are SHA-256 ones, which rules out AES-256-GCM-SHA384). */
const CIPHERSUITES = 'TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256';
const MIN_PSK_BYTES = 16;
const MAX_KEYS_FILE_BYTES = 1 << 20;

export function isTlsOptions(v: unknown): v is TlsOptions {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Checks the options' shape (no file access): ERR_MIGRATION_TLS (config) naming the problem. */
export function checkTlsOptions(options: unknown, role: 'source' | 'destination'): TlsOptions {
  const bad = (m: string) => new MigrationTlsError('config', `TLS options: ${m}`);
  if (!isTlsOptions(options)) throw bad('expected an object');
  const o = options as Record<string, unknown>;
  for (const k of Object.keys(o)) if (!['creds', 'psk', 'pskUsername', 'authz', 'hostname'].includes(k)) throw bad(`unknown option "${k}" (creds, psk, pskUsername, authz, hostname)`);
  const str = (k: string) => {
    if (o[k] !== undefined && (typeof o[k] !== 'string' || o[k] === '')) throw bad(`${k} must be a non-empty string`);
  };
  ['creds', 'psk', 'pskUsername', 'hostname'].forEach(str);
  if (!o.creds === !o.psk) throw bad('give exactly one of creds (an x509 directory) and psk (a keys file)');
  if (o.authz !== undefined && (!Array.isArray(o.authz) || o.authz.some((p) => typeof p !== 'string' || p === ''))) throw bad('authz must be an array of non-empty strings');
  if (o.authz !== undefined && role === 'source') throw bad('authz applies to the destination (who may migrate into it)');
  if (o.hostname !== undefined && role === 'destination') throw bad('hostname applies to the source (the name it expects of the destination)');
  if (o.pskUsername !== undefined && !o.psk) throw bad('pskUsername needs psk');
  if (typeof o.pskUsername === 'string' && !/^[\x21-\x7e]{1,128}$/.test(o.pskUsername)) throw bad('pskUsername must be 1-128 printable characters without spaces');
  return o as TlsOptions;
}

async function readCred(dir: string, name: string, optional = false): Promise<Buffer | null> {
  const file = path.join(dir, name);
  try {
    return await readFile(file);
  } catch (err) {
    if (optional && (err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new MigrationTlsError('config', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/** A QEMU tls-creds-psk keys file: `username:hexkey` per line (blank lines and # comments skipped). */
export function parsePskKeys(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const m = /^([^:\s]{1,128}):([0-9a-fA-F]+)$/.exec(line);
    const where = `${file} line ${i + 1}`;
    if (!m) throw new MigrationTlsError('config', `${where}: expected username:hexkey`);
    if (m[2]!.length % 2) throw new MigrationTlsError('config', `${where}: the key has an odd number of hex digits`);
    const key = Buffer.from(m[2]!, 'hex');
    if (key.length < MIN_PSK_BYTES) throw new MigrationTlsError('config', `${where}: the key has ${key.length} bytes; at least ${MIN_PSK_BYTES} (e.g. dd if=/dev/urandom bs=1 count=32 | xxd -p -c 64)`);
    if (keys.has(m[1]!)) throw new MigrationTlsError('config', `${where}: username "${m[1]}" appears twice`);
    keys.set(m[1]!, key);
  });
  if (keys.size === 0) throw new MigrationTlsError('config', `${file}: no username:hexkey line`);
  return keys;
}

/** Reads the credentials of `role` and builds the TLS context (ERR_MIGRATION_TLS, reason config, on any problem). */
export async function loadTlsConfig(options: TlsOptions, role: 'source' | 'destination'): Promise<TlsConfig> {
  const o = checkTlsOptions(options, role);
  const base = { role, authz: o.authz ? [...o.authz] : null, hostname: o.hostname ?? null };
  if (o.psk) {
    let text: string;
    try {
      const buf = await readFile(o.psk);
      if (buf.length > MAX_KEYS_FILE_BYTES) throw new Error(`larger than ${MAX_KEYS_FILE_BYTES} bytes`);
      text = buf.toString('utf8');
    } catch (err) {
      throw new MigrationTlsError('config', `cannot read the PSK keys file ${o.psk}: ${(err as Error).message}`, { cause: err });
    }
    let keys = parsePskKeys(text, o.psk);
    const pskUsername = o.pskUsername ?? 'qemu';
    if (role === 'source') {
      const mine = keys.get(pskUsername);
      if (!mine) throw new MigrationTlsError('config', `${o.psk} has no key for username "${pskUsername}"`);
      keys = new Map([[pskUsername, mine]]);
    }
    // TLS 1.3 with an external PSK (psk_dhe_ke): no certificate, forward secrecy from the (EC)DHE share.
    const context = tls.createSecureContext({ minVersion: 'TLSv1.3', ciphers: CIPHERSUITES });
    return { ...base, mode: 'psk', context, pskKeys: keys, pskUsername };
  }
  const dir = o.creds!;
  const ca = await readCred(dir, 'ca-cert.pem');
  const crl = await readCred(dir, 'ca-crl.pem', true);
  const cert = await readCred(dir, role === 'destination' ? 'server-cert.pem' : 'client-cert.pem');
  const key = await readCred(dir, role === 'destination' ? 'server-key.pem' : 'client-key.pem');
  let context: tls.SecureContext;
  try {
    context = tls.createSecureContext({ ca: ca!, cert: cert!, key: key!, ...(crl ? { crl } : {}), minVersion: 'TLSv1.3', ciphers: CIPHERSUITES });
  } catch (err) {
    throw new MigrationTlsError('config', `the credentials in ${dir} do not load (${role === 'destination' ? 'server' : 'client'}-cert.pem, -key.pem, ca-cert.pem): ${(err as Error).message}`, { cause: err });
  }
  return { ...base, mode: 'x509', context, pskKeys: new Map(), pskUsername: '' };
}

/** The name the source checks the destination's certificate against: tls-hostname, else the tcp: host. */
export function expectedHostname(cfg: TlsConfig, uri: { kind: 'tcp'; host: string } | { kind: 'unix'; path: string }): string | null {
  if (cfg.mode !== 'x509') return null;
  if (cfg.hostname) return cfg.hostname;
  if (uri.kind === 'tcp') return uri.host;
  // As QEMU: a unix socket names no host, so nothing could be checked.
  throw new MigrationTlsError('config', 'x509 TLS over a unix: socket needs the hostname the destination certificate carries (hostname option, --tls-hostname)');
}

/** tls.connect options of a source (verification is done by verifyServer once the handshake is through). */
export function clientTlsOptions(cfg: TlsConfig, hostname: string | null): tls.ConnectionOptions {
  const opts: tls.ConnectionOptions = {
    secureContext: cfg.context,
    minVersion: 'TLSv1.3',
    // Checked by verifyServer, which can then tell the destination why before closing.
    rejectUnauthorized: false,
    checkServerIdentity: () => undefined,
  };
  // SNI takes names, not addresses (RFC 6066).
  if (hostname && !isIP(hostname)) opts.servername = hostname;
  if (cfg.mode === 'psk') {
    const [[identity, psk]] = [...cfg.pskKeys];
    opts.pskCallback = () => ({ identity, psk });
  }
  return opts;
}

/** The PSK username each server-side socket presented (for authz). */
const pskIdentities = new WeakMap<object, string>();
/** A PSK username the destination does not know (for the error's message). */
const unknownPskIdentities = new WeakMap<object, string>();

/** Options of a destination's server-side TLSSocket. */
export function serverTlsOptions(cfg: TlsConfig): tls.TLSSocketOptions {
  // pskCallback works on a server-side TLSSocket as on tls.Server (@types/node lists it for the server only).
  const opts: tls.TLSSocketOptions & { pskCallback?: (socket: tls.TLSSocket, identity: string) => Buffer | null } = { isServer: true, secureContext: cfg.context, requestCert: cfg.mode === 'x509', rejectUnauthorized: false };
  if (cfg.mode === 'psk') {
    opts.pskCallback = (socket: tls.TLSSocket, identity: string) => {
      const key = cfg.pskKeys.get(identity);
      if (key) pskIdentities.set(socket, identity);
      else unknownPskIdentities.set(socket, identity);
      return key ?? null;
    };
  }
  return opts as tls.TLSSocketOptions;
}

/** OpenSSL's verification result codes, by reason. */
const CA_CODES = new Set([
  'UNABLE_TO_GET_ISSUER_CERT', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'CERT_UNTRUSTED', 'CERT_SIGNATURE_FAILURE',
]);

function verifyCodeReason(code: string): TlsReason {
  if (CA_CODES.has(code)) return 'unknown-ca';
  if (code === 'CERT_HAS_EXPIRED') return 'expired';
  if (code === 'CERT_NOT_YET_VALID') return 'not-yet-valid';
  return 'bad-certificate';
}

function describeVerify(reason: TlsReason, code: string, whose: string): string {
  switch (reason) {
    case 'unknown-ca':
      return `${whose} certificate is not signed by a CA this end trusts (${code})`;
    case 'expired':
      return `${whose} certificate has expired (${code})`;
    case 'not-yet-valid':
      return `${whose} certificate is not valid yet (${code})`;
    default:
      return `${whose} certificate failed verification (${code})`;
  }
}

/** The client identities of a verified peer: its subject DN (RFC 4514 order) and each subject alternative name; PSK: the username. */
export function peerIdentities(socket: tls.TLSSocket): string[] {
  const psk = pskIdentities.get(socket);
  if (psk !== undefined) return [psk];
  const x = socket.getPeerX509Certificate();
  if (!x) return [];
  // OpenSSL lists the RDNs as they are in the certificate (C first); RFC 4514 (GnuTLS, QEMU) lists them most specific first.
  const dn = x.subject
    .split('\n')
    .filter(Boolean)
    .reverse()
    .map((rdn) => rdn.replace(/([,+;])/g, '\\$1'))
    .join(',');
  const sans = (x.subjectAltName ?? '')
    .split(/,\s*/)
    .filter(Boolean)
    .map((s) => s.replace(/^IP Address:/, 'IP:'));
  return [dn, ...sans];
}

/** Glob match: `*` any run of characters (also none), `?` one character; everything else literal. */
export function globMatch(pattern: string, text: string): boolean {
  const re = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[\\s\\S]*').replace(/\?/g, '[\\s\\S]')}$`);
  return re.test(text);
}

/**
 * The destination's check of a client once the handshake is through: its
 * certificate (chain to our CA, dates) or its PSK, then authz. null if it
 * may go on; else the typed refusal.
 */
export function verifyClient(socket: tls.TLSSocket, cfg: TlsConfig): MigrationTlsError | null {
  if (cfg.mode === 'x509') {
    if (!socket.getPeerX509Certificate()) return new MigrationTlsError('no-certificate', 'the source presented no client certificate (this destination requires one signed by its CA: client-cert.pem in the source\'s --tls-creds)');
    // Node keeps OpenSSL's verification result on the handle (tls.Server reads it the same way); without it, nothing is trusted.
    const handle = (socket as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null | undefined } })._handle;
    if (typeof handle?.verifyError !== 'function') return new MigrationTlsError('bad-certificate', 'cannot read the certificate verification result: refusing');
    const err = handle.verifyError();
    if (err) {
      const code = err.code ?? err.message;
      const reason = verifyCodeReason(code);
      return new MigrationTlsError(reason, describeVerify(reason, code, "the source's client"));
    }
  } else if (!pskIdentities.has(socket)) {
    return new MigrationTlsError('psk-mismatch', 'the source did not authenticate with a pre-shared key of this destination');
  }
  if (cfg.authz) {
    const ids = peerIdentities(socket);
    if (!ids.some((id) => cfg.authz!.some((p) => globMatch(p, id))))
      return new MigrationTlsError('not-authorized', `client identity ${JSON.stringify(ids[0] ?? '')}${ids.length > 1 ? ` (also ${ids.slice(1).join(', ')})` : ''} is not in this destination's authz list`);
  }
  return null;
}

/** The source's check of the destination once the handshake is through: certificate chain, dates, hostname. */
export function verifyServer(socket: tls.TLSSocket, cfg: TlsConfig, hostname: string | null): MigrationTlsError | null {
  if (cfg.mode === 'psk') return null; // the handshake itself proved the key (a wrong one fails it)
  if (!socket.authorized) {
    const code = String(socket.authorizationError ?? 'UNKNOWN');
    const reason = verifyCodeReason(code);
    return new MigrationTlsError(reason, describeVerify(reason, code, "the destination's"));
  }
  if (hostname) {
    const err = tls.checkServerIdentity(hostname, socket.getPeerCertificate());
    if (err) return new MigrationTlsError('hostname-mismatch', `the destination's certificate is not for "${hostname}": ${err.message}${cfg.hostname ? '' : ' (set the hostname option, --tls-hostname, if the certificate names the host otherwise)'}`);
  }
  return null;
}

/**
 * A TLS failure during the handshake as a typed error, from `side`'s view;
 * null if `err` is no TLS error (a refused connection, a reset before any
 * TLS byte: the caller's connection error says it better).
 */
export function tlsHandshakeError(err: unknown, side: 'source' | 'destination', cfg: TlsConfig, socket?: object): MigrationTlsError | null {
  const e = err as { code?: unknown; message?: unknown };
  const code = typeof e?.code === 'string' ? e.code : '';
  const msg = typeof e?.message === 'string' ? e.message.split('\n')[0]! : String(err);
  const peer = side === 'source' ? 'the destination' : 'the source';
  if (/WRONG_VERSION_NUMBER|PACKET_LENGTH_TOO_LONG|HTTP_REQUEST|RECORD_LAYER_FAILURE|UNKNOWN_PROTOCOL/.test(code))
    return new MigrationTlsError('plaintext-refused', `${peer} does not speak TLS (it sent plaintext): TLS must be configured on both ends (${code})`, { cause: err });
  if (cfg.mode === 'psk') {
    const unknown = socket ? unknownPskIdentities.get(socket) : undefined;
    if (unknown !== undefined) return new MigrationTlsError('psk-mismatch', `the source's PSK username "${unknown}" is not in this destination's keys file`, { cause: err });
    if (/BINDER_DOES_NOT_VERIFY|ALERT_ILLEGAL_PARAMETER|ALERT_HANDSHAKE_FAILURE|ALERT_DECRYPT_ERROR|BAD_DECRYPT|DECRYPTION_FAILED/.test(code))
      return new MigrationTlsError('psk-mismatch', `the pre-shared key does not match ${peer}'s (wrong key or username) (${code})`, { cause: err });
  }
  if (/ALERT_UNKNOWN_CA/.test(code)) return new MigrationTlsError('unknown-ca', `${peer} does not trust this end's certificate (${code})`, { cause: err });
  if (/ALERT_CERTIFICATE_EXPIRED/.test(code)) return new MigrationTlsError('expired', `${peer} says this end's certificate has expired (${code})`, { cause: err });
  if (/ALERT_BAD_CERTIFICATE|ALERT_CERTIFICATE_REQUIRED/.test(code)) return new MigrationTlsError('bad-certificate', `${peer} refused this end's certificate (${code})`, { cause: err });
  if (code.startsWith('ERR_SSL_') || code.startsWith('ERR_TLS_') || /SSL|TLS/.test(msg))
    return new MigrationTlsError('handshake', `the TLS handshake with ${peer} failed: ${msg}${code ? ` (${code})` : ''}`, { cause: err });
  return null;
}

/** A TLS record's first bytes (handshake, version 3.x): how a TLS client's first flight starts. */
export function looksLikeTls(firstBytes: Buffer): boolean {
  return firstBytes.length >= 2 && firstBytes[0] === 0x16 && firstBytes[1] === 0x03;
}

/** The error a plaintext destination gives a TLS client. */
export function tlsNotConfigured(): MigrationTlsError {
  return new MigrationTlsError('tls-not-configured', 'a TLS client connected, but this destination is not configured for TLS (--tls-creds or --tls-psk): configure it on both ends or on neither');
}

const BINDING_LABEL = 'EXPORTER-vfio-migration-channel-binding';
const BINDING_BYTES = 32;
const BINDING_CONTEXT = Buffer.from('vfio-migration');

/**
 * An extra channel's proof that it belongs to the migration whose main
 * channel is `main`: an HMAC, keyed by keying material exported from the
 * main channel's TLS session (RFC 5705/8446 exporter: only its two ends can
 * compute it), over the channel's index and the extra channel's own
 * exported material (so the proof is valid on that one connection: a third
 * party that sees or replays it gains nothing). null when not over TLS.
 */
export function channelBinding(main: net.Socket, extra: net.Socket, index: number): string | null {
  if (!(main instanceof tls.TLSSocket) || !(extra instanceof tls.TLSSocket)) return null;
  // A closed channel has no session left to export from: without a proof, the destination refuses the channel.
  if (main.destroyed || extra.destroyed) return null;
  const key = main.exportKeyingMaterial(BINDING_BYTES, BINDING_LABEL, BINDING_CONTEXT);
  const own = extra.exportKeyingMaterial(BINDING_BYTES, BINDING_LABEL, BINDING_CONTEXT);
  return createHmac('sha256', key).update(`channel ${index}:`).update(own).digest('hex');
}

/** Checks an extra channel's proof (constant time): null if it holds, else the refusal. */
export function checkChannelBinding(main: net.Socket, extra: net.Socket, index: number, proof: unknown): MigrationTlsError | null {
  const expected = channelBinding(main, extra, index);
  if (expected === null) return null;
  const given = typeof proof === 'string' && /^[0-9a-f]{64}$/.test(proof) ? Buffer.from(proof, 'hex') : null;
  if (!given || !timingSafeEqual(given, Buffer.from(expected, 'hex')))
    return new MigrationTlsError('channel-binding', `channel ${index} ${given ? 'presented a channel binding that does not match' : 'presented no channel binding for'} the migration it names: it does not come from the source of that migration`);
  return null;
}

/** A peer's Error frame content ({code, message, reason}) as the typed error, on the side that received it. */
export function tlsErrorFromPeer(e: { message?: unknown; reason?: unknown }, prefix: string): MigrationTlsError {
  const reason = TLS_REASONS.includes(e.reason as TlsReason) ? (e.reason as TlsReason) : 'handshake';
  return new MigrationTlsError(reason, `${prefix}: ${typeof e.message === 'string' ? e.message : 'TLS refused'}`);
}
