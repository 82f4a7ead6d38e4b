import test from 'ava';
import { listProfiles } from '../src/vfio/mock-profile.js';
import { type CheckName, runConformance } from '../src/vfio/conformance.js';
import { openMockDevice } from '../src/vfio/mock.js';

function mockTarget(profile: string) {
  let seed = 100;
  return { name: profile, open: () => openMockDevice({ profile, seed: seed++ }) };
}

const shipped = await listProfiles();

for (const profile of shipped) {
  test(`conformance: shipped profile ${profile} passes every check`, async (t) => {
    const report = await runConformance(mockTarget(profile));
    for (const c of report.checks) t.log(`${c.status} ${c.name}: ${c.detail}`);
    t.deepEqual(report.checks.filter((c) => c.status !== 'pass').map((c) => `${c.name}: ${c.detail}`), []);
    t.is(report.passed, 10);
  });
}

const expectedFailures: Record<string, CheckName[]> = {
  // Walking running-p2p -> stop lands in ERROR, so every check that stops the device fails.
  'faults/arc-fails-into-error': ['flags-consistent', 'single-arcs', 'multi-step-paths', 'invalid-arcs-rejected', 'stop-copy-size', 'save-restore', 'corrupt-input-rejected', 'reset'],
  'faults/corrupt-save': ['save-restore'],
  'faults/glitchy-precopy-info': ['precopy-info', 'stop-copy-size'],
};

for (const [profile, failures] of Object.entries(expectedFailures)) {
  test(`conformance: fault profile ${profile} reports exactly the expected failures`, async (t) => {
    const report = await runConformance(mockTarget(profile));
    for (const c of report.checks) t.log(`${c.status} ${c.name}: ${c.detail}`);
    t.deepEqual(report.checks.filter((c) => c.status === 'fail').map((c) => c.name).sort(), [...failures].sort());
  });
}
