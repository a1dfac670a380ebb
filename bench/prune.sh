#!/usr/bin/env bash
# The prune benchmark: a repository of N backups of the bench image (the image and N-1 twins,
# each with 5% of its blocks rewritten from a different seed), half of them forgotten (their
# volume manifests deleted, as `forget` does), then `backupctl repo prune --grace 0`: bytes
# scanned per second, peak RSS and bytes freed, at each size. Not run by CI.
#
#   bench/prune.sh                      # 256M and 1G, N=4, release build
#   SIZES="1G" N=6 bench/prune.sh
#   PROFILE=debug BUILD=0 bench/prune.sh  # an existing dev build (saveset is opt-level 2 there)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MKIMAGE=${SHARED:-../shared}/bench/mkimage.py
SIZES=${SIZES:-256M 1G}
N=${N:-4}
WORK=${WORK:-/tmp/stillpoint-bench-prune}
PROFILE=${PROFILE:-release}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/$PROFILE/backupctl
PW=bench-passphrase

[ -f "$MKIMAGE" ] || { echo "prune.sh: $MKIMAGE not found (set SHARED=/path/to/shared)" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "prune.sh: /usr/bin/time missing (apt-get install time)" >&2; exit 2; }
if [ "${BUILD:-1}" = 1 ]; then
  if [ "$PROFILE" = release ]; then cargo build --release -p backupctl >&2; else cargo build -p backupctl >&2; fi
fi
[ -x "$BIN" ] || { echo "prune.sh: $BIN missing" >&2; exit 2; }

mkdir -p "$WORK/img"
printf '%s\n' "$PW" > "$WORK/pw"
export STILLPOINT_REPO_PASSPHRASE_FILE=$WORK/pw
printf '%-6s %-3s %14s %14s %9s %12s %12s %14s %14s\n' size N scanned_B prune_s MB/s peak_rss_KB freed_B rewritten_B packs_deleted
for SIZE in $SIZES; do
  IMG=$WORK/img/base-$SIZE.img
  [ -f "$IMG" ] || { python3 "$MKIMAGE" create "$IMG.part" --size "$SIZE" --seed 1 >&2; mv "$IMG.part" "$IMG"; }
  IMGS=("$IMG")
  for i in $(seq 2 "$N"); do
    T=$WORK/img/twin$i-$SIZE.img
    if [ ! -f "$T" ]; then
      cp --sparse=always "$IMG" "$T.part"
      python3 "$MKIMAGE" mutate "$T.part" --seed "$i" --fraction 0.05 >&2
      mv "$T.part" "$T"
    fi
    IMGS+=("$T")
  done
  REPO=$WORK/repo-$SIZE
  rm -rf "$REPO"
  export STILLPOINT_REPO=$REPO
  "$BIN" repo init >/dev/null
  FORGET=()
  for i in "${!IMGS[@]}"; do
    M=$("$BIN" repo backup --json --backup "b$i" --server bench --volume disk "${IMGS[$i]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifest"])')
    # Forget every other backup, the first (the full one) included.
    if [ $((i % 2)) = 0 ]; then FORGET+=("$M"); fi
  done
  for M in "${FORGET[@]}"; do rm "$REPO/manifests/$M"; done
  sync
  TF=$(mktemp)
  T0=$(date +%s.%N)
  /usr/bin/time -v -o "$TF" "$BIN" repo prune --grace 0 --json > "$WORK/prune-$SIZE.json" 2> "$WORK/prune-$SIZE.log"
  T1=$(date +%s.%N)
  RSS=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$TF"); rm -f "$TF"
  python3 - "$WORK/prune-$SIZE.json" "$T0" "$T1" "$RSS" "$SIZE" "$N" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); t = float(sys.argv[3]) - float(sys.argv[2])
print(f"{sys.argv[5]:<6} {sys.argv[6]:<3} {r['pack_bytes']:>14} {t:>14.2f} {r['pack_bytes']/t/1e6:>9.0f} {sys.argv[4]:>12} {r['bytes_freed']:>12} {r['bytes_rewritten']:>14} {r['packs_deleted']:>14}")
PY
  "$BIN" verify b1 --incomplete --read-data > /dev/null || { echo "prune.sh: verify after prune FAILED" >&2; exit 1; }
  rm -rf "$REPO"
done
