#!/usr/bin/env bash
# Follows deploy/INSTALL.md in a scratch root: runs every block marked `<!-- check: NAME -->`
# with its paths moved under a temporary directory and both hosts on loopback, starts the agent
# and the listener as their units would (root; the stillpoint user), runs the pre-flight and a
# first backup, shows the pre-flight catching a wrong certificate and two servers at one
# address, then checks the shipped systemd units (`systemd-analyze verify`, and `security
# --offline=true` below 5 for the listener). Needs root (user, loop mounts, FIFREEZE).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
GUIDE=deploy/INSTALL.md
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
cargo build -q -p stillpoint-listener -p stillpoint-agent -p backupctl
TARGET=$CARGO_TARGET_DIR/debug

ROOT=$(mktemp -d /tmp/stillpoint-install.XXXXXX)
chmod 0755 "$ROOT"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  umount "$ROOT/srv/data" 2>/dev/null || true
  if mountpoint -q "$ROOT/srv/mock-san" 2>/dev/null; then
    "$ROOT/usr/local/bin/backupctl" san umount "$ROOT/srv/mock-san" >/dev/null || true
  fi
  rm -rf "$ROOT"
}
trap cleanup EXIT
fail() { echo "install check: $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AGENT_PORT=$(free_port)
LISTENER_PORT=$(free_port)

# The guide's block NAME, its paths under $ROOT and its hosts on loopback.
block() {
  awk -v want="<!-- check: $1 -->" '
    $0 == want { armed = 1; next }
    armed && /^```sh/ { inside = 1; next }
    inside && /^```/ { exit }
    inside { print }
  ' "$GUIDE" | sed -E \
    -e "s#target/release/#$TARGET/#g" \
    -e "s#(^|[ \"'=])/(usr/local/bin|etc/stillpoint|var/lib/stillpoint|backup|srv/mock-san|srv/data)#\1$ROOT/\2#g" \
    -e "s#/root/stillpoint-ca#$ROOT/ca#g" \
    -e "s#(fs1\.clinic\.lan|0\.0\.0\.0):7501#127.0.0.1:$AGENT_PORT#g" \
    -e "s#0\.0\.0\.0:7443#127.0.0.1:$LISTENER_PORT#g"
}
run_block() {
  local text
  text=$(block "$1")
  [ -n "$text" ] || fail "no block <!-- check: $1 --> in $GUIDE"
  echo "==> $1"
  (cd "$REPO" && PATH="$ROOT/usr/local/bin:$PATH" bash -euo pipefail -c "$text") || fail "step $1 failed"
}

for step in binaries listener-user certs listener-certs agent-certs storage repository \
  agent-config listener-config; do
  run_block "$step"
done
BIN=$ROOT/usr/local/bin
export PATH="$BIN:$PATH"

echo "==> start the agent (root) and the listener (user stillpoint), as their units do"
"$BIN/stillpoint-agent" --config "$ROOT/etc/stillpoint/agent.toml" >"$ROOT/agent.log" 2>&1 &
PIDS+=($!)
runuser -u stillpoint -- "$BIN/stillpoint-listener" --config "$ROOT/etc/stillpoint/listener.toml" \
  >"$ROOT/listener.log" 2>&1 &
PIDS+=($!)
export STILLPOINT_LISTENER="https://127.0.0.1:$LISTENER_PORT" STILLPOINT_CERTS="$ROOT/ca" STILLPOINT_IDENTITY=alice
for _ in $(seq 1 100); do
  backupctl agents --json 2>/dev/null | grep -q '"reachable": *true' && break
  sleep 0.2
done
backupctl agents --json | grep -q '"reachable": *true' || {
  cat "$ROOT/agent.log" "$ROOT/listener.log" >&2; fail "the agent never became reachable"; }

run_block preflight
run_block operator-preflight
run_block first-backup
backupctl list --json | grep -q '"state": *"SUCCEEDED"' || fail "the first backup did not succeed"

run_block schedule
echo "==> restart the listener with the schedule, as systemctl restart would"
kill "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null || true
runuser -u stillpoint -- "$BIN/stillpoint-listener" --config "$ROOT/etc/stillpoint/listener.toml" \
  >>"$ROOT/listener.log" 2>&1 &
PIDS[1]=$!
for _ in $(seq 1 100); do
  backupctl schedules >/dev/null 2>&1 && break
  sleep 0.2
done
out=$(run_block schedules)
echo "$out"
echo "$out" | grep -q "nightly .*clinic .*0 2 \* \* \*" || fail "backupctl schedules does not show nightly: $out"

echo "==> the pre-flight catches a listener certificate of the wrong role"
bad=$ROOT/etc/stillpoint/bad-role.toml
sed -e "s#certs/listener.pem#certs/fs1.pem#; s#certs/listener.key#certs/fs1.key#" \
  "$ROOT/etc/stillpoint/listener.toml" > "$bad"
set +e
out=$(stillpoint-listener --check --config "$bad"); code=$?
set -e
[ "$code" = 1 ] || fail "--check with an agent's certificate exited $code, not 1: $out"
echo "$out" | grep -q "error  -       certificate .*a certificate of role agent (agent:fs1)" ||
  fail "--check did not name the wrong role: $out"

echo "==> the pre-flight catches two servers at one address"
dup=$ROOT/etc/stillpoint/dup.toml
sed -e "s#servers = \[\"fs1\"\]#servers = [\"fs1\", \"fs2\"]#" "$ROOT/etc/stillpoint/listener.toml" > "$dup"
printf '\n[[server]]\nname = "fs2"\naddress = "127.0.0.1:%s"\n' "$AGENT_PORT" >> "$dup"
set +e
out=$(stillpoint-listener --check --config "$dup"); code=$?
set -e
[ "$code" = 1 ] || fail "--check with two servers at one address exited $code: $out"
echo "$out" | grep -q "servers fs1 and fs2: both have address 127.0.0.1:$AGENT_PORT" ||
  fail "--check did not name the shared address: $out"
echo "$out" | grep -q "error  fs2     reachable .*certificate is not for fs2" ||
  fail "--check did not see fs1 answering for fs2: $out"

echo "==> systemd units: verify and security"
units=$ROOT/units
mkdir -p "$units/etc/systemd/system" "$units/usr/lib/systemd" "$units/usr/local/bin"
cp -a /lib/systemd/system "$units/usr/lib/systemd/"
cp deploy/systemd/*.service "$units/etc/systemd/system/"
cp "$BIN"/stillpoint-listener "$BIN"/stillpoint-agent "$units/usr/local/bin/"
verify=$(systemd-analyze verify --root="$units" stillpoint-listener.service stillpoint-agent.service 2>&1) ||
  fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify warned: $verify"
for unit in stillpoint-listener stillpoint-agent; do
  level=$(systemd-analyze security --offline=true "deploy/systemd/$unit.service" |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  [ -n "$level" ] || fail "no exposure level for $unit"
  echo "$unit: exposure $level"
  if [ "$unit" = stillpoint-listener ]; then
    awk -v l="$level" 'BEGIN { exit !(l < 5) }' || fail "$unit exposure $level is not below 5"
  fi
done
echo "install check: ok"
