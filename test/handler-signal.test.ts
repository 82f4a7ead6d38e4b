// Cancellation reaches handlers through ctx.signal on both sides: a cancelled
// or failed migration aborts a hook's pending work, and the hooks that roll
// back get a live signal (their work must finish). Source and destination run
// in this process over a unix socket, each with a mock NIC and a handler that
// holds one hook until its signal aborts.
import test from 'ava';
import { MigrationSource } from '../src/migration/source.js';
import { MigrationDestination } from '../src/migration/destination.js';
import { MigrationError } from '../src/migration/errors.js';
import type { HandlerContext, PendingBytes, SectionDescription, StateHandler } from '../src/migration/handler.js';
import { sourceSide } from './harness.js';

type Hook = 'saveSetup' | 'saveQuiesce' | 'saveStop' | 'loadSetup' | 'loadFinish';

/** A section without data that holds `hold` until its ctx.signal aborts, and notes the signal every hook got. */
class HoldingHandler implements StateHandler {
  /** Each hook called, and whether its signal was aborted when it was called. */
  readonly calls: { hook: string; abortedAtCall: boolean }[] = [];
  /** The reason the held hook's signal gave, once it aborted. */
  abortReason: unknown = undefined;
  readonly entered: Promise<void>;
  #enter!: () => void;
  readonly #hold: Hook | null;

  constructor(hold: Hook | null) {
    this.#hold = hold;
    this.entered = new Promise((resolve) => (this.#enter = resolve));
  }

  describe(): SectionDescription {
    return { id: 'holding-0', kind: 'test', compat: 'holding:1' };
  }

  async #hook(hook: string, ctx: HandlerContext): Promise<void> {
    this.calls.push({ hook, abortedAtCall: ctx.signal.aborted });
    if (hook !== this.#hold) return;
    this.#enter();
    // Pending work that only the signal ends (as a device arc walk would be).
    await new Promise<void>((_, reject) => {
      const aborted = () => {
        this.abortReason = ctx.signal.reason;
        reject(ctx.signal.reason);
      };
      if (ctx.signal.aborted) aborted();
      else ctx.signal.addEventListener('abort', aborted, { once: true });
    });
  }

  saveSetup(ctx: HandlerContext) {
    return this.#hook('saveSetup', ctx);
  }
  async pending(): Promise<PendingBytes> {
    return { precopyBytes: 0, stopcopyBytes: 0, exact: true };
  }
  async savePrecopy() {
    return 0;
  }
  saveQuiesce(ctx: HandlerContext) {
    return this.#hook('saveQuiesce', ctx);
  }
  saveStop(ctx: HandlerContext) {
    return this.#hook('saveStop', ctx);
  }
  async saveComplete() {
    return 0;
  }
  saveCleanup(outcome: 'completed' | 'failed', ctx: HandlerContext) {
    return this.#hook(`saveCleanup:${outcome}`, ctx);
  }
  loadSetup(ctx: HandlerContext) {
    return this.#hook('loadSetup', ctx);
  }
  async load() {}
  loadFinish(ctx: HandlerContext) {
    return this.#hook('loadFinish', ctx);
  }
  loadCleanup(outcome: 'completed' | 'failed', ctx: HandlerContext) {
    return this.#hook(`loadCleanup:${outcome}`, ctx);
  }
}

const nic = { mock: [['nic-vf', 1]] as [string, number][], overrides: { stateBytes: '1MiB', dirtyWorkingSetBytes: '256KiB', arcLatencyMs: { default: 2 } } };
let sockets = 0;

async function pair(t: { teardown(fn: () => Promise<void>): void }, holds: { source: Hook | null; destination: Hook | null }, parameters: Record<string, number> = {}, capabilities: Record<string, boolean> = {}) {
  const dstSide = await sourceSide(nic);
  dstSide.vm.running = false;
  const dstHolding = new HoldingHandler(holds.destination);
  const dest = new MigrationDestination({ handlers: [dstHolding, ...dstSide.handlers], vm: dstSide.vm });
  const uri = await dest.listen(`unix:/tmp/vfio-mig-signal-${process.pid}-${++sockets}.sock`);
  const srcSide = await sourceSide(nic);
  const srcHolding = new HoldingHandler(holds.source);
  const src = new MigrationSource({ handlers: [srcHolding, ...srcSide.handlers], vm: srcSide.vm, parameters: { 'downtime-limit': 2000, 'x-assumed-p2p-arc-ms': 5, ...parameters }, capabilities });
  t.teardown(async () => {
    await dest.close();
    await dstSide.close();
    await srcSide.close();
  });
  return { dest, uri, src, srcSide, dstSide, srcHolding, dstHolding };
}

test.serial('source: a cancel aborts a hook pending in the switchover through ctx.signal; the rollback hooks get a live signal', async (t) => {
  const { dest, uri, src, srcSide, srcHolding } = await pair(t, { source: 'saveQuiesce', destination: null });
  const incoming = dest.incoming().catch((err: unknown) => err);
  void srcHolding.entered.then(() => src.cancel('cancelled by the test'));
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  t.is(err?.code, 'ERR_MIGRATION_CANCELLED');
  t.is((srcHolding.abortReason as MigrationError | undefined)?.code, 'ERR_MIGRATION_CANCELLED', 'the pending hook saw the cancel as its signal reason');
  t.deepEqual(
    srcHolding.calls.map((c) => `${c.hook}${c.abortedAtCall ? ' (aborted)' : ''}`),
    ['saveSetup', 'saveQuiesce', 'saveCleanup:failed'],
    'every hook got a live signal when called, the rollback included',
  );
  t.true(srcSide.vm.running);
  t.is(await srcSide.devices[0]!.getState(), 'running');
  t.is(((await incoming) as MigrationError).code, 'ERR_MIGRATION_CANCELLED');
});

test.serial('source: a failure (switchover-abort past its bound) aborts a hook pending in the switchover through ctx.signal', async (t) => {
  const { dest, uri, src, srcSide, srcHolding } = await pair(t, { source: 'saveStop', destination: null }, { 'downtime-limit': 500, 'switchover-limit': 100 }, { 'switchover-abort': true });
  const incoming = dest.incoming().catch((err: unknown) => err);
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  t.is(err?.code, 'ERR_MIGRATION_SWITCHOVER_ABORTED', err?.message);
  t.is((srcHolding.abortReason as MigrationError | undefined)?.code, 'ERR_MIGRATION_SWITCHOVER_ABORTED');
  t.deepEqual(srcHolding.calls.at(-1), { hook: 'saveCleanup:failed', abortedAtCall: false });
  t.true(srcSide.vm.running);
  t.is(await srcSide.devices[0]!.getState(), 'running');
  await incoming;
});

test.serial('destination: a cancel (incoming signal) aborts a hook pending before the commit through ctx.signal; the source rolls back', async (t) => {
  const { dest, uri, src, srcSide, dstSide, dstHolding } = await pair(t, { source: null, destination: 'loadFinish' });
  const ac = new AbortController();
  const incoming = dest.incoming({ signal: ac.signal }).catch((err: unknown) => err);
  void dstHolding.entered.then(() => ac.abort('cancelled by the test'));
  const err = await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  t.true(['ERR_MIGRATION_CANCELLED', 'ERR_MIGRATION_DESTINATION'].includes(err!.code), `${err?.code}: ${err?.message}`);
  const destErr = (await incoming) as MigrationError;
  t.is(destErr.code, 'ERR_MIGRATION_CANCELLED');
  t.is((dstHolding.abortReason as MigrationError | undefined)?.code, 'ERR_MIGRATION_CANCELLED');
  t.deepEqual(
    dstHolding.calls.map((c) => `${c.hook}${c.abortedAtCall ? ' (aborted)' : ''}`),
    ['loadSetup', 'loadFinish', 'loadCleanup:failed'],
    'the reset got a live signal',
  );
  t.false(dstSide.vm.running);
  t.is(await dstSide.devices[0]!.getState(), 'running', 'reset after the cancel');
  t.true(srcSide.vm.running);
  t.is(await srcSide.devices[0]!.getState(), 'running');
});

test.serial('destination: one hook failing in a parallel step aborts the others pending in it, at once', async (t) => {
  const { dest, uri, src, srcSide, dstSide, dstHolding } = await pair(t, { source: null, destination: 'loadFinish' });
  // The NIC's loadFinish fails (its data was never validated by this handler's standards).
  const nicHandler = dest.handlers[1]!;
  nicHandler.loadFinish = async () => {
    await dstHolding.entered;
    throw new MigrationError('ERR_MIGRATION_DEVICE', 'nic-vf-0: refused the state by the test');
  };
  const incoming = dest.incoming().catch((err: unknown) => err);
  await t.throwsAsync(src.migrate(uri), { instanceOf: MigrationError });
  const destErr = (await incoming) as MigrationError;
  t.is(destErr.code, 'ERR_MIGRATION_DEVICE', destErr.message);
  t.is((dstHolding.abortReason as MigrationError | undefined)?.code, 'ERR_MIGRATION_DEVICE', 'the sibling hook was aborted with the failure');
  t.deepEqual(dstHolding.calls.at(-1), { hook: 'loadCleanup:failed', abortedAtCall: false });
  t.true(srcSide.vm.running);
  t.false(dstSide.vm.running);
});
