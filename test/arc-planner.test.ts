import test from 'ava';
import { planArcs, nextState } from '../src/vfio/arc-planner.js';
import { MIGRATION_STATES, SAVING_STATES, supportedStates, type MigrationFlags, type MigrationState } from '../src/vfio/states.js';
import { VfioError } from '../src/vfio/errors.js';

const ALL: MigrationFlags = { stopCopy: true, p2p: true, preCopy: true };
const STOP_COPY_ONLY: MigrationFlags = { stopCopy: true, p2p: false, preCopy: false };
const P2P: MigrationFlags = { stopCopy: true, p2p: true, preCopy: false };
const PRE_COPY: MigrationFlags = { stopCopy: true, p2p: false, preCopy: true };
const path = (from: MigrationState, to: MigrationState, f: MigrationFlags) => [from, ...planArcs(from, to, f).map((a) => a.to)].join(' -> ');

test('stop-copy -> running walks through stop (and running-p2p with P2P), as uapi.md says', (t) => {
  t.is(path('stop-copy', 'running', P2P), 'stop-copy -> stop -> running-p2p -> running');
  t.is(path('stop-copy', 'running', STOP_COPY_ONLY), 'stop-copy -> stop -> running');
});

test('combination transitions with every feature follow the kernel comment in vfio_main.c', (t) => {
  t.is(path('pre-copy', 'stop-copy', ALL), 'pre-copy -> pre-copy-p2p -> stop-copy');
  t.is(path('pre-copy', 'resuming', ALL), 'pre-copy -> running -> running-p2p -> stop -> resuming');
  t.is(path('resuming', 'pre-copy', ALL), 'resuming -> stop -> running-p2p -> running -> pre-copy');
  t.is(path('running', 'stop-copy', ALL), 'running -> running-p2p -> stop -> stop-copy');
  t.is(path('stop', 'pre-copy-p2p', ALL), 'stop -> running-p2p -> pre-copy-p2p');
  t.is(path('pre-copy', 'stop-copy', PRE_COPY), 'pre-copy -> stop-copy');
  t.is(path('running', 'stop-copy', STOP_COPY_ONLY), 'running -> stop -> stop-copy');
});

test('stop-copy -> pre-copy and -> pre-copy-p2p are refused', (t) => {
  for (const to of ['pre-copy', 'pre-copy-p2p'] as MigrationState[]) {
    t.is(nextState('stop-copy', to, ALL), null);
    const err = t.throws(() => planArcs('stop-copy', to, ALL), { instanceOf: VfioError });
    t.is(err?.code, 'ERR_VFIO_UNSUPPORTED_STATE');
  }
});

test('states the flags lack, and error, cannot be requested', (t) => {
  t.is(nextState('running', 'pre-copy', P2P), null);
  t.is(nextState('running', 'running-p2p', PRE_COPY), null);
  t.is(nextState('running', 'error', ALL), null);
  t.is(nextState('error', 'running', ALL), null);
});

test('every planned path: supported states only, ends at the target, enters the saving group only at its end', (t) => {
  let paths = 0;
  for (const flags of [ALL, STOP_COPY_ONLY, P2P, PRE_COPY]) {
    const states = supportedStates(flags).filter((s): s is Exclude<MigrationState, 'error'> => s !== 'error');
    for (const from of states)
      for (const to of states) {
        let arcs;
        try {
          arcs = planArcs(from, to, flags);
        } catch {
          t.true(from === 'stop-copy' && (to === 'pre-copy' || to === 'pre-copy-p2p'), `${from} -> ${to} refused`);
          continue;
        }
        paths++;
        t.is(arcs.length === 0 ? from : arcs.at(-1)!.to, to);
        for (const [i, arc] of arcs.entries()) {
          t.true((states as MigrationState[]).includes(arc.to));
          // A path enters the saving group or resuming only at its end (moving within the group keeps the fd).
          if (i < arcs.length - 1) t.false((SAVING_STATES.includes(arc.to) && !SAVING_STATES.includes(from)) || arc.to === 'resuming', `${from} -> ${to} passes through ${arc.to}`);
        }
      }
  }
  t.true(paths > 60);
  t.is(MIGRATION_STATES.length, 8);
});
