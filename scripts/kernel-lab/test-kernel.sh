#!/usr/bin/env bash
# npm run test:kernel: builds what is needed (TypeScript, both addons), boots the
# kernel lab with guest/lab.mjs (real mtty driver, see docs/kernel-lab.md),
# prints every lab check and ends with "N passed, N failed". Exit 0 only if
# every check passed.
#
#   scripts/kernel-lab/test-kernel.sh [--record] [run.sh options...]
#
#   --record   write the real driver's behaviour trace from this run to
#              test/fixtures/mtty-kernel-trace.json (the fixture that
#              test/mtty-mock.test.ts compares the mock against)
# Other options go to run.sh (e.g. --timeout 900, --kvm, --mtty-type mtty-1).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
FIXTURE=test/fixtures/mtty-kernel-trace.json
OUT=${KERNEL_LAB_OUT:-.kernel-lab-out}
RECORD=0 ARGS=()
for a in "$@"; do
  case "$a" in --record) RECORD=1 ;; *) ARGS+=("$a") ;; esac
done
fail() { echo "test:kernel: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

# --- build (incremental) ---------------------------------------------------------
gyp() { if command -v node-gyp >/dev/null 2>&1; then node-gyp "$@"; else npx --no-install node-gyp "$@"; fi; }
blog=$(mktemp)
if [ ! -f build/Makefile ] || [ binding.gyp -nt build/Makefile ]; then
  gyp configure >"$blog" 2>&1 || { tail -20 "$blog" >&2; fail "node-gyp configure failed"; }
fi
gyp build >"$blog" 2>&1 || { tail -30 "$blog" >&2; fail "addon build failed"; }
# The mock device's own addon (the lab compares the real mtty with its mtty personality).
if [ ! -f mock-device/build/Makefile ] || [ mock-device/binding.gyp -nt mock-device/build/Makefile ]; then
  gyp configure -C mock-device >"$blog" 2>&1 || { tail -20 "$blog" >&2; fail "node-gyp configure of the mock addon failed"; }
fi
gyp build -C mock-device >"$blog" 2>&1 || { tail -30 "$blog" >&2; fail "mock addon build failed"; }
npx --no-install tsc -p . >"$blog" 2>&1 || { tail -30 "$blog" >&2; fail "tsc failed"; }
rm -f "$blog"

# --- run ----------------------------------------------------------------------------
WITH=()
[ "$RECORD" = 0 ] && [ -f "$FIXTURE" ] && WITH=(--with "$FIXTURE")
bash scripts/kernel-lab/run.sh --repo-payload --entry scripts/kernel-lab/guest/lab.mjs --out "$OUT" "${WITH[@]}" "${ARGS[@]}"
RC=$?

# --- summary ------------------------------------------------------------------------------
PKG=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null || echo unknown)
node - "$OUT/result.json" "$RC" "$RECORD" "$FIXTURE" "$PKG" <<'JS'
const fs = require('fs');
const [file, rc, record, fixture, pkg] = process.argv.slice(2);
let r = null;
try { r = JSON.parse(fs.readFileSync(file, 'utf8')); } catch (e) { console.log(`no lab result (${e.message}); run.sh exit ${rc}`); }
if (!r || !Array.isArray(r.checks)) {
  if (r) console.log(`lab result without checks: ${JSON.stringify(r).slice(0, 600)}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
}
console.log(`kernel lab on Linux ${r.kernel?.release} (${r.mdevType}), ${r.labMs} ms in the guest:`);
for (const c of r.checks) console.log(`  ${c.ok ? 'ok  ' : 'FAIL'} ${c.name}${c.ok ? '' : `\n         ${c.detail}`}`);
for (const d of r.traceDiff ?? []) console.log(`  kernel vs mock: ${d}`);
for (const d of r.fixtureDiff ?? []) console.log(`  fixture vs kernel: ${d}`);
if (record === '1') {
  if (!r.trace) { console.log('--record: the lab produced no trace'); process.exitCode = 1; }
  else {
    const out = { description: 'Behaviour trace of the real kernel mtty driver (samples/vfio-mdev/mtty.c), recorded by the kernel lab (npm run test:kernel -- --record). The sequence is runBehaviourTrace in src/vfio/behaviour-trace.ts; test/mtty-mock.test.ts requires the mock mtty personality to reproduce it exactly.', kernel: r.trace.kernel, kernelPackage: `linux-source-6.12 ${pkg}`, driver: 'samples/vfio-mdev/mtty.c', mdevType: r.trace.mdevType, ports: r.trace.ports, node: r.node, trace: r.trace.trace };
    fs.writeFileSync(fixture, JSON.stringify(out, null, 1) + '\n');
    console.log(`recorded ${r.trace.trace.steps.length} steps to ${fixture}`);
  }
}
const failed = r.checks.filter((c) => !c.ok).length;
// The run failed without a failing check (timeout, entry exit, no checks at all).
const extra = (rc !== '0' || r.ok !== true) && failed === 0 ? 1 : 0;
if (extra) console.log(`  FAIL the lab run itself (run.sh exit ${rc}, ok ${r.ok})`);
console.log(`${r.checks.length - failed} passed, ${failed + extra} failed`);
if (failed + extra > 0) process.exitCode = 1;
JS
