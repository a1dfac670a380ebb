#!/usr/bin/env bash
# The full backup's peak RSS against the chunks it stores, past the sizes whose mkimage volumes
# and repositories fit this disk (issue 12: "peak RSS flat within 20% from 1 to 64 GiB"). The
# volume is an image where every 4 KiB block is a distinct chunk (a 256-byte random head, zeros
# after it: the index's worst case, twice the chunks of a mkimage volume of the same size), on
# a btrfs mounted with compress-force=zstd, so a 64 GiB image takes about 4.5 GB of disk and
# its repository about 6 GB. Each size: a fresh repository and cache, one full backup under
# /usr/bin/time. Not run by CI.
#
#   bench/index-memory.sh                                   # SIZES="1G 4G 16G 64G"
#   SIZES="1G 64G" BIN=/path/backupctl VS=/path/old-backupctl bench/index-memory.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZES=${SIZES:-1G 4G 16G 64G}
WORK=${WORK:-/tmp/stillpoint-index-memory}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BIN:-$TARGET_DIR/release/backupctl}
VS=${VS:-}
die() { echo "index-memory.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (a loop device and a mount)"
[ -x "$BIN" ] || die "$BIN not found: cargo build --release -p backupctl, or BIN=..."
[ -z "$VS" ] || [ -x "$VS" ] || die "VS=$VS is not an executable"
command -v mkfs.btrfs >/dev/null || die "mkfs.btrfs missing (btrfs-progs)"

mkdir -p "$WORK/mnt"
LOOPF=$WORK/btrfs.img
MNT=$WORK/mnt
cleanup() {
  mountpoint -q "$MNT" && umount "$MNT"
  [ -n "${LOOPDEV:-}" ] && losetup -d "$LOOPDEV"
  rm -f "$LOOPF"
}
trap cleanup EXIT
# Room for the largest image (about 1/14 of its size compressed) and the repositories (they
# live beside the loop file, not in it).
rm -f "$LOOPF"; truncate -s 12G "$LOOPF"
LOOPDEV=$(losetup --find --show "$LOOPF")
mkfs.btrfs -q -f "$LOOPDEV" > /dev/null 2>&1
mount -o compress-force=zstd:1 "$LOOPDEV" "$MNT"
echo pw > "$WORK/pw"

# image PATH SIZE -- every 4 KiB block distinct: 256 seeded random bytes, then zeros
image() {
  python3 - "$1" "$2" <<'EOF'
import random, sys
path, size = sys.argv[1], sys.argv[2]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
n = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
rng = random.Random(1)
block, piece = 4096, 256
with open(path, "wb") as f:
    buf = bytearray(block * piece)
    for at in range(0, n // block, piece):
        k = min(piece, n // block - at)
        for j in range(k):
            buf[j * block:j * block + 256] = rng.randbytes(256)
        f.write(memoryview(buf)[:k * block])
EOF
}

# backup TAG EXE IMG -- one full backup into a fresh repository; prints "seconds peak-KiB chunks"
backup() {
  local repo=$WORK/repo-$1 cache=$WORK/cache-$1 out
  rm -rf "$repo" "$cache"; mkdir -p "$cache"
  STILLPOINT_REPO=$repo STILLPOINT_REPO_PASSPHRASE_FILE=$WORK/pw STILLPOINT_CACHE_DIR=$cache \
    "$2" repo init > /dev/null
  sync
  STILLPOINT_REPO=$repo STILLPOINT_REPO_PASSPHRASE_FILE=$WORK/pw STILLPOINT_CACHE_DIR=$cache \
    /usr/bin/time -f "%e %M" -o "$WORK/time" \
    "$2" repo backup --json --backup full --server bench --volume disk "$3" > "$WORK/out.json"
  out=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["new_chunks"])' "$WORK/out.json")
  echo "$(cat "$WORK/time") $out"
  rm -rf "$repo" "$cache"
}

echo "index memory benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; every 4 KiB block a new chunk"
printf '%-6s %-9s %12s %10s %12s %8s\n' size binary "new chunks" seconds "peak RSS" "vs first"
declare -A FIRST
for size in $SIZES; do
  img=$MNT/disk-$size.img
  image "$img" "$size"
  sync
  for which in new ${VS:+old}; do
    exe=$BIN; [ "$which" = old ] && exe=$VS
    # Each backup starts from the same page cache: the image read once just before (at sizes
    # above the memory, its end is what stays cached), not whatever the last step left.
    cat "$img" > /dev/null
    out=$(backup "$which" "$exe" "$img") || die "$size: the full backup with $exe failed (its error is above)"
    read -r secs kib chunks <<< "$out"
    [ -n "${FIRST[$which]:-}" ] || FIRST[$which]=$kib
    ratio=$(awk -v a="$kib" -v b="${FIRST[$which]}" 'BEGIN { printf "%.2fx", a / b }')
    mib=$(awk -v k="$kib" 'BEGIN { printf "%.1f MiB", k / 1024 }')
    printf '%-6s %-9s %12s %10s %12s %8s\n' "$size" "$which" "$chunks" "$secs" "$mib" "$ratio"
  done
  rm -f "$img"
done
