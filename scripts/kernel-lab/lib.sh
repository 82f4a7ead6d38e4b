# shellcheck shell=bash
# Shared helpers for the kernel-lab scripts (sourced, not executed).

KERNEL_LAB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KERNEL_LAB_CACHE="${KERNEL_LAB_CACHE:-$HOME/.cache/vfio-migration-kernel-lab}"
KERNEL_LAB_SRC_PKG="${KERNEL_LAB_SRC_PKG:-linux-source-6.12}"

lab_log() { printf '[kernel-lab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
lab_die() { lab_log "ERROR: $*"; exit 1; }

lab_now() { date +%s.%N; }
lab_elapsed() { awk -v a="$1" -v b="$(lab_now)" 'BEGIN { printf "%.1f", b - a }'; }

lab_sudo() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# lab_ensure_pkgs PKG... : install the Debian packages that are missing.
# `apt-get update` runs only when something actually has to be installed.
lab_ensure_pkgs() {
  local missing=() p
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  lab_log "installing missing packages: ${missing[*]}"
  lab_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  lab_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
