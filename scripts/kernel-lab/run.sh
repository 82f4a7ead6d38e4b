#!/usr/bin/env bash
# Boot the kernel lab: a tiny 6.12 kernel with the real VFIO mtty migration
# driver, under qemu (TCG unless /dev/kvm is usable), running one node entry.
#
#   scripts/kernel-lab/run.sh [options]
#
#   --payload DIR    directory copied to /lab in the guest (default: an empty
#                    directory, which is enough for the probe entry)
#   --repo-payload   assemble the payload from this repo instead: package.json,
#                    build/Release/*.node, the mock addon (mock-device/
#                    package.json and build/Release/*.node), dist/,
#                    node_modules/node-gyp-build (whatever exists; nothing is built)
#   --with FILE      (repeatable) also copy FILE to /lab/extra/<basename>
#                    (only with --repo-payload or the default empty payload)
#   --entry FILE     node entry script (default: guest/probe.mjs). A path
#                    inside the payload dir is used in place; any other file is
#                    copied to /lab/<basename>.
#   --out DIR        output directory (default: <repo>/.kernel-lab-out)
#   --timeout SECS   host-side limit for the whole VM run (default: 600)
#   --mem MiB        guest memory (default: 1024)
#   --mtty-type T    mdev type to instantiate (default: mtty-2; or mtty-1)
#   --mdevs N        number of mtty instances (default: 2)
#   --append ARGS    extra kernel command-line arguments (NAME=value pairs
#                    without dots become environment variables of the entry)
#   --kvm            use -accel kvm -cpu host instead of TCG
#
# Outputs in the output dir: console.log (full serial console), result.json
# (the JSON line printed between the markers), initrd.img.
# Exit status: 0 result ok:true; 1 result ok:false; 2 no/invalid result
# (markers missing, JSON unparsable); 124 the VM hit --timeout.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO="$(cd "$KERNEL_LAB_DIR/../.." && pwd)"
PAYLOAD="" REPO_PAYLOAD=0 ENTRY="$KERNEL_LAB_DIR/guest/probe.mjs"
WITH=()
OUT="$REPO/.kernel-lab-out" TIMEOUT=600 MEM=1024 MTTY_TYPE=mtty-2 MDEVS=2 APPEND="" KVM=0
while [ $# -gt 0 ]; do
  case "$1" in
    --payload) PAYLOAD="$2"; shift 2 ;;
    --repo-payload) REPO_PAYLOAD=1; shift ;;
    --entry) ENTRY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --mem) MEM="$2"; shift 2 ;;
    --mtty-type) MTTY_TYPE="$2"; shift 2 ;;
    --mdevs) MDEVS="$2"; shift 2 ;;
    --append) APPEND="$2"; shift 2 ;;
    --kvm) KVM=1; shift ;;
    --with) WITH+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) lab_die "unknown argument: $1" ;;
  esac
done
T0=$(lab_now)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
lab_ensure_pkgs qemu-system-x86

# --- payload -----------------------------------------------------------------
if [ "$REPO_PAYLOAD" = 1 ]; then
  [ -z "$PAYLOAD" ] || lab_die "--payload and --repo-payload are exclusive"
  PAYLOAD="$OUT/payload"
  rm -rf "$PAYLOAD"; mkdir -p "$PAYLOAD"
  [ -f "$REPO/package.json" ] && cp "$REPO/package.json" "$PAYLOAD/"
  if compgen -G "$REPO/build/Release/*.node" >/dev/null; then
    mkdir -p "$PAYLOAD/build/Release"; cp "$REPO"/build/Release/*.node "$PAYLOAD/build/Release/"
  fi
  # The mock device's own addon, loaded by node-gyp-build from mock-device/.
  if compgen -G "$REPO/mock-device/build/Release/*.node" >/dev/null; then
    mkdir -p "$PAYLOAD/mock-device/build/Release"; cp "$REPO"/mock-device/build/Release/*.node "$PAYLOAD/mock-device/build/Release/"
    cp "$REPO/mock-device/package.json" "$PAYLOAD/mock-device/"
  fi
  [ -d "$REPO/dist" ] && cp -a "$REPO/dist" "$PAYLOAD/"
  if [ -d "$REPO/node_modules/node-gyp-build" ]; then
    mkdir -p "$PAYLOAD/node_modules"; cp -a "$REPO/node_modules/node-gyp-build" "$PAYLOAD/node_modules/"
  fi
elif [ -z "$PAYLOAD" ]; then
  PAYLOAD="$OUT/empty-payload"
  rm -rf "$PAYLOAD"; mkdir -p "$PAYLOAD"
fi
[ -d "$PAYLOAD" ] || lab_die "payload $PAYLOAD is not a directory"
if [ ${#WITH[@]} -gt 0 ]; then
  case "$PAYLOAD" in "$OUT"/*) ;; *) lab_die "--with needs --repo-payload or the default payload (it does not write into --payload dirs)" ;; esac
  mkdir -p "$PAYLOAD/extra"
  for f in "${WITH[@]}"; do
    if [ -f "$f" ]; then cp "$f" "$PAYLOAD/extra/"; else lab_log "--with $f: no such file, skipped"; fi
  done
fi
PAYLOAD="$(cd "$PAYLOAD" && pwd)"

# Guest path of the entry, relative to /lab.
if [ -f "$ENTRY" ]; then
  ENTRY_ABS="$(readlink -f "$ENTRY")"
  case "$ENTRY_ABS" in
    "$PAYLOAD"/*) GUEST_ENTRY="${ENTRY_ABS#"$PAYLOAD"/}" ;;
    *) GUEST_ENTRY="$(basename "$ENTRY_ABS")" ;;
  esac
elif [ -f "$PAYLOAD/$ENTRY" ]; then
  GUEST_ENTRY="$ENTRY"
else
  lab_die "entry $ENTRY not found (neither a file nor relative to the payload)"
fi
case "$GUEST_ENTRY" in *[[:space:]]*) lab_die "entry path must not contain spaces" ;; esac

# --- kernel + initramfs --------------------------------------------------------
T=$(lab_now)
KERNEL=$("$KERNEL_LAB_DIR/build-kernel.sh")
T_KERNEL=$(lab_elapsed "$T")
T=$(lab_now)
INITRD=$("$KERNEL_LAB_DIR/build-initramfs.sh" --payload "$PAYLOAD" --entry "$ENTRY" --out "$OUT/initrd.img")
T_INITRD=$(lab_elapsed "$T")

# --- boot --------------------------------------------------------------------------
# TCG by default (the documented lab setup); --kvm is opt-in because a
# present-but-unusable /dev/kvm (nested virt) makes qemu abort.
ACCEL=(-accel tcg)
if [ "$KVM" = 1 ]; then ACCEL=(-accel kvm -cpu host); fi
# The guest kills a hung entry itself (and still reports) before the host
# timeout kills qemu.
GUEST_TIMEOUT=$(( TIMEOUT > 60 ? TIMEOUT - 30 : TIMEOUT * 2 / 3 ))
CMDLINE="console=ttyS0 quiet panic=-1 KLAB_ENTRY=$GUEST_ENTRY KLAB_TIMEOUT=$GUEST_TIMEOUT KLAB_MTTY_TYPE=$MTTY_TYPE KLAB_MDEV_COUNT=$MDEVS $APPEND"
LOG="$OUT/console.log" RESULT="$OUT/result.json"
rm -f "$LOG" "$RESULT"
lab_log "booting qemu (${ACCEL[*]}, ${MEM} MiB, timeout ${TIMEOUT}s): entry /lab/$GUEST_ENTRY"
T=$(lab_now)
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 "${ACCEL[@]}" -nographic -no-reboot -m "$MEM" \
  -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" </dev/null >"$LOG" 2>&1
QEMU_RC=$?
set -e
T_BOOT=$(lab_elapsed "$T")

# --- result --------------------------------------------------------------------------
tr -d '\r' <"$LOG" | awk '
  /^===LAB-RESULT-BEGIN===$/ { inside = 1; next }
  /^===LAB-RESULT-END===$/   { if (inside) { found = 1; exit } }
  inside && NF { line = $0 }
  END { if (found) print line; else exit 3 }' >"$RESULT" || true

RC=0
if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
  lab_log "VM timed out after ${TIMEOUT}s"; RC=124
fi
if [ ! -s "$RESULT" ]; then
  rm -f "$RESULT"
  lab_log "no result between markers (qemu exit $QEMU_RC); console tail:"
  tr -d '\r' <"$LOG" | tail -25 >&2
  [ "$RC" = 0 ] && RC=2
else
  SUMMARY=$(node -e '
    let r;
    try { r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); }
    catch (e) { console.log(String(e.message)); process.exit(3); }
    const keys = Object.keys(r).filter((k) => k !== "ok").slice(0, 12);
    console.log(`ok=${r.ok} kernel=${r.kernel?.release ?? r.kernel ?? "?"} keys=${keys.join(",")}`);
    process.exit(r.ok === true ? 0 : 1);' "$RESULT" 2>&1) && OKRC=0 || OKRC=$?
  # /init logs "entry finished: exit N"; a non-zero exit fails the run even
  # if the entry printed ok:true.
  ENTRY_EXIT=$(tr -d '\r' <"$LOG" | sed -n 's/.*entry finished: \(exit\|signal\) \([0-9]*\).*/\1 \2/p' | tail -1)
  if [ "$OKRC" = 0 ] && [ "$ENTRY_EXIT" != "exit 0" ]; then
    lab_log "entry reported ok:true but finished with: ${ENTRY_EXIT:-unknown}"; OKRC=1
  fi
  if [ "$OKRC" = 0 ]; then :
  elif [ "$OKRC" = 1 ]; then [ "$RC" = 0 ] && RC=1
  else lab_log "result is not valid JSON: $SUMMARY"; [ "$RC" = 0 ] && RC=2
  fi
fi
{
  echo "kernel-lab summary"
  echo "  entry        /lab/$GUEST_ENTRY (payload $PAYLOAD)"
  echo "  kernel       $KERNEL (${T_KERNEL}s)"
  echo "  initramfs    $INITRD (${T_INITRD}s)"
  echo "  boot->exit   ${T_BOOT}s (qemu exit $QEMU_RC)"
  echo "  total        $(lab_elapsed "$T0")s"
  echo "  console      $LOG"
  if [ -f "$RESULT" ]; then echo "  result       $RESULT"; echo "  ${SUMMARY:-}"; fi
  echo "  status       $([ "$RC" = 0 ] && echo PASS || echo "FAIL ($RC)")"
} >&2
exit "$RC"
