// Kernel-lab placeholder entry: proves the guest environment.
// Runs inside the qemu guest as `node /lab/probe.mjs` (started by /init) and
// prints ONE JSON line on stdout: kernel version, the mtty instances handed
// over by /init (KLAB_MDEVS), and whether /dev/vfio/vfio, /dev/iommu, each
// device cdev and each group node exist and open.
import fs from 'node:fs';
import os from 'node:os';

function tryOpen(path) {
  const r = { path };
  try {
    const st = fs.statSync(path);
    r.exists = true;
    r.char = st.isCharacterDevice();
    r.rdev = st.isCharacterDevice() ? `${Math.floor(st.rdev / 256)}:${st.rdev % 256}` : undefined;
  } catch (e) {
    r.exists = false;
    r.open = false;
    r.error = e.code ?? String(e);
    return r;
  }
  try {
    const fd = fs.openSync(path, fs.constants.O_RDWR);
    fs.closeSync(fd);
    r.open = true;
  } catch (e) {
    r.open = false;
    r.error = e.code ?? String(e);
  }
  return r;
}

function readSys(path) {
  try { return fs.readFileSync(path, 'utf8').trim(); } catch { return null; }
}

function listDir(path) {
  try { return fs.readdirSync(path).sort(); } catch { return null; }
}

const t0 = performance.now();
let mdevs = [];
try { mdevs = JSON.parse(process.env.KLAB_MDEVS ?? '[]'); } catch { /* reported below */ }

const typesDir = '/sys/class/mdev_bus/mtty/mdev_supported_types';
const types = (listDir(typesDir) ?? []).map((t) => ({
  type: t,
  name: readSys(`${typesDir}/${t}/name`),
  availableInstances: Number(readSys(`${typesDir}/${t}/available_instances`)),
  deviceApi: readSys(`${typesDir}/${t}/device_api`),
}));

const instances = mdevs.map((m) => ({
  ...m,
  driver: m.sysfs ? fs.readlinkSync(`${m.sysfs}/driver`).split('/').pop() : null,
  cdevOpen: m.cdev ? tryOpen(m.cdev) : null,
  groupOpen: m.group ? tryOpen(m.group) : null,
}));

const global = {
  container: tryOpen('/dev/vfio/vfio'),
  iommufd: tryOpen('/dev/iommu'),
};

const ok = instances.length >= 2 &&
  instances.every((i) => i.cdevOpen?.open && i.groupOpen?.open && !i.error) &&
  global.container.open && global.iommufd.open && !process.env.KLAB_SETUP_ERROR;

const result = {
  ok,
  entry: 'probe',
  kernel: { release: os.release(), version: os.version(), machine: os.machine() },
  node: process.version,
  uptimeSeconds: Number(readSys('/proc/uptime')?.split(' ')[0]),
  cpus: os.cpus().length,
  memMiB: Math.round(os.totalmem() / 2 ** 20),
  setupError: process.env.KLAB_SETUP_ERROR || null,
  mttyTypes: types,
  instances,
  devVfio: listDir('/dev/vfio'),
  devVfioDevices: listDir('/dev/vfio/devices'),
  ...global,
  probeMs: Math.round(performance.now() - t0),
};
console.log(JSON.stringify(result));
