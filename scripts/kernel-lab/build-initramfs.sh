#!/usr/bin/env bash
# Build the kernel-lab initramfs.
#
#   scripts/kernel-lab/build-initramfs.sh --payload DIR --out FILE [--entry FILE]
#
# The image is two concatenated zstd-compressed newc cpio archives (the kernel
# unpacks them in order):
#   base    (cached in $KERNEL_LAB_CACHE/initramfs/): /init (guest/init.c,
#           gcc -static), /usr/bin/node + every shared library ldd reports,
#           /dev/console, empty mount points;
#   payload (rebuilt every time, small): DIR copied to /lab, plus the entry
#           script (copied to /lab/<basename> unless it already lives inside
#           DIR), plus the shared libraries needed by any *.node in DIR that
#           the base image does not already contain.
# /init runs `node /lab/<entry>`; the entry is chosen at boot by the
# KLAB_ENTRY=... kernel parameter (see run.sh), so --entry only makes sure the
# file is in the image.
#
# Progress goes to stderr; the output path is printed on stdout.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PAYLOAD="" OUTFILE="" ENTRY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --payload) PAYLOAD="$2"; shift 2 ;;
    --out) OUTFILE="$2"; shift 2 ;;
    --entry) ENTRY="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) lab_die "unknown argument: $1" ;;
  esac
done
[ -n "$PAYLOAD" ] && [ -d "$PAYLOAD" ] || lab_die "--payload DIR is required and must be a directory"
[ -n "$OUTFILE" ] || lab_die "--out FILE is required"
PAYLOAD="$(cd "$PAYLOAD" && pwd)"
[ -z "$ENTRY" ] || [ -f "$ENTRY" ] || [ -f "$PAYLOAD/$ENTRY" ] || lab_die "entry $ENTRY not found"

T0=$(lab_now)
lab_ensure_pkgs gcc libc6-dev cpio zstd
NODE_BIN="${KERNEL_LAB_NODE:-$(command -v node || true)}"
[ -n "$NODE_BIN" ] || lab_die "node not found (set KERNEL_LAB_NODE)"
NODE_BIN="$(readlink -f "$NODE_BIN")"

# Shared libraries (absolute paths as the loader sees them) of ELF files.
libs_of() {
  ldd "$@" 2>/dev/null | awk '
    /=> \// { print $3; next }
    /^[ \t]*\/[^ ]+ \(0x/ { print $1 }' | sort -u
}

# Copy path $1 into staging root $2 at the same absolute path, dereferenced.
stage_file() {
  local src="$1" root="$2"
  mkdir -p "$root$(dirname "$src")"
  cp -L "$src" "$root$src"
}

mkcpio() { # mkcpio STAGEDIR OUT
  (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | zstd -q -T0 -3 -f -o "$2"
}

# --- base image (cached) -----------------------------------------------------
INIT_C="$KERNEL_LAB_DIR/guest/init.c"
mapfile -t NODE_LIBS < <(libs_of "$NODE_BIN")
BASE_KEY=$( { sha256sum "$INIT_C" "$NODE_BIN" "${NODE_LIBS[@]}" | cut -d' ' -f1;
              echo "$NODE_BIN"; printf '%s\n' "${NODE_LIBS[@]}"; echo base-v1; } |
            sha256sum | cut -c1-16)
BASE="$KERNEL_LAB_CACHE/initramfs/base-$BASE_KEY.cpio.zst"
mkdir -p "$KERNEL_LAB_CACHE/initramfs"
if [ -s "$BASE" ]; then
  lab_log "initramfs base cache hit: $(basename "$BASE")"
else
  T=$(lab_now)
  ST=$(mktemp -d); trap 'rm -rf "$ST"' EXIT
  mkdir -p "$ST"/{dev,proc,sys,tmp,lab,usr/bin,etc}
  ln -s usr/bin "$ST/bin"
  gcc -static -O2 -Wall -Wno-format-truncation -Wno-restrict -Wno-unused-result \
    -o "$ST/init" "$INIT_C"
  strip "$ST/init"
  cp "$NODE_BIN" "$ST/usr/bin/node"
  for l in "${NODE_LIBS[@]}"; do stage_file "$l" "$ST"; done
  echo "root:x:0:0:root:/tmp:/bin/false" >"$ST/etc/passwd"
  echo "root:x:0:" >"$ST/etc/group"
  # /dev/console lets the kernel give /init a console before devtmpfs is up.
  if [ "$(id -u)" -eq 0 ]; then mknod -m 600 "$ST/dev/console" c 5 1; fi
  mkcpio "$ST" "$BASE.tmp"
  mv "$BASE.tmp" "$BASE"
  rm -rf "$ST"; trap - EXIT
  lab_log "initramfs base built in $(lab_elapsed "$T")s: $(du -h "$BASE" | cut -f1) ($(basename "$BASE"))"
fi

# --- payload image -------------------------------------------------------------
ST=$(mktemp -d); trap 'rm -rf "$ST"' EXIT
mkdir -p "$ST/lab"
cp -a "$PAYLOAD/." "$ST/lab/"
if [ -n "$ENTRY" ] && [ -f "$ENTRY" ]; then
  ENTRY_ABS="$(readlink -f "$ENTRY")"
  case "$ENTRY_ABS" in
    "$PAYLOAD"/*) ;;
    *) cp "$ENTRY_ABS" "$ST/lab/$(basename "$ENTRY_ABS")" ;;
  esac
fi
# Libraries needed by native addons that the base image lacks.
mapfile -t ADDONS < <(find "$ST/lab" -name '*.node' -type f)
if [ "${#ADDONS[@]}" -gt 0 ]; then
  while read -r l; do
    [ -n "$l" ] || continue
    printf '%s\n' "${NODE_LIBS[@]}" | grep -qxF "$l" && continue
    lab_log "adding addon dependency $l"
    stage_file "$l" "$ST"
  done < <(libs_of "${ADDONS[@]}")
fi
mkdir -p "$(dirname "$OUTFILE")"
mkcpio "$ST" "$OUTFILE.payload"
cat "$BASE" "$OUTFILE.payload" >"$OUTFILE.tmp"
rm -f "$OUTFILE.payload"
mv "$OUTFILE.tmp" "$OUTFILE"
lab_log "initramfs ready in $(lab_elapsed "$T0")s: $OUTFILE ($(du -h "$OUTFILE" | cut -f1), payload $(du -sh "$PAYLOAD" | cut -f1))"
echo "$(readlink -f "$OUTFILE")"
