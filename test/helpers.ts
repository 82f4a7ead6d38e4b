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
