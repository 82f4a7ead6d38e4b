// A TypeScript consumer of the package, type-checked under strict + NodeNext
// (test/package.test.ts, against the packed tarball): the README's snippets
// with their types, and what the types must refuse.
import {
  MigrationDestination,
  MigrationError,
  MigrationSource,
  VfioDevice,
  VfioError,
  VfioHandler,
  planArcs,
  type AnyMigrationEventRecord,
  type DataSession,
  type MigrationEventMap,
  type MigrationInfo,
  type StateHandler,
  type VmControl,
} from 'vfio-migration';
import { RamHandler, SyntheticVm, openMockDevice, runConformance, type ConformanceReport } from 'vfio-migration/testing';

export async function deviceSnippet(path?: string): Promise<bigint> {
  const dev: VfioDevice = path ? await VfioDevice.openKernel({ path }) : await openMockDevice({ profile: 'nic-vf' });
  try {
    const flags = await dev.migrationFlags();
    const arcs = planArcs('running', 'stop-copy', flags);
    const first: string = arcs[0]!.to;
    void first;
    const save: DataSession | null = await dev.stepTo('pre-copy', { onBeforeArc: (arc) => console.log('prepare', arc.to) });
    const { initialBytes, dirtyBytes } = await dev.precopyInfo();
    save?.createReadStream().resume();
    return initialBytes + dirtyBytes;
  } catch (err) {
    if (err instanceof VfioError) console.error(err.code, err.operation, err.stateAfter);
    throw err;
  } finally {
    await dev.close();
  }
}

export async function migrateSnippet(destination: string): Promise<MigrationInfo> {
  const vm: VmControl = new SyntheticVm(true); // your VMM: { stop(), resume(), running }
  const handlers: StateHandler[] = [new VfioHandler(await openMockDevice({ profile: 'nic-vf' })), new RamHandler({ sizeBytes: 1 << 20, vm })];
  const src = new MigrationSource({ handlers, vm, capabilities: { 'switchover-ack': true }, parameters: { 'downtime-limit': 300 } });
  // Typed events: the payload's type follows the event's name.
  src.on('VFIO_MIGRATION', (e) => console.log(e.device, e.state satisfies MigrationEventMap['VFIO_MIGRATION']['state']));
  src.once('MIGRATION_STALLED', (e, timestamp) => src.setParameters({ 'downtime-limit': e.suggestedDowntimeLimitMs + timestamp * 0 }));
  const onStatus = (e: MigrationEventMap['MIGRATION']) => console.log(e.status, e.reason?.code);
  src.on('MIGRATION', onStatus);
  src.off('MIGRATION', onStatus);
  src.on('event', (r: AnyMigrationEventRecord) => {
    if (r.event === 'SWITCHOVER_ACK') console.log(r.data.afterMs); // narrowed by the event's name
  });
  // @ts-expect-error: no such event
  src.on('MIGRATION_STALED', () => {});
  // @ts-expect-error: a VFIO_MIGRATION payload has no suggestedDowntimeLimitMs
  src.on('VFIO_MIGRATION', (e) => console.log(e.suggestedDowntimeLimitMs));
  try {
    return await src.migrate(destination, { channels: 2 });
  } catch (err) {
    if (err instanceof MigrationError && err.code === 'ERR_MIGRATION_OUTCOME_UNKNOWN') await src.resumeOnSource();
    throw err;
  }
}

export async function destinationSnippet(): Promise<void> {
  const dest = new MigrationDestination({ handlers: [new VfioHandler(await openMockDevice({ profile: 'nic-vf' }))], vm: new SyntheticVm(false) });
  await dest.listen('tcp:127.0.0.1:0');
  dest.on('MIGRATION_COMMITTED', (e) => console.log(e.afterStopMs));
  const result = await dest.incoming();
  console.log(result.status, result.downtimeMs);
  await dest.close();
}

export async function conformance(): Promise<ConformanceReport> {
  return runConformance({ name: 'serial', open: () => openMockDevice({ profile: 'serial' }) });
}
