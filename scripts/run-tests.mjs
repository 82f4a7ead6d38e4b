#!/usr/bin/env node
// Runs ava with the TAP reporter and ends with the line CI reads:
// "N passed, N failed" (ava's own reporters do not print it).
import { spawn } from 'node:child_process';

const args = ['ava', '--tap', ...process.argv.slice(2)];
const child = spawn('npx', args, { stdio: ['ignore', 'pipe', 'inherit'] });
let passed = 0;
let failed = 0;
let buffer = '';
child.stdout.on('data', (chunk) => {
  process.stdout.write(chunk);
  buffer += chunk;
  let nl;
  while ((nl = buffer.indexOf('\n')) >= 0) {
    const line = buffer.slice(0, nl);
    buffer = buffer.slice(nl + 1);
    let m;
    if ((m = /^# pass (\d+)/.exec(line))) passed = Number(m[1]);
    else if ((m = /^# fail (\d+)/.exec(line))) failed = Number(m[1]);
    else if (/^not ok /.test(line) && !/# (TODO|SKIP)/.test(line)) failed = Math.max(failed, 0);
  }
});
child.on('close', (code) => {
  if (code !== 0 && failed === 0) failed = 1; // a crash or an uncaught error counts as a failure
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(code ?? 1);
});
