#!/usr/bin/env bash
# The saveset benchmark (issue 5, "Performance"): stillpoint's copier against restic and borg on
# the same deterministic image and its 1%-mutated twin, in one run, with `cat` and `zstd -1 -T0`
# as the limits. Not run by CI. Usage and targets: bench/README.md.
#
#   bench/saveset.sh                 # 4 GiB image, scratch in /tmp/stillpoint-bench
#   SIZE=1G WORK=/scratch bench/saveset.sh
#   BUILD=0 bench/saveset.sh         # reuse target/release/backupctl as it is
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MKIMAGE=${SHARED:-../shared}/bench/mkimage.py
SIZE=${SIZE:-4G}
WORK=${WORK:-/tmp/stillpoint-bench}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/backupctl
PW=bench-passphrase

[ -f "$MKIMAGE" ] || { echo "saveset.sh: $MKIMAGE not found (set SHARED=/path/to/shared)" >&2; exit 2; }

. "$ROOT/bench/lib.sh"
need restic restic
need borg borgbackup
need zstd zstd
[ -x /usr/bin/time ] || need /usr/bin/time time

if [ "${BUILD:-1}" = 1 ]; then
  echo "== building backupctl (release)" >&2
  cargo build --release -p backupctl >&2
fi
[ -x "$BIN" ] || { echo "saveset.sh: $BIN missing (BUILD=0 needs a release build)" >&2; exit 2; }

mkdir -p "$WORK/img"
IMG=$WORK/img/base-$SIZE.img
MUT=$WORK/img/mut-$SIZE.img
if [ ! -f "$IMG" ]; then
  echo "== making $IMG (--size $SIZE --seed 1)" >&2
  python3 "$MKIMAGE" create "$IMG.part" --size "$SIZE" --seed 1 >&2
  mv "$IMG.part" "$IMG"
fi
if [ ! -f "$MUT" ]; then
  echo "== making its twin $MUT (mutate --seed 2 --fraction 0.01)" >&2
  cp --sparse=always "$IMG" "$MUT.part"
  python3 "$MKIMAGE" mutate "$MUT.part" --seed 2 --fraction 0.01 >&2
  mv "$MUT.part" "$MUT"
fi
SZ=$(stat -c %s "$IMG")

RUN=$WORK/run
rm -rf "$RUN"; mkdir -p "$RUN"
LOG=$RUN/log.txt
ROWS=$RUN/rows.tsv   # tool step wall_s bytes stored rss_kb rc
: > "$ROWS"

# measure TOOL STEP 'shell command' -- wall time and peak RSS of the command (and its children)
measure() {
  local tool=$1 step=$2 cmd=$3 tf t0 t1 rc
  tf=$(mktemp)
  echo "### [$tool $step] $cmd" >> "$LOG"
  t0=$(date +%s.%N)
  set +e
  /usr/bin/time -v -o "$tf" bash -c "$cmd" >> "$LOG" 2>&1
  rc=$?
  set -e
  t1=$(date +%s.%N)
  LAST_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  LAST_RSS=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$tf")
  LAST_RC=$rc
  rm -f "$tf"
  printf '%-10s %-8s %8.2f s  rss %7s KB  rc %s\n' "$tool" "$step" "$LAST_WALL" "$LAST_RSS" "$rc" >&2
}

# row TOOL STEP STORED -- records the last measurement
row() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$LAST_WALL" "$SZ" "$3" "$LAST_RSS" "$LAST_RC" >> "$ROWS"
}

stored() { sync; du -sb "$1" | cut -f1; }

same() { # same FILE -- the restored file equals the twin, bit for bit
  if cmp -s "$1" "$MUT"; then echo "identical, $(du -B1 "$1" | cut -f1) B allocated"; else echo "DIFFERENT"; fi
}

DATA=$RUN/data
OUTD=$RUN/restore
mkdir -p "$DATA"

# ---- limits ------------------------------------------------------------------------------
warm "$IMG"
measure cat full "cat '$IMG' > /dev/null"; row cat full "-"
measure zstd-1 full "zstd -1 -T0 -c '$IMG' > /dev/null"; row zstd-1 full "-"

# ---- stillpoint --------------------------------------------------------------------------
REPO=$RUN/repo-stillpoint
printf '%s\n' "$PW" > "$RUN/pw"
export STILLPOINT_REPO=$REPO STILLPOINT_REPO_PASSPHRASE_FILE=$RUN/pw
"$BIN" repo init >> "$LOG" 2>&1
sp_backup() { echo "'$BIN' repo backup --json --backup $1 --server bench --volume disk '$2'"; }
warm "$IMG"
measure stillpoint full "$(sp_backup full "$IMG")"; row stillpoint full "$(stored "$REPO")"
warm "$MUT"
measure stillpoint incr "$(sp_backup incr "$MUT")"; row stillpoint incr "$(stored "$REPO")"
mkdir -p "$OUTD"
# `repo backup` alone writes no backup manifest (the listener does, with the cut): the backup is
# incomplete by design here, so restore and verify are told to go ahead.
cold
measure stillpoint restore "'$BIN' restore incr --incomplete --server bench --to '$OUTD/disk.img' && sync"
row stillpoint restore "$(stored "$REPO")"
SP_RESTORED=$(same "$OUTD/disk.img"); rm -rf "$OUTD"
cold
measure stillpoint verify "'$BIN' verify incr --incomplete --read-data"; row stillpoint verify "$(stored "$REPO")"
rm -rf "$REPO"
unset STILLPOINT_REPO STILLPOINT_REPO_PASSPHRASE_FILE

# ---- restic (as in shared/bench/anchors-restic.sh) ------------------------------------------
export RESTIC_PASSWORD=$PW RESTIC_CACHE_DIR=$RUN/cache/restic
REPO=$RUN/repo-restic
restic -r "$REPO" init >> "$LOG" 2>&1
cp --sparse=always "$IMG" "$DATA/disk.img"; sync; warm "$DATA/disk.img"
measure restic full "restic -r '$REPO' backup '$DATA/disk.img'"; row restic full "$(stored "$REPO")"
cp --sparse=always "$MUT" "$DATA/disk.img"; sync; warm "$DATA/disk.img"
measure restic incr "restic -r '$REPO' backup '$DATA/disk.img'"; row restic incr "$(stored "$REPO")"
mkdir -p "$OUTD"
cold
measure restic restore "restic -r '$REPO' restore latest --target '$OUTD' && sync"
row restic restore "$(stored "$REPO")"
RESTIC_RESTORED=$(same "$OUTD$DATA/disk.img"); rm -rf "$OUTD"
cold
measure restic verify "restic -r '$REPO' check --read-data"; row restic verify "$(stored "$REPO")"
rm -rf "$REPO" "$RESTIC_CACHE_DIR"

# ---- borg zstd,3 (as in shared/bench/anchors-borg.sh) --------------------------------------
export BORG_PASSPHRASE=$PW BORG_BASE_DIR=$RUN/cache/borgbase
REPO=$RUN/repo-borg
borg init --encryption=repokey-blake2 "$REPO" >> "$LOG" 2>&1
cp --sparse=always "$IMG" "$DATA/disk.img"; sync; warm "$DATA/disk.img"
measure borg full "cd '$DATA' && borg create --compression zstd,3 '$REPO::full' disk.img"
row borg full "$(stored "$REPO")"
cp --sparse=always "$MUT" "$DATA/disk.img"; sync; warm "$DATA/disk.img"
measure borg incr "cd '$DATA' && borg create --compression zstd,3 '$REPO::incr' disk.img"
row borg incr "$(stored "$REPO")"
mkdir -p "$OUTD"
cold
measure borg restore "cd '$OUTD' && borg extract --sparse '$REPO::incr' && sync"
row borg restore "$(stored "$REPO")"
BORG_RESTORED=$(same "$OUTD/disk.img"); rm -rf "$OUTD"
cold
measure borg verify "borg check --verify-data '$REPO'"; row borg verify "$(stored "$REPO")"
rm -rf "$REPO" "$BORG_BASE_DIR" "$DATA"

# ---- the table ---------------------------------------------------------------------------
echo
echo "saveset benchmark, $(date -u +%Y-%m-%dT%H:%MZ), image $SIZE ($SZ B, mkimage --seed 1; twin: mutate --seed 2 --fraction 0.01), $(nproc) cores"
echo "$(restic version | head -1); $(borg --version); $(zstd --version | head -1)"
echo "$COLD_NOTE"
echo
awk -F'\t' '
  function mib(b) { return b == "-" ? "-" : sprintf("%.1f", b / 1048576) }
  BEGIN { printf "| tool | step | wall s | MB/s | repo after (MiB) | peak RSS (MiB) | rc |\n|---|---|---|---|---|---|---|\n" }
  { printf "| %s | %s | %.2f | %.0f | %s | %.1f | %s |\n", $1, $2, $3, $4 / $3 / 1e6, mib($5), $6 / 1024, $7 }
' "$ROWS"
echo
echo "restored bytes: stillpoint $SP_RESTORED; restic $RESTIC_RESTORED; borg $BORG_RESTORED"
echo
awk -F'\t' '
  { wall[$1 "/" $2] = $3; stored[$1 "/" $2] = $5; rss[$1] = ($6 > rss[$1] ? $6 : rss[$1]) }
  function ratio(step, peer) { return wall[peer "/" step] / wall["stillpoint/" step] }
  function added(tool) { return stored[tool "/incr"] - stored[tool "/full"] }
  function verdict(ok) { return ok ? "met" : "NOT met" }
  END {
    print "| step | stillpoint / restic (throughput) | stillpoint / borg (throughput) | stillpoint / zstd -1 -T0 | stillpoint / cat |"
    print "|---|---|---|---|---|"
    n = split("full incr restore verify", steps, " ")
    for (i = 1; i <= n; i++) {
      s = steps[i]
      z = (s == "full") ? sprintf("%.2fx", ratio("full", "zstd-1")) : "-"
      c = (s == "full") ? sprintf("%.2fx", ratio("full", "cat")) : "-"
      printf "| %s | %.2fx | %.2fx | %s | %s |\n", s, ratio(s, "restic"), ratio(s, "borg"), z, c
    }
    printf "\nincremental added to the repository: stillpoint %.1f MiB, restic %.1f MiB, borg %.1f MiB\n", added("stillpoint") / 1048576, added("restic") / 1048576, added("borg") / 1048576
    print ""
    print "| target | figure | verdict |"
    print "|---|---|---|"
    printf "| full >= 2x restic | %.2fx | %s |\n", ratio("full", "restic"), verdict(ratio("full", "restic") >= 2)
    printf "| full >= 80%% of zstd -1 -T0 | %.0f%% | %s |\n", 100 * ratio("full", "zstd-1"), verdict(ratio("full", "zstd-1") >= 0.8)
    printf "| incremental >= 3x restic | %.2fx | %s |\n", ratio("incr", "restic"), verdict(ratio("incr", "restic") >= 3)
    printf "| incremental stores <= restic | %.1f vs %.1f MiB | %s |\n", added("stillpoint") / 1048576, added("restic") / 1048576, verdict(added("stillpoint") <= added("restic"))
    printf "| restore >= 2x restic | %.2fx | %s |\n", ratio("restore", "restic"), verdict(ratio("restore", "restic") >= 2)
    printf "| peak memory < 256 MiB | %.1f MiB | %s |\n", rss["stillpoint"] / 1024, verdict(rss["stillpoint"] < 262144)
  }
' "$ROWS"
echo
echo "(log: $LOG)"
