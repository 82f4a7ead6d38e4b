import { readdirSync } from 'node:fs';

/** Open fds of this process (for leak checks). */
export function openFdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

export const MiB = 1 << 20;
