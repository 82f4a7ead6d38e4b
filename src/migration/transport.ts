// Migration URIs and their sockets: tcp:host:port and unix:path, as QEMU spells them.
import net from 'node:net';
import { MigrationError } from './errors.js';

const SOCKET_BUFFER_BYTES = 8 << 20;

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

export function connect(uri: MigrationUri, signal?: AbortSignal): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    // Large stream buffers: a 1 MiB frame should not wait for 'drain' on its own.
    const buffers = { highWaterMark: SOCKET_BUFFER_BYTES } as object; // Node >= 18.17 accepts it; @types/node lags
    const socket = uri.kind === 'unix' ? net.connect({ path: uri.path, ...buffers }) : net.connect({ host: uri.host, port: uri.port, ...buffers });
    const onAbort = () => socket.destroy(new MigrationError('ERR_MIGRATION_CANCELLED', 'cancelled while connecting'));
    signal?.addEventListener('abort', onAbort, { once: true });
    socket.once('connect', () => {
      signal?.removeEventListener('abort', onAbort);
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once('error', (err) => {
      signal?.removeEventListener('abort', onAbort);
      reject(err instanceof MigrationError ? err : new MigrationError('ERR_MIGRATION_CONNECTION', `cannot connect to ${formatUri(uri)}: ${err.message}`, { cause: err }));
    });
  });
}

export function listen(uri: MigrationUri): Promise<{ server: net.Server; uri: MigrationUri }> {
  return new Promise((resolve, reject) => {
    const server = net.createServer({ noDelay: true, highWaterMark: SOCKET_BUFFER_BYTES } as net.ServerOpts);
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
