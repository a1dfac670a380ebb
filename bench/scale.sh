#!/usr/bin/env bash
# The scale benchmark (issue 12, "Benchmark (not a test)"): at several sizes, in one run, the full
# backup, the incrementals (1% scattered, 5% in clusters of 16 blocks), the backup of an unchanged
# volume, the prune, the verify reading all data and the restore of stillpoint (without and with
# change tracking), restic and borg, and btrfs send | zstd for the backups; time, peak RSS, bytes
# and metadata bytes added; how each grows with the size; the issue's targets. Not run by CI.
# Usage, disk needs and what each figure means: bench/README.md.
#
#   bench/scale.sh                          # SIZES="1G 4G 16G", scratch in /tmp/stillpoint-scale
#   SIZES="256M 1G" WORK=/scratch bench/scale.sh
#   DRY_RUN=1 SIZES="1G 4G 16G 32G 64G" bench/scale.sh   # only the disk check: what would run
#   BUILD=0 TOOLS="stillpoint btrfs-send" bench/scale.sh
#   SIZES=32G TOOLS="stillpoint-cbt stillpoint" DROP_BEFORE_RESTORE=1 bench/scale.sh   # less disk
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MKIMAGE=${SHARED:-../shared}/bench/mkimage.py
SIZES=${SIZES:-1G 4G 16G}
WORK=${WORK:-/tmp/stillpoint-scale}
RESERVE=${RESERVE:-5G}
TOOLS=${TOOLS:-btrfs-send stillpoint stillpoint-cbt restic borg}
# DROP_BEFORE_RESTORE=1: only the last tool (stillpoint or stillpoint-cbt) restores, after the
# volume is deleted, checked against S3's hash taken before; the others' restores are skipped.
# The volume and the restore then never share the disk: a larger size fits.
DROP=${DROP_BEFORE_RESTORE:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BIN:-$TARGET_DIR/release/backupctl}
HELPER=$ROOT/bench/scale.py
PW=bench-passphrase
. "$ROOT/bench/lib.sh"

die() { echo "scale.sh: $*" >&2; exit 2; }
[ -f "$MKIMAGE" ] || die "$MKIMAGE not found (set SHARED=/path/to/shared)"
command -v python3 >/dev/null || die "python3 missing"
mkdir -p "$WORK"

gib() { awk -v b="$1" 'BEGIN { printf "%.1f GiB", b / 1073741824 }'; }
bytes_of() { python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import scale; print(scale.parse_size(sys.argv[2]))' "$ROOT/bench" "$1"; }
avail() { df -B1 --output=avail "$WORK" | tail -1 | tr -d ' '; }
RESERVE_B=$(bytes_of "$RESERVE")
NEED_ARGS=(--tools "$TOOLS")
LAST_TOOL=${TOOLS##* }
if [ "$DROP" = 1 ]; then
  case " $TOOLS " in
    *" restic "*|*" borg "*) die "DROP_BEFORE_RESTORE=1 is for stillpoint's tools (and btrfs-send): restic and borg restore too" ;;
  esac
  case $LAST_TOOL in
    stillpoint|stillpoint-cbt) ;;
    *) die "DROP_BEFORE_RESTORE=1: the last of TOOLS must be stillpoint or stillpoint-cbt (it restores)" ;;
  esac
  NEED_ARGS+=(--drop)
fi

# fits SIZE -- whether SIZE's peak disk use (scale.py need) plus RESERVE fits what df says is free
# where WORK lives now; says why not. Sizes run one after the other, each cleaned up before the
# next, so each is checked on its own, and again just before it runs (others use the disk too).
fits() {
  local need free
  need=$(python3 "$HELPER" need "${NEED_ARGS[@]}" "$1" | awk '{ print $3 }')
  free=$(avail)
  if [ $((need + RESERVE_B)) -le "$free" ]; then
    FIT_MSG="$1: needs $(gib "$need") + $(gib "$RESERVE_B") kept free; $(gib "$free") free in $WORK: runs"
    return 0
  fi
  FIT_MSG="$1: REFUSED: needs $(gib "$need") + $(gib "$RESERVE_B") kept free, but df says $(gib "$free") free in $WORK; run it on a bigger disk (WORK=...)"
  return 1
}

echo "== disk check (btrfs loop file 1.1x + 1 GiB, one repository 1.6x with restic or borg, 0.5x with stillpoint's alone (or a pruned one 0.6x / 0.45x and a restore 1x$([ "$DROP" = 1 ] && echo ', after the volume is dropped')), 1 GiB slack; RESERVE=$RESERVE kept free)" >&2
RUNNABLE=()
REFUSED_MSGS=()
for S in $SIZES; do
  if fits "$S"; then RUNNABLE+=("$S"); else REFUSED_MSGS+=("$FIT_MSG"); fi
  echo "   $FIT_MSG" >&2
done
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "DRY_RUN=1: would run ${RUNNABLE[*]:-nothing}" >&2
  exit 0
fi
[ ${#RUNNABLE[@]} -gt 0 ] || die "no size fits the disk"
[ "$(id -u)" = 0 ] || die "run as root (loop devices, btrfs, mount --bind, drop_caches)"

need restic restic
need borg borgbackup
need zstd zstd
need btrfs btrfs-progs
[ -x /usr/bin/time ] || need /usr/bin/time time

case " $TOOLS " in
  *" stillpoint"*)
    if [ "${BUILD:-1}" = 1 ]; then
      echo "== building backupctl (release)" >&2
      cargo build --release -p backupctl >&2
    fi
    [ -x "$BIN" ] || die "$BIN missing (BUILD=0 needs a release build)" ;;
esac

RUN=$WORK/run
MNT=$WORK/mnt     # the btrfs loop filesystem: vol/ (the subvolume), snap/S0..S3, bases-*/
SRC=$WORK/src     # restic and borg back up $SRC/disk.img: S0..S3 bind-mounted here in turn
OUTD=$WORK/restore
LOOPF=""; LOOPDEV=""
rm -rf "$RUN" "$OUTD"; mkdir -p "$RUN" "$MNT" "$SRC"
LOG=$RUN/log.txt
ROWS=$RUN/rows.tsv  # size_bytes label tool step wall_s rss_kb added meta rc note
SKIPPED=$RUN/skipped.txt
: > "$ROWS"; : > "$SKIPPED"
for m in "${REFUSED_MSGS[@]}"; do echo "$m" >> "$SKIPPED"; done
printf '%s\n' "$PW" > "$RUN/pw"

cleanup() {
  set +e
  mountpoint -q "$SRC" && umount "$SRC"
  mountpoint -q "$MNT" && umount "$MNT"
  [ -n "$LOOPDEV" ] && losetup -d "$LOOPDEV"
  [ -n "$LOOPF" ] && rm -f "$LOOPF"
  rm -rf "$OUTD" "$RUN"/repo-* "$RUN"/cache "$RUN"/send
}
trap cleanup EXIT

# measure TOOL STEP 'shell command' -- wall time, and peak RSS of the command or of its largest
# child (GNU time's %M: the maximum over the processes it waited for, not their sum)
measure() {
  local tool=$1 step=$2 cmd=$3 tf t0 t1 rc
  tf=$(mktemp)
  echo "### [$LABEL $tool $step] $cmd" >> "$LOG"
  t0=$(date +%s.%N)
  set +e
  /usr/bin/time -f %M -o "$tf" bash -c "set -o pipefail; $cmd" >> "$LOG" 2>&1
  rc=$?
  set -e
  t1=$(date +%s.%N)
  LAST_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  LAST_RSS=$(tail -1 "$tf")
  LAST_RC=$rc
  rm -f "$tf"
  printf '%-6s %-15s %-9s %8.2f s  rss %7s KB  rc %s\n' "$LABEL" "$tool" "$step" "$LAST_WALL" "$LAST_RSS" "$rc" >&2
}

# row TOOL STEP ADDED META NOTE -- records the last measurement
row() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$SZ" "$LABEL" "$1" "$2" "$LAST_WALL" \
    "$LAST_RSS" "$3" "$4" "$LAST_RC" "$5" >> "$ROWS"
}

# measure_restore TOOL CMD -- the restore, RESTORE_RUNS times (default 3), each into an empty
# $OUTD after dropping the page cache: LAST_WALL is the median, LAST_RSS the largest, LAST_RC the
# first failure's. A restore is the noisiest step here (the others write through the page cache
# and wait for writeback, so one run swings 2.6-3.7 s at 1 GiB) and the one with a ratio target.
measure_restore() {
  local tool=$1 cmd=$2 i walls=() rss=0 rc=0
  for i in $(seq 1 "${RESTORE_RUNS:-3}"); do
    rm -rf "$OUTD"; mkdir -p "$OUTD"
    cold
    measure "$tool" restore "$cmd"
    walls+=("$LAST_WALL")
    [ "${LAST_RSS:-0}" -gt "$rss" ] && rss=$LAST_RSS
    [ "$rc" = 0 ] && rc=$LAST_RC
  done
  LAST_WALL=$(printf '%s\n' "${walls[@]}" | sort -g | awk '{ w[NR] = $1 } END { print w[int((NR + 1) / 2)] }')
  LAST_RSS=$rss
  LAST_RC=$rc
}

du_b() { local t=0 d; for d in "$@"; do [ -e "$d" ] && t=$((t + $(du -sb "$d" | cut -f1))); done; echo "$t"; }
stored() { sync; du_b "$1"; }
same() { # same FILE REFERENCE -- the restored file equals the snapshot's image, bit for bit
  if cmp -s "$1" "$2"; then echo "identical, $(du -B1 "$1" | cut -f1) B allocated"; else echo "DIFFERENT from $2"; fi
}
same_hash() { # same_hash FILE SHA256 -- the restored file has the snapshot's hash (taken before the drop)
  if [ "$(sha256sum < "$1" | cut -d' ' -f1)" = "$2" ]; then
    echo "identical (sha256 of S3 taken before the volume was dropped), $(du -B1 "$1" | cut -f1) B allocated"
  else
    echo "DIFFERENT from S3 (sha256 $2)"
  fi
}
snapimg() { echo "$MNT/snap/S$1/disk.img"; }
STEP_OF=(full incr1 incr5 unchanged)

# ---- the volume: a btrfs subvolume on a loop device, read-only snapshots S0..S3 ---------------
make_volume() {
  local loop_b
  loop_b=$(python3 "$HELPER" need "$LABEL" | awk '{ print $2 }')
  LOOPF=$WORK/btrfs-$LABEL.img
  rm -f "$LOOPF"; truncate -s "$loop_b" "$LOOPF"
  LOOPDEV=$(losetup --find --show --direct-io=on "$LOOPF" 2>/dev/null || losetup --find --show "$LOOPF")
  mkfs.btrfs -q -f "$LOOPDEV" >> "$LOG"
  mount "$LOOPDEV" "$MNT"
  btrfs subvolume create "$MNT/vol" >> "$LOG"
  mkdir -p "$MNT/snap"
  echo "== $LABEL: mkimage create --size $LABEL --seed 1 (in a btrfs subvolume on $LOOPDEV)" >&2
  python3 "$MKIMAGE" create "$MNT/vol/disk.img" --size "$LABEL" --seed 1 >> "$LOG"
  btrfs subvolume snapshot -r "$MNT/vol" "$MNT/snap/S0" >> "$LOG"
  # Mutations write into the file (mkimage opens it r+b and rewrites blocks in place), so the
  # snapshots share every extent that was not rewritten, as a volume's snapshots do.
  python3 "$MKIMAGE" mutate "$MNT/vol/disk.img" --seed 2 --fraction 0.01 >> "$LOG"
  btrfs subvolume snapshot -r "$MNT/vol" "$MNT/snap/S1" >> "$LOG"
  python3 "$MKIMAGE" mutate "$MNT/vol/disk.img" --seed 3 --fraction 0.05 --cluster 16 >> "$LOG"
  btrfs subvolume snapshot -r "$MNT/vol" "$MNT/snap/S2" >> "$LOG"
  btrfs subvolume snapshot -r "$MNT/vol" "$MNT/snap/S3" >> "$LOG"
  sync
  SZ=$(stat -c %s "$(snapimg 0)")
  echo "$LABEL: image $SZ B, $(du -B1 "$(snapimg 0)" | cut -f1) B allocated; loop file $loop_b B" >> "$LOG"
}

drop_volume() {
  [ -n "$LOOPDEV" ] || return 0
  mountpoint -q "$SRC" && umount "$SRC"
  umount "$MNT"
  losetup -d "$LOOPDEV"; LOOPDEV=""
  rm -f "$LOOPF"; LOOPF=""
}

# ---- btrfs send | zstd: the full stream of S0, then each snapshot against the one before ------
run_btrfs_send() {
  local k prev out
  out=$RUN/send; mkdir -p "$out"
  for k in 0 1 2 3; do
    warm "$(snapimg "$k")"
    if [ "$k" = 0 ]; then
      measure btrfs-send full "btrfs send -q '$MNT/snap/S0' | zstd -1 -T0 -q > '$out/S0.zst'"
    else
      prev=$((k - 1))
      measure btrfs-send "${STEP_OF[$k]}" "btrfs send -q -p '$MNT/snap/S$prev' '$MNT/snap/S$k' | zstd -1 -T0 -q > '$out/S$k.zst'"
    fi
    row btrfs-send "${STEP_OF[$k]}" "$(stat -c %s "$out/S$k.zst")" - "send stream, zstd -1"
  done
  rm -rf "$out"
}

# ---- stillpoint (TOOL stillpoint: no change tracking; stillpoint-cbt: --base-dir) -------------
sp_meta() { du_b "$1/manifests" "$1/index"; }
sp_note() { # sp_note JSON-FILE -- what repo backup --json says it read, skipped and wrote
  python3 - "$1" <<'PY'
import json, sys
d = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
parts = []
if "bytes_read" in d:
    parts.append(f"read {d['bytes_read'] / 1048576:.1f} MiB")
if "bytes_skipped" in d:
    parts.append(f"skipped {d['bytes_skipped'] / 1048576:.1f} MiB")
if d.get("change_map"):
    parts.append(f"map: {d['change_map']}")
if "metadata_bytes" in d:
    parts.append(f"metadata_bytes {d['metadata_bytes']}")
if d.get("sample_mismatches"):
    parts.append(f"SAMPLE MISMATCHES {d['sample_mismatches']}")
print("; ".join(parts))
PY
}

run_stillpoint() {
  local tool=$1 repo=$RUN/repo-$1 base="" k step before mbefore ibefore meta img
  declare -A man=()
  if [ "$tool" = stillpoint-cbt ]; then
    if ! "$BIN" repo backup --help 2>&1 | grep -q -- '--base-dir'; then
      local why="stillpoint-cbt: skipped at every size: $BIN has no 'repo backup --base-dir' (change tracking, branch cbt, is not in this build)"
      grep -qxF "$why" "$SKIPPED" || echo "$why" | tee -a "$SKIPPED" >&2
      return
    fi
    # The base must be on the snapshots' filesystem: it is a reflink clone of the last snapshot.
    base="--base-dir '$MNT/bases-$LABEL'"
    rm -rf "$MNT/bases-$LABEL"; mkdir -p "$MNT/bases-$LABEL"
  fi
  export STILLPOINT_REPO=$repo STILLPOINT_REPO_PASSPHRASE_FILE=$RUN/pw STILLPOINT_CACHE_DIR=$RUN/cache/$tool
  "$BIN" repo init >> "$LOG" 2>&1
  for k in 0 1 2 3; do
    step=${STEP_OF[$k]}; img=$(snapimg "$k")
    before=$(stored "$repo"); mbefore=$(sp_meta "$repo"); ibefore=$(du_b "$repo/index")
    warm "$img"
    measure "$tool" "$step" "'$BIN' repo backup $base --json --backup $step --server bench --volume disk '$img' > '$RUN/$tool-$step.json'"
    cat "$RUN/$tool-$step.json" >> "$LOG"
    man[$step]=$(python3 "$HELPER" json-field "$RUN/$tool-$step.json" manifest)
    # Metadata: what the backup says it wrote (chunk list pages, stored in packs, and its
    # manifest) plus the index files' growth; manifests/ + index/ growth with an older build.
    meta=$(python3 "$HELPER" json-field "$RUN/$tool-$step.json" metadata_bytes 2>/dev/null || true)
    if [[ "$meta" =~ ^[0-9]+$ ]]; then
      meta=$((meta + $(du_b "$repo/index") - ibefore))
    else
      meta=$(($(sp_meta "$repo") - mbefore))
    fi
    row "$tool" "$step" $(($(stored "$repo") - before)) "$meta" "$(sp_note "$RUN/$tool-$step.json")"
  done
  # Forget the full and the 1% incremental (their volume manifests deleted, as forget does) and
  # prune; then verify and restore what is left, so the restore also shows the prune kept what S3
  # needs, and the disk holds the pruned repository beside the restore, not the whole one.
  # `repo backup` alone writes no backup manifest (the listener does, with the cut): verify and
  # restore are told to go ahead with the volume manifest alone.
  before=$(stored "$repo"); mbefore=$(sp_meta "$repo")
  measure "$tool" prune "rm -f '$repo/manifests/${man[full]}' '$repo/manifests/${man[incr1]}' && '$BIN' repo prune --grace 0 --json"
  row "$tool" prune $(($(stored "$repo") - before)) $(($(sp_meta "$repo") - mbefore)) "forget full, incr1; prune --grace 0"
  cold
  measure "$tool" verify "'$BIN' verify unchanged --incomplete --read-data"
  row "$tool" verify - - "the chunks of S3 (what its restore reads)"
  if [ "$DROP" = 1 ] && [ "$tool" != "$LAST_TOOL" ]; then
    echo "$LABEL $tool restore: not run (DROP_BEFORE_RESTORE=1: only $LAST_TOOL restores, after the volume is dropped)" | tee -a "$SKIPPED" >&2
  else
    # With DROP_BEFORE_RESTORE=1 the volume is gone by the check: S3's hash is taken before.
    local sum=""
    if [ "$DROP" = 1 ]; then
      echo "== $LABEL: sha256 of S3, then the volume is dropped before $tool's restore" >&2
      sum=$(sha256sum < "$(snapimg 3)" | cut -d' ' -f1)
      echo "$LABEL: S3 sha256 $sum" >> "$LOG"
      rm -rf "$MNT/bases-$LABEL"
      drop_volume
    fi
    measure_restore "$tool" "'$BIN' restore unchanged --incomplete --server bench --to '$OUTD/disk.img' && sync"
    if [ -n "$sum" ]; then
      row "$tool" restore - - "$(same_hash "$OUTD/disk.img" "$sum")"
    else
      row "$tool" restore - - "$(same "$OUTD/disk.img" "$(snapimg 3)")"
    fi
  fi
  rm -rf "$OUTD"
  rm -rf "$repo" "$RUN/cache/$tool"
  [ -n "$LOOPDEV" ] && rm -rf "$MNT/bases-$LABEL"
  unset STILLPOINT_REPO STILLPOINT_REPO_PASSPHRASE_FILE STILLPOINT_CACHE_DIR
}

# ---- restic (as bench/saveset.sh runs it: 0.14 defaults) ---------------------------------------
# Metadata: index/ and snapshots/ plus the tree blobs, which restic stores in data packs.
restic_meta() { echo $(($(du_b "$1/index" "$1/snapshots") + $(python3 "$HELPER" restic-tree-bytes "$1"))); }

run_restic() {
  local repo=$RUN/repo-restic k step before mbefore ids
  export RESTIC_PASSWORD=$PW RESTIC_CACHE_DIR=$RUN/cache/restic
  restic -r "$repo" init >> "$LOG" 2>&1
  restic -r "$repo" cat config >> "$LOG" 2>&1
  for k in 0 1 2 3; do
    step=${STEP_OF[$k]}
    before=$(stored "$repo"); mbefore=$(restic_meta "$repo")
    # Same path every time, so restic finds its parent snapshot (and skips an unchanged file).
    mount --bind "$MNT/snap/S$k" "$SRC"
    warm "$SRC/disk.img"
    measure restic "$step" "restic -r '$repo' backup --tag $step '$SRC/disk.img'"
    umount "$SRC"
    row restic "$step" $(($(stored "$repo") - before)) $(($(restic_meta "$repo") - mbefore)) "index/ + snapshots/ + tree blobs"
  done
  ids=$(restic -r "$repo" snapshots --json | python3 -c 'import json, sys; print(" ".join(s["id"] for s in json.load(sys.stdin) if set(s.get("tags") or []) & {"full", "incr1"}))')
  before=$(stored "$repo"); mbefore=$(restic_meta "$repo")
  measure restic prune "restic -r '$repo' forget $ids && restic -r '$repo' prune"
  row restic prune $(($(stored "$repo") - before)) $(($(restic_meta "$repo") - mbefore)) "forget full, incr1; prune"
  cold
  measure restic verify "restic -r '$repo' check --read-data"
  row restic verify - - "check --read-data: the whole (pruned) repository"
  measure_restore restic "restic -r '$repo' restore latest --target '$OUTD' && sync"
  row restic restore - - "$(same "$OUTD$SRC/disk.img" "$(snapimg 3)")"
  rm -rf "$OUTD"
  rm -rf "$repo" "$RESTIC_CACHE_DIR"
  unset RESTIC_PASSWORD RESTIC_CACHE_DIR
}

# ---- borg 1.2, zstd,3 (as bench/saveset.sh runs it) ----------------------------------------------
# Borg keeps archive and item metadata as chunks in the same segment files as the data. What is
# measured: its repository index (index.N, hints.N, integrity.N: everything outside data/), and
# per backup the plaintext bytes of the item-stream chunks no earlier archive had
# (`borg debug dump-archive-items`), which hold the file's chunk list.
borg_meta() { echo $(($(du_b "$1") - $(du_b "$1/data"))); }
borg_items() { # borg_items REPO ARCHIVE -- bytes of its new item-stream chunks
  local d n
  d=$(mktemp -d "$RUN/items.XXXX")
  (cd "$d" && borg debug dump-archive-items "$1::$2" >> "$LOG" 2>&1)
  n=$(python3 "$HELPER" borg-new-items "$d" "$RUN/borg-items-seen")
  rm -rf "$d"; echo "$n"
}

run_borg() {
  local repo=$RUN/repo-borg k step before mbefore
  export BORG_PASSPHRASE=$PW BORG_BASE_DIR=$RUN/cache/borgbase
  rm -f "$RUN/borg-items-seen"
  borg init --encryption=repokey-blake2 "$repo" >> "$LOG" 2>&1
  for k in 0 1 2 3; do
    step=${STEP_OF[$k]}
    before=$(stored "$repo"); mbefore=$(borg_meta "$repo")
    mount --bind "$MNT/snap/S$k" "$SRC"
    warm "$SRC/disk.img"
    measure borg "$step" "cd '$SRC' && borg create --compression zstd,3 '$repo::$step' disk.img"
    umount "$SRC"
    row borg "$step" $(($(stored "$repo") - before)) $(($(borg_meta "$repo") - mbefore + $(borg_items "$repo" "$step"))) "new item-stream chunks (plaintext) + repository index"
  done
  before=$(stored "$repo"); mbefore=$(borg_meta "$repo")
  measure borg prune "borg delete '$repo' full incr1 && borg compact '$repo'"
  row borg prune $(($(stored "$repo") - before)) $(($(borg_meta "$repo") - mbefore)) "delete full, incr1; compact"
  cold
  measure borg verify "borg check --verify-data '$repo'"
  row borg verify - - "check --verify-data: the whole (pruned) repository"
  measure_restore borg "cd '$OUTD' && borg extract --sparse '$repo::unchanged' && sync"
  row borg restore - - "$(same "$OUTD/disk.img" "$(snapimg 3)")"
  rm -rf "$OUTD"
  rm -rf "$repo" "$BORG_BASE_DIR" "$RUN/borg-items-seen"
  unset BORG_PASSPHRASE BORG_BASE_DIR
}

# ---- the run -------------------------------------------------------------------------------------
{
  echo "scale benchmark, started $(date -u +%Y-%m-%dT%H:%MZ), sizes: ${RUNNABLE[*]}, tools: $TOOLS, $(nproc) cores"
  echo "backupctl: $BIN ($("$BIN" --version 2>/dev/null || echo 'not used')); scripts: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "$(restic version | head -1); $(borg --version); $(zstd --version | head -1); $(btrfs --version); $(uname -r)"
} | tee -a "$LOG" >&2
for LABEL in "${RUNNABLE[@]}"; do
  if ! fits "$LABEL"; then echo "$FIT_MSG" | tee -a "$SKIPPED" >&2; continue; fi
  make_volume
  for T in $TOOLS; do
    case $T in
      btrfs-send) run_btrfs_send ;;
      stillpoint|stillpoint-cbt) run_stillpoint "$T" ;;
      restic) run_restic ;;
      borg) run_borg ;;
      *) die "unknown tool $T (TOOLS: btrfs-send stillpoint stillpoint-cbt restic borg)" ;;
    esac
  done
  drop_volume
done

# ---- the tables ----------------------------------------------------------------------------------
{
  echo
  echo "scale benchmark, $(date -u +%Y-%m-%dT%H:%MZ), sizes ${RUNNABLE[*]} (mkimage --seed 1; S1: mutate --seed 2 --fraction 0.01; S2: mutate --seed 3 --fraction 0.05 --cluster 16; S3 = S2), $(nproc) cores"
  echo "$(restic version | head -1); $(borg --version); $(zstd --version | head -1); $(btrfs --version)"
  echo "sources: files in read-only btrfs snapshots on a loop device, page cache warm before each backup; $COLD_NOTE"
  if [ -s "$SKIPPED" ]; then cat "$SKIPPED"; fi
  echo
  python3 "$HELPER" report "$ROWS"
  echo
  echo "(log: $LOG; rows: $ROWS)"
} | tee "$RUN/report.md"
