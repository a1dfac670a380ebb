# Shared by the bench scripts (source it): installing the peers, warming sources, dropping the
# page cache. Not run by itself.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# need COMMAND DEBIAN-PACKAGE -- installs the package from Debian when the command is missing
need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "== installing $2" >&2
  as_root apt-get install -y "$2" >/dev/null || { as_root apt-get update >/dev/null && as_root apt-get install -y "$2" >/dev/null; }
}

# warm FILE... -- reads each file once so a backup starts with its source in the page cache
warm() { for f in "$@"; do cat "$f" > /dev/null; done; }

# cold -- empties the page cache before a restore or verify, so every tool reads its repository
# from disk as a restore days after the backup would. Without it the comparison depends on who
# left their repository cached: restic and borg write through the page cache, stillpoint writes
# packs with O_DIRECT and leaves nothing there.
COLD_NOTE="repositories read with a cold page cache (drop_caches before each restore and verify); restores timed until the image is on disk (sync)"
cold() {
  sync
  if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
    COLD_NOTE="page cache NOT dropped before restores and verifies (needs root): repositories may be cached"
  fi
}
