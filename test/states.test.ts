// The TypeScript state helpers against the addon: its table (stateFacts), its
// arc walk (nextState, the kernel's vfio_mig_get_next_state) and what a mock
// device built on the same table does, for every state and flag combination.
import test from 'ava';
import fc from 'fast-check';
import { native } from '../src/vfio/native.js';
import {
  MIGRATION_FLAG_BITS,
  MIGRATION_STATES,
  P2P_QUIESCED_STATES,
  PRECOPY_STATES,
  SAVING_STATES,
  arcOpensDataFd,
  dataFdOpenedBy,
  flagsFromBits,
  flagsToBits,
  isMigrationState,
  stateFromKernel,
  stateToKernel,
  supportedStates,
  type MigrationFlags,
  type MigrationState,
} from '../src/vfio/states.js';
import { STOP_COPY_STATE, liveState, nextState, planArcs, quiescedOnPath, resumePath, switchoverPath } from '../src/vfio/arc-planner.js';
import { openMockDevice } from '../src/vfio/mock.js';

const facts = native.stateFacts;
const ALL_BITS = [0, 1, 2, 3, 4, 5, 6, 7];
const flagNames = (f: MigrationFlags) => [f.stopCopy && 'stop-copy', f.p2p && 'p2p', f.preCopy && 'pre-copy'].filter((x): x is string => !!x);

test('numbers and names: every state, both ways, as the addon numbers them', (t) => {
  t.is(MIGRATION_STATES.length, facts.states.length);
  for (const s of facts.states) {
    t.true(isMigrationState(s.name));
    t.is(stateToKernel(s.name as MigrationState), s.value);
    t.is(stateFromKernel(s.value) as string | undefined, s.name);
  }
  t.is(stateFromKernel(facts.states.length), undefined);
  t.false(isMigrationState('toString'));
  // The uAPI's numbers (uapi.md): ERROR 0 ... PRE_COPY_P2P 7.
  t.deepEqual(MIGRATION_STATES, ['error', 'stop', 'running', 'stop-copy', 'resuming', 'running-p2p', 'pre-copy', 'pre-copy-p2p']);
  t.deepEqual({ ...MIGRATION_FLAG_BITS }, { stopCopy: native.uapi.VFIO_MIGRATION_STOP_COPY, p2p: native.uapi.VFIO_MIGRATION_P2P, preCopy: native.uapi.VFIO_MIGRATION_PRE_COPY });
});

test('every flag combination: bits round-trip and the supported states are those the addon lets a walk start and end at', (t) => {
  for (const bits of ALL_BITS) {
    const flags = flagsFromBits(bits);
    t.is(flagsToBits(flags), bits);
    const supported = supportedStates(flags);
    for (const s of MIGRATION_STATES) {
      const fact = facts.states[stateToKernel(s)]!;
      // The kernel accepts a state (as current and target) exactly when the device has it.
      const kernelHas = native.nextState(stateToKernel(s), stateToKernel(s), bits) !== null;
      t.is(supported.includes(s), fact.always || kernelHas, `${s} with flags ${bits}`);
      if (s !== 'error' && s !== 'running') t.is(supported.includes(s), kernelHas);
    }
    // uapi.md: STOP_COPY brings stop, stop-copy, resuming; P2P running-p2p; PRE_COPY pre-copy; both pre-copy-p2p.
    const f = flags;
    const expected = new Set<MigrationState>(['error', 'running']);
    if (f.stopCopy) {
      for (const s of ['stop', 'stop-copy', 'resuming'] as const) expected.add(s);
      if (f.p2p) expected.add('running-p2p');
      if (f.preCopy) expected.add('pre-copy');
      if (f.p2p && f.preCopy) expected.add('pre-copy-p2p');
    }
    t.deepEqual([...supported].sort(), [...expected].sort(), `flags ${bits}`);
  }
});

test('the groups are the table\'s columns and match uapi.md', (t) => {
  const column = (k: 'saving' | 'precopy' | 'p2pQuiesced') => facts.states.filter((s) => s[k]).map((s) => s.name);
  t.deepEqual([...SAVING_STATES], column('saving'));
  t.deepEqual([...PRECOPY_STATES], column('precopy'));
  t.deepEqual([...P2P_QUIESCED_STATES], column('p2pQuiesced'));
  t.deepEqual([...SAVING_STATES].sort(), ['pre-copy', 'pre-copy-p2p', 'stop-copy'].sort());
  t.deepEqual([...PRECOPY_STATES].sort(), ['pre-copy', 'pre-copy-p2p'].sort());
  t.deepEqual([...P2P_QUIESCED_STATES].sort(), ['running-p2p', 'pre-copy-p2p'].sort());
  t.is(STOP_COPY_STATE, 'stop-copy');
});

const flagsArb = fc.integer({ min: 0, max: 7 }).map(flagsFromBits);
const stateArb = fc.constantFrom(...MIGRATION_STATES);

test('property: nextState and planArcs follow the addon, and a data fd opens exactly when a walk enters the saving group or resuming', (t) => {
  fc.assert(
    fc.property(flagsArb, stateArb, stateArb, (flags, from, to) => {
      const bits = flagsToBits(flags);
      const raw = native.nextState(stateToKernel(from), stateToKernel(to), bits);
      const next = nextState(from, to, flags);
      if ((raw === null) !== (next === null) || (next !== null && stateToKernel(next) !== raw)) return false;
      // Every single arc (from -> next) the kernel would take: which fd it opens.
      if (next !== null && next !== from) {
        const opens = (SAVING_STATES.includes(next) && !SAVING_STATES.includes(from)) || next === 'resuming';
        if (arcOpensDataFd(from, next) !== opens) return false;
        if (dataFdOpenedBy(from, next) !== (opens ? (next === 'resuming' ? 'resume' : 'save') : null)) return false;
      }
      let arcs;
      try {
        arcs = planArcs(from, to, flags);
      } catch {
        return next === null && from !== to;
      }
      const supported = supportedStates(flags);
      return arcs.every((a, i) => supported.includes(a.to) && (i === 0 ? a.from === from : a.from === arcs[i - 1]!.to)) && (arcs.at(-1)?.to ?? from) === to;
    }),
    { numRuns: 2000 },
  );
  t.pass();
});

test('the migration paths derive from the table: switchover, resume and the quiesce step for every flag combination', (t) => {
  for (const bits of ALL_BITS) {
    const f = flagsFromBits(bits);
    if (!f.stopCopy) continue;
    const path = (arcs: { from: string; to: string }[]) => [arcs[0]?.from, ...arcs.map((a) => a.to)].join(' -> ');
    t.is(liveState(f), f.preCopy ? 'pre-copy' : 'running');
    const sw = f.preCopy ? (f.p2p ? 'pre-copy -> pre-copy-p2p -> stop-copy' : 'pre-copy -> stop-copy') : f.p2p ? 'running -> running-p2p -> stop -> stop-copy' : 'running -> stop -> stop-copy';
    t.is(path(switchoverPath(f)), sw, `switchover with ${flagNames(f).join('+')}`);
    t.is(path(resumePath(f)), f.p2p ? 'resuming -> stop -> running-p2p -> running' : 'resuming -> stop -> running');
    t.is(quiescedOnPath(liveState(f), STOP_COPY_STATE, f), f.p2p ? (f.preCopy ? 'pre-copy-p2p' : 'running-p2p') : null);
    t.is(quiescedOnPath('stop', 'running', f), f.p2p ? 'running-p2p' : null);
  }
});

// A mock device runs the addon's C++ side of the same table: the fds it
// hands out and its PRECOPY_INFO must be what the TypeScript helpers say.
test('property: a mock device opens a data fd on exactly the arcs arcOpensDataFd names, and answers PRECOPY_INFO exactly in PRECOPY_STATES', async (t) => {
  const withStopCopy = fc.integer({ min: 0, max: 3 }).map((b) => flagsFromBits(1 | (b << 1)));
  const targets = fc.array(fc.constantFrom<MigrationState>('stop', 'running', 'stop-copy', 'running-p2p', 'pre-copy', 'pre-copy-p2p'), { minLength: 1, maxLength: 5 });
  let arcsChecked = 0;
  await fc.assert(
    fc.asyncProperty(withStopCopy, targets, async (flags, wanted) => {
      const supported = supportedStates(flags);
      const dev = await openMockDevice({ profile: 'minimal', overrides: { flags: flagNames(flags) as ('stop-copy' | 'p2p' | 'pre-copy')[] }, seed: 1 });
      try {
        await dev.getState();
        for (const target of wanted.filter((s) => supported.includes(s))) {
          let arcs;
          try {
            arcs = planArcs(dev.lastKnownState as MigrationState, target, flags);
          } catch {
            continue; // a blocked walk (stop-copy -> pre-copy): refused before any SET
          }
          for (const arc of arcs) {
            const before = dev.dataSession;
            const opened = await dev.stepTo(arc.to);
            arcsChecked++;
            if ((opened !== null) !== arcOpensDataFd(arc.from, arc.to)) return false;
            // A save session lives exactly while the device stays in the saving group.
            const session = dev.dataSession;
            if (before && !opened && (session === before) !== SAVING_STATES.includes(arc.to)) return false;
            if (session && session.direction === 'save') {
              const ok = await dev.precopyInfo().then(() => true, () => false);
              if (ok !== PRECOPY_STATES.includes(arc.to)) return false;
            }
          }
        }
        return true;
      } finally {
        await dev.close();
      }
    }),
    { numRuns: 40 },
  );
  t.true(arcsChecked > 40);
});
