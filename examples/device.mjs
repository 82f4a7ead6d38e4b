// The device API: save a device's state and restore it into another, by hand
// (the migration orchestrator does this for you; see migrate.mjs).
// Run: node examples/device.mjs   (mock devices: no kernel, no hardware)
import { pipeline } from 'node:stream/promises';
import { planArcs } from 'vfio-migration';
import { openMockDevice } from 'vfio-migration/testing';

// A real device opens the same way and has the same API:
//   import { VfioDevice } from 'vfio-migration';
//   const src = await VfioDevice.openKernel({ path: '/dev/vfio/devices/vfio3' });
const src = await openMockDevice({ profile: 'nic-vf', seed: 1 });
const dst = await openMockDevice({ profile: 'nic-vf', seed: 2 });
try {
  const flags = await src.migrationFlags(); // { stopCopy, p2p, preCopy }
  console.log('flags', flags);
  console.log('running -> stop-copy walks', planArcs('running', 'stop-copy', flags).map((a) => `${a.from}>${a.to}`).join(' '));

  // One SET per single arc, with hooks around each; the data fd comes back as a DataSession.
  const save = await src.stepTo('pre-copy', { onBeforeArc: (arc) => console.log('source: prepare', arc.to) });
  const resume = await dst.stepTo('resuming');
  if (!save || !resume) throw new Error('no data session');
  console.log('precopy info', await src.precopyInfo()); // { initialBytes, dirtyBytes } as bigint

  // Precopy: copy what the device has now, while it runs.
  let precopyBytes = 0;
  for (let r = await save.read(); r.kind === 'data'; r = await save.read()) {
    await resume.write(r.bytes);
    precopyBytes += r.bytes.length;
  }
  // Stop-copy: the rest, as streams (the data fd read off the event loop, with backpressure).
  await src.stepTo('stop-copy');
  await pipeline(save.createReadStream(), resume.createWriteStream());
  console.log(`copied ${precopyBytes} bytes in precopy, ${save.bytesTransferred - precopyBytes} at stop-copy`);

  await dst.stepTo('running'); // loads the state
  await src.stepTo('running'); // the source device runs again too (this example keeps both)
  const saved = src.mockInfo().savedDigest;
  const loaded = dst.mockInfo().loadedDigest;
  console.log(saved === loaded ? `state restored, digest ${loaded}` : `MISMATCH: saved ${saved}, loaded ${loaded}`);
  process.exitCode = saved === loaded ? 0 : 1;
} finally {
  await src.close();
  await dst.close();
}
