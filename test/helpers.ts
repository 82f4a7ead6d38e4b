import { execFileSync } from 'node:child_process';
import { readdirSync, readlinkSync } from 'node:fs';

/** Open fds of this process (for leak checks), leaving out libuv's /dev/null EMFILE reserve. */
export function openFdCount(): number {
  return readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) !== '/dev/null';
    } catch {
      return false;
    }
  }).length;
}

export const MiB = 1 << 20;

let netnsCount = 0;

/**
 * A network namespace joined to this one by a veth pair (10.213.N.1 here,
 * 10.213.N.2 there): cut() takes the link down on both ends, so packets
 * are dropped without a word (no reset, no ICMP): a silent partition.
 * `rateMbit` caps each direction with tbf (the kernel here has tbf but no
 * netem), for benches of a link of a given speed.
 * Needs root (tests run as root here and in CI) and iproute2.
 */
export interface Netns {
  name: string;
  hostIp: string;
  nsIp: string;
  cut(): void;
  heal(): void;
  destroy(): void;
}

export function createNetns(options: { rateMbit?: number } = {}): Netns {
  const n = (process.pid % 200) + 1;
  const id = `${process.pid % 10000}x${++netnsCount}`;
  const name = `vfmig-${id}`;
  const hostIf = `vfh${id}`;
  const nsIf = `vfn${id}`;
  const subnet = `10.213.${(n * 7 + netnsCount) % 250}`;
  const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  ip('netns', 'add', name);
  try {
    ip('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf);
    ip('link', 'set', nsIf, 'netns', name);
    ip('addr', 'add', `${subnet}.1/30`, 'dev', hostIf);
    ip('link', 'set', hostIf, 'up');
    ip('-n', name, 'addr', 'add', `${subnet}.2/30`, 'dev', nsIf);
    ip('-n', name, 'link', 'set', nsIf, 'up');
    ip('-n', name, 'link', 'set', 'lo', 'up');
    const rateMbit = options.rateMbit ?? 0;
    if (rateMbit > 0) {
      // Burst of ~2 ms at the rate (at least a 64 KiB GSO packet), a queue of ~20 ms.
      const burst = String(Math.max(96 * 1024, Math.ceil((rateMbit * 1e6) / 8 / 500)));
      const tbf = (dev: string) => ['qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', `${rateMbit}mbit`, 'burst', burst, 'latency', '20ms'];
      execFileSync('tc', tbf(hostIf), { stdio: ['ignore', 'ignore', 'pipe'] });
      execFileSync('tc', ['-n', name, ...tbf(nsIf)], { stdio: ['ignore', 'ignore', 'pipe'] });
    }
  } catch (err) {
    ip('netns', 'del', name);
    throw err;
  }
  return {
    name,
    hostIp: `${subnet}.1`,
    nsIp: `${subnet}.2`,
    cut: () => {
      ip('-n', name, 'link', 'set', nsIf, 'down');
      ip('link', 'set', hostIf, 'down');
    },
    heal: () => {
      ip('link', 'set', hostIf, 'up');
      ip('-n', name, 'link', 'set', nsIf, 'up');
    },
    destroy: () => {
      try {
        ip('link', 'del', hostIf);
      } catch {
        // Gone with the namespace already.
      }
      ip('netns', 'del', name);
    },
  };
}
