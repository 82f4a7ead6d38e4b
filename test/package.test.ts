// The package as a VMM gets it: packed with its linux-x64 prebuild, installed
// into a scratch project with install scripts disabled (so no compiler runs),
// and used there through its two entry points only.
import test from 'ava';
import { spawn } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The documented runtime names of each entry point (README, "The API"): exactly these, nothing else. */
const MAIN_NAMES = [
  'DEFAULT_CAPABILITIES',
  'DEFAULT_PARAMETERS',
  'MIGRATION_STATES',
  'MigrationDestination',
  'MigrationError',
  'MigrationSource',
  'MigrationTlsError',
  'VfioDevice',
  'VfioError',
  'VfioHandler',
  'describeError',
  'exportArcHistory',
  'exportSwitchoverHistory',
  'importArcHistory',
  'importSwitchoverHistory',
  'ioctlChannel',
  'isMigrationState',
  'nextState',
  'planArcs',
  'supportedStates',
];
const TESTING_NAMES = ['CHECK_NAMES', 'PROFILES_DIR', 'RamHandler', 'SyntheticVm', 'listProfiles', 'loadProfile', 'openMockDevice', 'runConformance', 'validateProfile'];

/** The file names node-gyp-build looks for and `prebuildify --napi --strip --tag-libc` writes (the mock addon's with `--cwd mock-device`). */
const PREBUILD = path.join('prebuilds', 'linux-x64', 'vfio-migration.glibc.node');
const MOCK_PREBUILD = path.join('mock-device', 'prebuilds', 'linux-x64', 'vfio-migration-mock.glibc.node');
/** Each addon's build in this checkout and its prebuild. */
const ADDONS = [
  { built: path.join('build', 'Release', 'vfio_migration.node'), prebuild: PREBUILD },
  { built: path.join('mock-device', 'build', 'Release', 'vfio_migration_mock.node'), prebuild: MOCK_PREBUILD },
];

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], cwd: string): Promise<Run> {
  // Not npm's own environment when the suite runs under `npm test`: the
  // scratch project must see a plain shell's npm.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.toLowerCase().startsWith('npm_')));
  const p = spawn(cmd, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  p.stdout.on('data', (d) => (stdout += d));
  p.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve, reject) => {
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

let scratch = '';
let packedFiles: string[] = [];
/** Prebuilds this test wrote into the checkout: removed after, or node-gyp-build would load them in place of the next build. */
const madePrebuilds: string[] = [];
const installed = () => path.join(scratch, 'node_modules', 'vfio-migration');

test.before(async () => {
  // The prebuilds are the addons already built in this checkout, stripped as
  // prebuildify --strip does: `npm pack` runs prepack (a full prebuildify
  // rebuild of both) only with scripts, which this test leaves out to stay quick.
  for (const addon of ADDONS) {
    const built = path.join(repo, addon.built);
    const prebuild = path.join(repo, addon.prebuild);
    if (existsSync(built)) {
      await mkdir(path.dirname(prebuild), { recursive: true });
      const tmp = `${prebuild}.${process.pid}.tmp`;
      await copyFile(built, tmp);
      const strip = await run('strip', ['--strip-all', tmp], repo);
      if (strip.code !== 0) throw new Error(`strip failed: ${strip.stderr}`);
      await rename(tmp, prebuild);
      madePrebuilds.push(prebuild);
    } else if (!existsSync(prebuild)) throw new Error(`no addon: neither ${addon.built} nor ${addon.prebuild}`);
  }

  scratch = await mkdtemp(path.join(os.tmpdir(), 'vfio-migration-pack-'));
  const pack = await run('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', scratch], repo);
  if (pack.code !== 0) throw new Error(`npm pack failed: ${pack.stderr}`);
  const [packed] = JSON.parse(pack.stdout) as { filename: string; files: { path: string }[] }[];
  packedFiles = packed!.files.map((f) => f.path);
  const tarball = path.join(scratch, path.basename(packed!.filename));

  // A consumer with its own @types/node (the package's peer dependency), the version this repo uses (in the npm cache).
  const typesNode = JSON.parse(await readFile(path.join(repo, 'node_modules', '@types', 'node', 'package.json'), 'utf8')) as { version: string };
  const app = path.join(scratch, 'app');
  await mkdir(app);
  await writeFile(path.join(app, 'package.json'), JSON.stringify({ name: 'scratch-vmm', private: true, type: 'module', devDependencies: { '@types/node': typesNode.version } }, null, 2));
  const install = await run('npm', ['install', '--ignore-scripts', '--prefer-offline', '--no-audit', '--no-fund', tarball], app);
  if (install.code !== 0) throw new Error(`npm install failed: ${install.stderr}`);
  scratch = app;
  for (const f of ['device.mjs', 'migrate.mjs', 'consumer.ts']) await copyFile(path.join(repo, 'examples', f), path.join(app, f));
});

test.after.always(async () => {
  if (scratch) await rm(path.dirname(scratch), { recursive: true, force: true });
  for (const prebuild of madePrebuilds) await rm(prebuild, { force: true });
});

test('package: the tarball ships both prebuilds, the compiled library, the sources to build from and a LICENSE; no tests, no build tree', (t) => {
  for (const f of [PREBUILD, MOCK_PREBUILD, 'LICENSE', 'README.md', 'package.json', 'binding.gyp', 'dist/src/index.js', 'dist/src/index.d.ts', 'dist/src/testing.js', 'dist/src/testing.d.ts', 'dist/src/cli.js', 'native/addon.cc',
                   'mock-device/binding.gyp', 'mock-device/package.json', 'mock-device/mock_addon.cc', 'mock-device/mock_device.h'])
    t.true(packedFiles.includes(f), `${f} is packed`);
  t.deepEqual(packedFiles.filter((f) => f.startsWith('dist/test/') || f.startsWith('build/') || f.startsWith('mock-device/build/') || f.startsWith('src/') || f.startsWith('node_modules/')), []);
  t.true(packedFiles.some((f) => f.startsWith('mock-device/profiles/faults/')), 'the mock profiles (fault profiles too) are packed');
});

test('package: installed without install scripts, nothing was compiled and node-gyp-build loads both prebuilds', async (t) => {
  t.false(existsSync(path.join(installed(), 'build')), 'no build tree: no compiler ran');
  t.false(existsSync(path.join(installed(), 'mock-device', 'build')), 'no mock build tree: no compiler ran');
  const probe = `
    import { createRequire } from 'node:module';
    const require = createRequire(import.meta.url);
    const pkg = require.resolve('vfio-migration').replace(/\\/dist\\/src\\/index\\.js$/, '');
    console.log(JSON.stringify([require('node-gyp-build').resolve(pkg), require('node-gyp-build').resolve(pkg + '/mock-device')]));
  `;
  const r = await run(process.execPath, ['--input-type=module', '-e', probe], scratch);
  t.is(r.code, 0, r.stderr);
  t.deepEqual(JSON.parse(r.stdout), [path.join(installed(), PREBUILD), path.join(installed(), MOCK_PREBUILD)]);
  t.true((await stat(path.join(installed(), PREBUILD))).size > 0);
  t.true((await stat(path.join(installed(), MOCK_PREBUILD))).size > 0);
});

test('package: the mock device is its own addon: "." loads the production addon alone, which holds no mock code; ./testing loads the mock on its first device', async (t) => {
  const probe = `
    import { createRequire } from 'node:module';
    const require = createRequire(import.meta.url);
    const addons = () => Object.keys(require.cache).filter((k) => k.endsWith('.node')).map((k) => k.split('/node_modules/vfio-migration/')[1]).sort();
    const out = {};
    const main = await import('vfio-migration');
    out.main = addons();
    const testing = await import('vfio-migration/testing');
    await testing.loadProfile('nic-vf');
    out.testing = addons();
    const dev = await testing.openMockDevice({ profile: 'nic-vf', seed: 1 });
    out.flags = await dev.migrationFlags();
    out.digest = dev.mockInfo().digest.length > 0;
    await dev.close();
    out.opened = addons();
    console.log(JSON.stringify(out));
  `;
  const r = await run(process.execPath, ['--input-type=module', '-e', probe], scratch);
  t.is(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as Record<string, unknown>;
  t.deepEqual(out.main, [PREBUILD]);
  t.deepEqual(out.testing, [MOCK_PREBUILD, PREBUILD].sort(), 'validating a profile asks the mock addon (its field table and limits)');
  t.deepEqual(out.flags, { stopCopy: true, p2p: true, preCopy: true });
  t.true(out.digest);
  // No mock code is linked into the production addon: its class and symbol
  // names are hidden (-fvisibility=hidden) and stripped, so the check looks
  // for what the mock's code cannot do without: its class name as given to
  // JS, its profile fields' JSON names, the mtty personality's name.
  const production = await readFile(path.join(installed(), PREBUILD));
  const mock = await readFile(path.join(installed(), MOCK_PREBUILD));
  for (const name of ['MockHandle', 'dirtyWorkingSetBytes', 'stopCopyOnlyBytes', 'mtty']) {
    t.false(production.includes(name), `${name} is not in the production addon`);
    t.true(mock.includes(name), `the mock addon has ${name} (the check looks in the right place)`);
  }
});

test('package: "." and "./testing" export exactly the documented names; nothing else is importable', async (t) => {
  const probe = `
    const main = await import('vfio-migration');
    const testing = await import('vfio-migration/testing');
    const refused = {};
    for (const spec of ['vfio-migration/dist/src/vfio/native.js', 'vfio-migration/dist/src/migration/wire.js', 'vfio-migration/dist/src/migration/transport.js', 'vfio-migration/package.json', 'vfio-migration/testing/x']) {
      try { await import(spec); refused[spec] = null; } catch (err) { refused[spec] = err.code; }
    }
    console.log(JSON.stringify({ main: Object.keys(main).sort(), testing: Object.keys(testing).sort(), refused }));
  `;
  const r = await run(process.execPath, ['--input-type=module', '-e', probe], scratch);
  t.is(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { main: string[]; testing: string[]; refused: Record<string, string | null> };
  t.deepEqual(out.main, [...MAIN_NAMES].sort());
  t.deepEqual(out.testing, [...TESTING_NAMES].sort());
  for (const name of ['native', 'FrameReader', 'FrameWriter', 'slabStats', 'encodeFrame', 'parseUri']) {
    t.false(out.main.includes(name), `${name} is not exported`);
    t.false(out.testing.includes(name), `${name} is not exported from ./testing`);
  }
  for (const [spec, code] of Object.entries(out.refused)) t.is(code, 'ERR_PACKAGE_PATH_NOT_EXPORTED', spec);
});

test('package: the README device example runs against the installed package (a mock device saved and restored)', async (t) => {
  const r = await run(process.execPath, ['device.mjs'], scratch);
  t.is(r.code, 0, r.stdout + r.stderr);
  t.regex(r.stdout, /running -> stop-copy walks running>running-p2p running-p2p>stop stop>stop-copy/);
  t.regex(r.stdout, /state restored, digest [0-9a-f]{16}/);
});

test('package: the README migration example migrates a mock device between two processes', async (t) => {
  const r = await run(process.execPath, ['migrate.mjs'], scratch);
  t.is(r.code, 0, r.stdout + r.stderr);
  t.regex(r.stdout, /destination: completed/);
  t.regex(r.stdout, /source: completed, downtime [\d.]+ ms, VM running here: false, digests match/);
  t.regex(r.stdout, /source: nic-vf-1 pre-copy-p2p-prepare/);
});

test('package: a TypeScript consumer of the README snippets type-checks under strict + NodeNext (and the examples under checkJs)', async (t) => {
  await writeFile(
    path.join(scratch, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: { strict: true, module: 'NodeNext', moduleResolution: 'NodeNext', target: 'ES2022', noEmit: true, allowJs: true, checkJs: true, skipLibCheck: false },
      files: ['consumer.ts', 'device.mjs', 'migrate.mjs'],
    }),
  );
  const tsc = path.join(repo, 'node_modules', 'typescript', 'bin', 'tsc');
  const r = await run(process.execPath, [tsc, '-p', 'tsconfig.json'], scratch);
  t.is(r.code, 0, r.stdout + r.stderr);
  // The events are typed: without its @ts-expect-error lines the consumer fails on exactly those two listeners.
  const consumer = await readFile(path.join(scratch, 'consumer.ts'), 'utf8');
  const expectations = consumer.split('\n').filter((l) => l.includes('// @ts-expect-error'));
  t.is(expectations.length, 2);
  await writeFile(path.join(scratch, 'untyped.ts'), consumer.split('\n').filter((l) => !l.includes('// @ts-expect-error')).join('\n'));
  await writeFile(path.join(scratch, 'tsconfig.untyped.json'), JSON.stringify({ extends: './tsconfig.json', files: ['untyped.ts'] }));
  const bad = await run(process.execPath, [tsc, '-p', 'tsconfig.untyped.json'], scratch);
  t.not(bad.code, 0);
  const errors = bad.stdout.split('\n').filter((l) => /^untyped\.ts\(\d+,\d+\): error/.test(l));
  t.is(errors.length, 2, bad.stdout);
  t.regex(bad.stdout, /"MIGRATION_STALED"/);
  t.regex(bad.stdout, /suggestedDowntimeLimitMs/);
});

test('package: the README\'s snippets are excerpts of the examples that run above (same lines, same order)', async (t) => {
  const readme = await readFile(path.join(repo, 'README.md'), 'utf8');
  // A block quoting an example follows a line that links to it: "From [examples/x.mjs](examples/x.mjs)".
  const quoted = [...readme.matchAll(/From \[examples\/([\w.]+)\]\([^)]*\)[\s\S]*?```(?:js|ts)\n([\s\S]*?)```/g)];
  t.deepEqual(quoted.map((m) => m[1]).sort(), ['device.mjs', 'migrate.mjs']);
  for (const [, file, block] of quoted) {
    const lines = (await readFile(path.join(repo, 'examples', file!), 'utf8')).split('\n').map((l) => l.trim());
    let at = 0;
    for (const line of block!.split('\n').map((l) => l.trim())) {
      if (line === '' || line.startsWith('// ...')) continue; // a blank line, or a note on what the excerpt leaves out
      const found = lines.indexOf(line, at);
      t.true(found >= 0, `${file}: the README's line ${JSON.stringify(line)} is not in the example (after line ${at})`);
      if (found >= 0) at = found + 1;
    }
  }
});
