#!/usr/bin/env bash
# The mock SAN's snapshot time against LUN size: on an array made by `backupctl san init` (in
# DIR where its filesystem reflinks, else in a loop-mounted XFS image), each LUN a sparse file
# with random data written in 1 MiB pieces (so the clone has extents to share), snapshotted RUNS
# times with `backupctl san snapshot` (the array's own call, as an agent makes it inside a
# freeze). Two layouts per size: 1/FRACTION of the LUN written (extents grow with the size), and
# PIECES pieces spread over it whatever its size. For contrast, the copy that snapshots used to
# be on a filesystem that cannot reflink (ext4, made here on a loop device): `cp --sparse=always`
# and an fsync, what the old sparse copy did, for the small sizes. Prints a table. Run as root.
# Usage: bench/README.md.
#
#   bench/san-snapshot.sh
#   SIZES="64M 1G" COPY_SIZES="64M" RUNS=3 WORK=/scratch/san-bench bench/san-snapshot.sh
#   BUILD=0 bench/san-snapshot.sh    # reuse target/debug/backupctl as it is
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SIZES=${SIZES:-"64M 256M 1G 4G 16G"}
COPY_SIZES=${COPY_SIZES:-"64M 256M 1G"}
FRACTION=${FRACTION:-8}
PIECES=${PIECES:-32}
RUNS=${RUNS:-5}
WORK=${WORK:-/var/tmp/stillpoint-san-bench}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/debug/backupctl

[ "$(id -u)" = 0 ] || { echo "san-snapshot.sh: run as root (it mounts an XFS image and an ext4 scratch filesystem)" >&2; exit 2; }
for tool in mkfs.xfs mkfs.ext4 filefrag python3 mountpoint; do
  command -v "$tool" >/dev/null || { echo "san-snapshot.sh: $tool not found (xfsprogs, e2fsprogs, python3, util-linux)" >&2; exit 2; }
done
if [ "${BUILD:-1}" = 1 ]; then
  echo "== building backupctl" >&2
  cargo build --quiet -p backupctl >&2
fi
[ -x "$BIN" ] || { echo "san-snapshot.sh: $BIN missing (BUILD=0 needs a build)" >&2; exit 2; }

bytes() { # 64M -> 67108864
  python3 -c 'import sys; s=sys.argv[1]; u={"K":10,"M":20,"G":30,"T":40}; print(int(s[:-1]) << u[s[-1]] if s[-1] in u else int(s))' "$1"
}

cleanup() {
  mountpoint -q "$WORK/array" 2>/dev/null && "$BIN" san umount "$WORK/array" >/dev/null 2>&1 || true
  mountpoint -q "$WORK/ext4" 2>/dev/null && umount "$WORK/ext4" || true
  rm -rf "$WORK"
}
cleanup
trap cleanup EXIT
mkdir -p "$WORK"

# Writes 1 MiB of random bytes every STEP bytes of FILE, from its start, then syncs it.
fill() { # fill FILE STEP
  python3 - "$1" "$2" <<'PY'
import os, sys
path, step = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
mib = 1 << 20
with open(path, "r+b") as f:
    for off in range(0, size, step):
        f.seek(off)
        f.write(os.urandom(min(mib, size - off)))
    f.flush()
    os.fsync(f.fileno())
PY
}

uncache() { # drops the files' clean pages from the page cache
  python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"
}

extents() { filefrag -v "$1" | grep -cE '^ *[0-9]+:'; }

median_max() { # values in us on stdin -> "median max" in ms
  sort -n | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "%.1f %.1f", m/1000, v[NR]/1000}'
}

echo "== array: backupctl san init $WORK/array" >&2
"$BIN" san init "$WORK/array" --image-size 64G >"$WORK/init.txt"
ARRAY_FS=$(stat -f -c %T "$WORK/array")
if mountpoint -q "$WORK/array"; then HOW="an XFS image (reflink=1) loop-mounted on $(stat -f -c %T "$WORK")"; else HOW="the directory itself ($ARRAY_FS)"; fi

# Snapshots LUN RUNS times (each deleted after, untimed); prints "median max" in ms.
snapshots() { # snapshots LUN
  : > "$WORK/took.txt"
  for i in $(seq 1 "$RUNS"); do
    "$BIN" san snapshot --array "$WORK/array" --backup "bench-$i" --server bench --lun "$1" --json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["took_us"])' >>"$WORK/took.txt"
    "$BIN" san delete --array "$WORK/array" --backup "bench-$i" --server bench >/dev/null
  done
  median_max <"$WORK/took.txt"
}

declare -A SNAP SNAP_P COPY COPY_COLD EXT EXT_P DATA DATA_P
for size in $SIZES; do
  for layout in fraction pieces; do
    lun="lun-$size-$layout"
    path=$("$BIN" san create-lun --array "$WORK/array" --server bench --lun "$lun" --size "$size")
    if [ "$layout" = fraction ]; then step=$((FRACTION << 20)); else step=$(($(bytes "$size") / PIECES)); fi
    echo "== $size LUN, 1 MiB written every $((step >> 10)) KiB: $RUNS snapshots" >&2
    fill "$path" "$step"
    ext=$(extents "$path")
    data=$(($(du -B1 "$path" | cut -f1) >> 20))
    took=$(snapshots "$lun")
    if [ "$layout" = fraction ]; then
      EXT[$size]=$ext DATA[$size]=$data SNAP[$size]=$took
    else
      EXT_P[$size]=$ext DATA_P[$size]=$data SNAP_P[$size]=$took
    fi
    rm -f "$path"
  done
done

# The old path: a whole sparse copy, on a filesystem that cannot reflink.
copy_total=0
for size in $COPY_SIZES; do copy_total=$((copy_total + 2 * $(bytes "$size"))); done
truncate -s $((copy_total + (512 << 20))) "$WORK/ext4.img"
mkfs.ext4 -q -F "$WORK/ext4.img"
mkdir -p "$WORK/ext4"
mount -o loop "$WORK/ext4.img" "$WORK/ext4"
mkdir -p "$WORK/ext4/array/luns/bench" "$WORK/ext4/array/snapshots"
echo '{"format": 1}' >"$WORK/ext4/array/stillpoint-array.json"
for size in $COPY_SIZES; do
  src="$WORK/ext4/array/luns/bench/lun-$size.lun"
  truncate -s "$size" "$src"
  echo "== $size LUN on ext4, 1/$FRACTION written: copying it $RUNS times" >&2
  fill "$src" $((FRACTION << 20))
  for cache in warm cold; do
    : > "$WORK/took.txt"
    for i in $(seq 1 "$RUNS"); do
      dst="$WORK/ext4/copy-$i"
      # Cold: the LUN's pages, and the ext4 image's under them, dropped from the page cache
      # (only these files', so nothing else on the machine is disturbed).
      [ "$cache" = cold ] && uncache "$src" "$WORK/ext4.img"
      t0=$(date +%s%N)
      cp --reflink=never --sparse=always "$src" "$dst"
      sync "$dst"
      t1=$(date +%s%N)
      echo $(((t1 - t0) / 1000)) >>"$WORK/took.txt"
      rm -f "$dst"
    done
    if [ "$cache" = warm ]; then COPY[$size]=$(median_max <"$WORK/took.txt"); else COPY_COLD[$size]=$(median_max <"$WORK/took.txt"); fi
  done
done
# What the array says now on such a filesystem (an array made before snapshots had to clone).
REFUSED=$("$BIN" san snapshot --array "$WORK/ext4/array" --backup b --server bench --lun "lun-${COPY_SIZES%% *}" 2>&1 || true)

echo
echo "mock SAN snapshot time against LUN size, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "array: $HOW; LUNs sparse, random data written in 1 MiB pieces and synced"
echo "snapshot: backupctl san snapshot (FICLONE, fsync, chmod, rename, fsync of the dir), $RUNS runs per LUN, each deleted after"
echo "old copy: cp --reflink=never --sparse=always + fsync on ext4 (the old sparse copy), $RUNS runs with the page cache warm, $RUNS cold"
echo
echo "| LUN size | 1/$FRACTION written: MiB, extents | reflink snapshot ms (median / max) | $PIECES pieces written: MiB, extents | reflink snapshot ms (median / max) | old copy on ext4, 1/$FRACTION written, ms (median / max), warm; cold |"
echo "|---|---|---|---|---|---|"
for size in $SIZES; do
  read -r sm sx <<<"${SNAP[$size]}"
  read -r pm px <<<"${SNAP_P[$size]}"
  if [ -n "${COPY[$size]:-}" ]; then
    read -r cm cx <<<"${COPY[$size]}"
    read -r dm dx <<<"${COPY_COLD[$size]}"
    copy="$cm / $cx; $dm / $dx"
  else
    copy="-"
  fi
  printf '| %s | %s, %s | %s / %s | %s, %s | %s / %s | %s |\n' "$size" "${DATA[$size]}" "${EXT[$size]}" "$sm" "$sx" \
    "${DATA_P[$size]}" "${EXT_P[$size]}" "$pm" "$px" "$copy"
done
echo
echo "the array on ext4 now: $REFUSED"
