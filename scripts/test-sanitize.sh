#!/usr/bin/env bash
# npm run test:sanitize: builds both addons (the production one and the mock
# device's, mock-device/) with AddressSanitizer and UndefinedBehaviorSanitizer
# (any UB report aborts: -fno-sanitize-recover) into a directory of its own
# (never ./build, which the normal build owns), loads them through
# VFIO_MIGRATION_ADDON and VFIO_MIGRATION_MOCK_ADDON (src/vfio/native.ts,
# src/vfio/mock-native.ts) and runs the addon-level unit tests under them;
# ends with "N passed, N failed".
#
# Needs g++ with libasan/libubsan (gcc-12 on Debian 12 brings libasan8 and
# libubsan1) and the Node headers (the node package's include/node, or
# node-gyp's download cache). Node itself is not instrumented: libasan is
# preloaded, and leak detection is off (node's own allocations at exit are
# not ours to judge).
set -uo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-g++}
out=${VFIO_SANITIZE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/vfio-sanitize.XXXXXX")}
mkdir -p "$out"
t0=$(date +%s)

node_version=$(node -p process.versions.node)
node_inc=""
for d in "$(dirname "$(command -v node)")/../include/node" "${npm_config_nodedir:-/nonexistent}/include/node" \
         "$HOME/.cache/node-gyp/$node_version/include/node" "/usr/include/node"; do
  if [ -f "$d/node_api.h" ]; then node_inc=$d; break; fi
done
if [ -z "$node_inc" ]; then
  echo "test:sanitize: no Node headers (node_api.h) found; install the node headers or run npm ci once (node-gyp caches them)"
  echo "0 passed, 1 failed"
  exit 1
fi
addon_inc=$(node -p "require('node-addon-api').include_dir")
libasan=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
  echo "test:sanitize: $CXX has no libasan.so (Debian: apt-get install libasan8 / gcc)"
  echo "0 passed, 1 failed"
  exit 1
fi

flags=(-std=c++17 -O1 -g -fPIC -fno-omit-frame-pointer
       -fsanitize=address,undefined,float-cast-overflow,float-divide-by-zero -fno-sanitize-recover=all
       -DNAPI_VERSION=8 -DNAPI_CPP_EXCEPTIONS -DBUILDING_NODE_EXTENSION
       -I"$node_inc" -I"$addon_inc" -Wall -Wno-unused-parameter -Wno-missing-field-initializers)
# The two addons' sources, as binding.gyp and mock-device/binding.gyp list them.
prod_sources=(native/addon.cc native/uapi.cc native/crc32c.cc native/kernel_backend.cc)
mock_sources=(mock-device/mock_addon.cc mock-device/mock_device.cc mock-device/mtty_mock.cc mock-device/profile_napi.cc native/uapi.cc)
echo "=== building both addons with ASan + UBSan in $out ==="
# build NAME SOURCES...: compiles into $out/NAME/ and links $out/NAME.node.
build() {
  local name=$1; shift
  mkdir -p "$out/$name"
  local pids=() src obj extra
  for src in "$@"; do
    obj="$out/$name/$(basename "${src%.cc}").o"
    extra=()
    # GCC 12 cannot constant-fold node-addon-api's function-pointer checks
    # (napi-inl.h CallJsWrapper) under -fsanitize=null and the nonnull checks;
    # ASan still reports a null dereference in those files.
    case "$src" in native/addon.cc|mock-device/mock_addon.cc|mock-device/profile_napi.cc) extra=(-fno-sanitize=null,nonnull-attribute,returns-nonnull-attribute) ;; esac
    "$CXX" "${flags[@]}" -DNODE_GYP_MODULE_NAME="$name" "${extra[@]}" -c "$src" -o "$obj" &
    pids+=($!)
    # Two at a time: the machines this runs on have two cores.
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || return 1; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p" || return 1; done
  "$CXX" -shared -fsanitize=address,undefined -o "$out/$name.node" "$out/$name"/*.o
}
build vfio_migration "${prod_sources[@]}" || { echo "build of the addon failed"; echo "0 passed, 1 failed"; exit 1; }
build vfio_migration_mock "${mock_sources[@]}" || { echo "build of the mock addon failed"; echo "0 passed, 1 failed"; exit 1; }
echo "built in $(( $(date +%s) - t0 ))s"

npx tsc -p . || { echo "tsc failed"; echo "0 passed, 1 failed"; exit 1; }

tests=(device mock-profile mtty-mock addon-hardening arc-planner states conformance wire)
files=()
for t in "${tests[@]}"; do files+=("dist/test/$t.test.js"); done
echo "=== unit tests under ASan + UBSan: ${tests[*]} ==="
t1=$(date +%s)
LD_PRELOAD="$libasan" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=0:${ASAN_OPTIONS:-}" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" \
VFIO_MIGRATION_ADDON="$out/vfio_migration.node" \
VFIO_MIGRATION_MOCK_ADDON="$out/vfio_migration_mock.node" \
  node scripts/run-tests.mjs "${files[@]}" --match '!*allocation failure on a worker*' --match '!*shipped profile gpu passes*'
# Left out: the test that makes the allocator fail under an address-space
# limit (ASan reserves terabytes of shadow, and its operator new reports a
# failed allocation instead of throwing), and the conformance run of the
# 2 GiB gpu profile (it reads gigabytes, minutes under ASan; the other
# profiles run the same checks).
status=$?
echo "test:sanitize: tests took $(( $(date +%s) - t1 ))s, $(( $(date +%s) - t0 ))s in all (exit $status)"
[ -z "${VFIO_SANITIZE_DIR:-}" ] && rm -rf "$out"
exit $status
