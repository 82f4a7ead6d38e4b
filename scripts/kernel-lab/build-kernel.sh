#!/usr/bin/env bash
# Build (or fetch from cache) the kernel-lab bzImage.
#
#   scripts/kernel-lab/build-kernel.sh [--force] [--config-only]
#
# * Extracts /usr/src/linux-source-6.12.tar.xz into $KERNEL_LAB_CACHE
#   (default ~/.cache/vfio-migration-kernel-lab), never into the repo.
# * Configures: make tinyconfig + kernel.config fragment (scripts/config)
#   + make olddefconfig, then verifies every fragment option took effect.
# * Builds bzImage with make -j$(nproc) in an out-of-tree object dir.
# * Caches the result under kernels/<key>/ where key = hash(source package
#   version, sha256(kernel.config)); a repeat run only hashes and returns.
#
# Progress goes to stderr; the absolute bzImage path is the only stdout line.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FORCE=0 CONFIG_ONLY=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --config-only) CONFIG_ONLY=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) lab_die "unknown argument: $a" ;;
  esac
done

T0=$(lab_now)
FRAGMENT="$KERNEL_LAB_DIR/kernel.config"
[ -f "$FRAGMENT" ] || lab_die "missing $FRAGMENT"

lab_ensure_pkgs "$KERNEL_LAB_SRC_PKG" build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils

SRC_VER=$(dpkg-query -W -f='${Version}' "$KERNEL_LAB_SRC_PKG")
TARBALL="/usr/src/$KERNEL_LAB_SRC_PKG.tar.xz"
[ -f "$TARBALL" ] || lab_die "missing $TARBALL (package $KERNEL_LAB_SRC_PKG $SRC_VER)"
FRAG_SHA=$(sha256sum "$FRAGMENT" | cut -d' ' -f1)
KEY=$(printf '%s\n%s\n%s\n' "$KERNEL_LAB_SRC_PKG" "$SRC_VER" "$FRAG_SHA" | sha256sum | cut -c1-16)

OUT="$KERNEL_LAB_CACHE/kernels/$KEY"
SRC_ROOT="$KERNEL_LAB_CACHE/src/$SRC_VER"
SRC="$SRC_ROOT/$KERNEL_LAB_SRC_PKG"
OBJ="$KERNEL_LAB_CACHE/obj/$SRC_VER"
mkdir -p "$KERNEL_LAB_CACHE/kernels" "$KERNEL_LAB_CACHE/src" "$KERNEL_LAB_CACHE/obj"

# One builder at a time per cache dir.
exec 9>"$KERNEL_LAB_CACHE/.lock"
flock 9

if [ "$FORCE" = 0 ] && [ "$CONFIG_ONLY" = 0 ] && [ -s "$OUT/bzImage" ] && [ -f "$OUT/.ok" ]; then
  lab_log "kernel cache hit: $KEY ($KERNEL_LAB_SRC_PKG $SRC_VER, fragment ${FRAG_SHA:0:12}) in $(lab_elapsed "$T0")s"
  echo "$OUT/bzImage"
  exit 0
fi

# --- extract ---------------------------------------------------------------
if [ ! -f "$SRC_ROOT/.extracted" ]; then
  T=$(lab_now)
  lab_log "extracting $TARBALL -> $SRC_ROOT"
  rm -rf "$SRC_ROOT"
  mkdir -p "$SRC_ROOT"
  tar -xJf "$TARBALL" -C "$SRC_ROOT"
  [ -f "$SRC/Makefile" ] || lab_die "unexpected tarball layout (no $SRC/Makefile)"
  touch "$SRC_ROOT/.extracted"
  lab_log "extracted in $(lab_elapsed "$T")s"
fi

# --- configure -------------------------------------------------------------
T=$(lab_now)
mkdir -p "$OBJ"
MAKE=(make -C "$SRC" O="$OBJ" ARCH=x86_64 -s)
"${MAKE[@]}" tinyconfig >/dev/null

CFG_ARGS=()
while IFS= read -r line; do
  line="${line%%#*}"; line="$(echo "$line" | tr -d '[:space:]')"
  [ -z "$line" ] && continue
  name="${line%%=*}"; val="${line#*=}"; name="${name#CONFIG_}"
  case "$val" in
    y) CFG_ARGS+=(--enable "$name") ;;
    n) CFG_ARGS+=(--disable "$name") ;;
    m) CFG_ARGS+=(--module "$name") ;;
    \"*\") v="${val#\"}"; CFG_ARGS+=(--set-str "$name" "${v%\"}") ;;
    *) CFG_ARGS+=(--set-val "$name" "$val") ;;
  esac
done <"$FRAGMENT"
"$SRC/scripts/config" --file "$OBJ/.config" "${CFG_ARGS[@]}"
"${MAKE[@]}" olddefconfig >/dev/null

# Verify: every option of the fragment must have survived olddefconfig.
bad=0
while IFS= read -r line; do
  line="${line%%#*}"; line="$(echo "$line" | tr -d '[:space:]')"
  [ -z "$line" ] && continue
  name="${line%%=*}"; val="${line#*=}"
  if [ "$val" = n ]; then
    if grep -q "^$name=" "$OBJ/.config"; then
      lab_log "config: $name should be unset but is: $(grep "^$name=" "$OBJ/.config")"; bad=1
    fi
  elif ! grep -qxF "$name=$val" "$OBJ/.config"; then
    got=$(grep -E "^($name=|# $name is not set)" "$OBJ/.config" || echo "absent (unmet dependency?)")
    lab_log "config: wanted $name=$val, got: $got"; bad=1
  fi
done <"$FRAGMENT"
[ "$bad" = 0 ] || lab_die "config fragment not fully applied; fix kernel.config dependencies"
lab_log "configured and verified ($(grep -c '=y$' "$OBJ/.config") options =y) in $(lab_elapsed "$T")s"

if [ "$CONFIG_ONLY" = 1 ]; then
  echo "$OBJ/.config"
  exit 0
fi

# --- build -----------------------------------------------------------------
T=$(lab_now)
JOBS=$(nproc)
lab_log "building bzImage with -j$JOBS (log: $OBJ/build.log)"
if ! make -C "$SRC" O="$OBJ" ARCH=x86_64 -j"$JOBS" bzImage >"$OBJ/build.log" 2>&1; then
  tail -40 "$OBJ/build.log" >&2
  lab_die "kernel build failed (full log: $OBJ/build.log)"
fi
BUILD_S=$(lab_elapsed "$T")
lab_log "bzImage built in ${BUILD_S}s"

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp "$OBJ/arch/x86/boot/bzImage" "$OBJ/.config" "$OUT.tmp/"
cp "$FRAGMENT" "$OUT.tmp/kernel.config"
{
  echo "source_package=$KERNEL_LAB_SRC_PKG"
  echo "source_version=$SRC_VER"
  echo "fragment_sha256=$FRAG_SHA"
  echo "kernel_release=$(cat "$OBJ/include/config/kernel.release" 2>/dev/null || echo unknown)"
  echo "build_seconds=$BUILD_S"
  echo "built_at=$(date -u +%FT%TZ)"
} >"$OUT.tmp/meta"
touch "$OUT.tmp/.ok"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
lab_log "kernel $KEY ready in $(lab_elapsed "$T0")s total: $OUT/bzImage ($(du -h "$OUT/bzImage" | cut -f1))"
echo "$OUT/bzImage"
