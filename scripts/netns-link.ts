// A second host for benchmarks and fault tests: a network namespace joined to
// this one by a veth pair, optionally rate-capped with tbf on both ends (the
// machine's kernel has tbf but no netem). Needs root and iproute2.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface NetnsLink {
  /** The namespace the far end lives in (`ip netns exec <ns> ...`). */
  ns: string;
  /** This side's address, and the namespace's. */
  localIp: string;
  remoteIp: string;
  /** A command line that runs `argv` inside the namespace. */
  wrap(argv: string[]): string[];
  /** Cuts the link silently (no RST, no FIN): the far end's veth goes down. */
  partition(): Promise<void>;
  heal(): Promise<void>;
  close(): Promise<void>;
}

let links = 0;

async function ip(...args: string[]): Promise<void> {
  await run('ip', args);
}

/** `rateMbit`: the cap in each direction (0 = uncapped). */
export async function createNetnsLink(rateMbit = 0): Promise<NetnsLink> {
  const id = `${process.pid % 10000}${++links}`;
  const ns = `vfm${id}`;
  const local = `vfa${id}`;
  const remote = `vfb${id}`;
  // A /30 of our own per link, in a range no other host of this sandbox uses.
  const octet = (process.pid + links) % 250;
  const localIp = `10.213.${octet}.1`;
  const remoteIp = `10.213.${octet}.2`;
  await ip('netns', 'add', ns);
  try {
    await ip('link', 'add', local, 'type', 'veth', 'peer', 'name', remote);
    await ip('link', 'set', remote, 'netns', ns);
    await ip('addr', 'add', `${localIp}/30`, 'dev', local);
    await ip('link', 'set', local, 'up');
    await ip('netns', 'exec', ns, 'ip', 'addr', 'add', `${remoteIp}/30`, 'dev', remote);
    await ip('netns', 'exec', ns, 'ip', 'link', 'set', remote, 'up');
    await ip('netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up');
    if (rateMbit > 0) {
      // Burst of ~2 ms at the rate (at least a 64 KiB GSO packet), a queue of ~20 ms.
      const burst = `${Math.max(96 * 1024, Math.ceil((rateMbit * 1e6) / 8 / 500))}`;
      const tbf = ['qdisc', 'add', 'dev', '', 'root', 'tbf', 'rate', `${rateMbit}mbit`, 'burst', burst, 'latency', '20ms'];
      await run('tc', tbf.map((a) => (a === '' ? local : a)));
      await run('ip', ['netns', 'exec', ns, 'tc', ...tbf.map((a) => (a === '' ? remote : a))]);
    }
  } catch (err) {
    await ip('netns', 'del', ns).catch(() => {});
    await ip('link', 'del', local).catch(() => {});
    throw err;
  }
  return {
    ns,
    localIp,
    remoteIp,
    wrap: (argv) => ['ip', 'netns', 'exec', ns, ...argv],
    partition: () => ip('netns', 'exec', ns, 'ip', 'link', 'set', remote, 'down'),
    heal: () => ip('netns', 'exec', ns, 'ip', 'link', 'set', remote, 'up'),
    close: async () => {
      await ip('link', 'del', local).catch(() => {});
      await ip('netns', 'del', ns).catch(() => {});
    },
  };
}
