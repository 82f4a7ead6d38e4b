#!/usr/bin/env node
// Runs ava and ends with the line CI reads: "N passed, N failed" (ava's own
// reporters do not print it). ava's default reporter, not --tap: ava 6's TAP
// reporter crashes on a test timeout (dumpError on an undefined error) and
// ends the run with the rest of the tests unrun.
import { spawn } from 'node:child_process';

const child = spawn('npx', ['ava', ...process.argv.slice(2)], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, FORCE_COLOR: '0' } });
const summary = { passed: 0, failed: 0, pending: 0, uncaught: 0, unhandled: 0, knownFailures: 0 };
const patterns = [
  [/^\s*(\d+) tests? passed/, 'passed'],
  [/^\s*(\d+) tests? failed/, 'failed'],
  [/^\s*(\d+) tests? remained pending after a timeout/, 'pending'],
  [/^\s*(\d+) uncaught exceptions?/, 'uncaught'],
  [/^\s*(\d+) unhandled rejections?/, 'unhandled'],
  [/^\s*(\d+) known failures?/, 'knownFailures'],
];
let ticks = 0;
let crosses = 0;
// The failed tests' lines, repeated next to the summary: CI keeps only the tail of a log.
const failedLines = [];
function scan(stream, out) {
  let buffer = '';
  stream.on('data', (chunk) => {
    out.write(chunk);
    buffer += chunk;
    let nl;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      if (/^\s*✔/.test(line)) ticks++;
      else if (/^\s*✘/.test(line)) {
        crosses++;
        failedLines.push(line.trim());
      }
      for (const [re, key] of patterns) {
        const m = re.exec(line);
        if (m) summary[key] = Number(m[1]);
      }
    }
  });
}
scan(child.stdout, process.stdout);
scan(child.stderr, process.stderr);
child.on('close', (code) => {
  // The summary when ava printed one; the per-test marks otherwise (a crash before the summary).
  const passed = summary.passed || ticks;
  let failed = summary.failed + summary.pending + summary.uncaught + summary.unhandled + summary.knownFailures;
  if (failed === 0) failed = crosses;
  if (code !== 0 && failed === 0) failed = 1; // a crash or an uncaught error counts as a failure
  for (const line of failedLines) console.log(`failed: ${line}`);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(code ?? 1);
});
