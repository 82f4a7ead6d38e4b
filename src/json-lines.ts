// One JSON object per line on a stream: how the CLI's `--json` mode talks to
// whatever drives it (the demo, tests, a management app).
import type { Readable } from 'node:stream';

/** Calls `onObject` for each JSON line of `stream`, `onOther` for lines that are not JSON objects. */
export function onJsonLines(stream: Readable, onObject: (o: Record<string, unknown>) => void, onOther: (line: string) => void = () => {}): void {
  let buf = '';
  const handle = (line: string) => {
    let o: unknown;
    try {
      o = JSON.parse(line);
    } catch {
      onOther(line);
      return;
    }
    if (typeof o === 'object' && o !== null) onObject(o as Record<string, unknown>);
    else onOther(line);
  };
  stream.setEncoding('utf8'); // a multi-byte character split across chunks stays whole
  stream.on('data', (d: string) => {
    buf += d;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      handle(line);
    }
  });
  // A last line without its newline (a process that died mid-write) still counts.
  stream.on('end', () => {
    if (buf) handle(buf);
    buf = '';
  });
}
