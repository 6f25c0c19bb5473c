#!/bin/sh
# edgeprune agent installer, inside an offline bundle. Needs no network.
#
#   sh install.sh --device-id ID --broker mqtt://HOST:1883 [--fleet F] [--data PATH] [--set KEY=VALUE]...
#                 [--python python3] [--reinstall]
#                 [--tls DIR with ca.crt device.crt device.key device.sign.key coordinator.sign.pub]
#                 [--password-file FILE (mode 0600; with --set username=NAME)]
#
# As root: /opt/edgeprune, /etc/edgeprune/agent.toml, a systemd system unit.
# As a user: ~/.local/share/edgeprune, ~/.config/edgeprune/agent.toml, a systemd user unit
# (with lingering). Without systemd: a supervisor process (see `python -m edge_agent.service`).
# Running it again upgrades in place: same identity, config and state; the old venv is kept
# until the new agent is up. Exit codes: 10 wrong architecture, 11 no Python, 12 wrong Python
# version, 13 not enough disk, 14 venv/pip failed, 15 service failed, 2 usage.
set -eu

HERE="$(cd "$(dirname "$0")" && pwd)"
PY=python3
REINSTALL=0
SETS=""
TLS=""
PWF=""
say() { echo "==> $*"; }
die() { code="$1"; shift; echo "edgeprune install: $*" >&2; exit "$code"; }
add_set() { SETS="$SETS
$1"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --device-id) add_set "device_id=$2"; shift 2 ;;
    --broker) add_set "broker=$2"; shift 2 ;;
    --fleet) add_set "fleet=$2"; shift 2 ;;
    --data) add_set "data=$2"; shift 2 ;;
    --set) add_set "$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --tls) TLS="$(cd "$2" && pwd)"; shift 2 ;;
    --password-file) PWF="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --reinstall) REINSTALL=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die 2 "unknown option $1 (try --help)" ;;
  esac
done

manifest() { "$PY" -c 'import json,sys; m=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, m))' "$HERE/manifest.json" "$1"; }

# -- checks: the same ones `edgeprune flash` makes over SSH, for devices flashed by hand ------
command -v "$PY" >/dev/null 2>&1 || die 11 "no $PY on this device: install Python 3.10 or newer (Raspberry Pi OS: sudo apt install python3)"
HAVE_PY="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || die 11 "$PY does not run"
WANT_PY="$(manifest python)"
WANT_ARCH="$(manifest arch)"
ARCH="$(uname -m)"
[ "$ARCH" = "$WANT_ARCH" ] || die 10 "this bundle is for $WANT_ARCH but this device is $ARCH: build one with edgeprune flash --bundle OUT --arch $ARCH --python $HAVE_PY"
[ "$HAVE_PY" = "$WANT_PY" ] || die 12 "this bundle is for Python $WANT_PY but $PY is $HAVE_PY: build one with edgeprune flash --bundle OUT --arch $ARCH --python $HAVE_PY (edgeprune needs 3.10+)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die 12 "Python $HAVE_PY is too old: edgeprune needs 3.10 or newer"

if [ "$(id -u)" = 0 ]; then PREFIX=/opt/edgeprune; else PREFIX="$HOME/.local/share/edgeprune"; fi
BUNDLE_ID="$(manifest bundle_id)"
VENV="$PREFIX/venvs/$BUNDLE_ID"
mkdir -p "$PREFIX/venvs"
NEED_KB=$(( $(manifest wheel_bytes) * 3 / 1024 + 51200 ))   # unpacked wheels ~3x their size, +50 MB
FREE_KB="$(df -Pk "$PREFIX" | awk 'NR==2 {print $4}')"
if [ ! -f "$VENV/.complete" ] || [ "$REINSTALL" = 1 ]; then
  [ "$FREE_KB" -ge "$NEED_KB" ] || die 13 "not enough disk in $PREFIX: $((FREE_KB / 1024)) MB free, $((NEED_KB / 1024)) MB needed; free some space (sudo apt clean, remove old files) and flash again"
fi

# -- venv: a new one per bundle, beside the running one ----------------------------------------
if [ -f "$VENV/.complete" ] && [ "$REINSTALL" = 0 ]; then
  say "bundle $BUNDLE_ID already installed in $VENV"
  NEW=0
else
  NEW=1
  if [ -e "$PREFIX/current" ] && [ "$(readlink "$PREFIX/current")" = "venvs/$BUNDLE_ID" ]; then
    # reinstalling the running venv: build it under another name so the agent keeps running
    VENV="$PREFIX/venvs/$BUNDLE_ID-$(date +%s)"
  fi
  rm -rf "$VENV"
  say "creating venv $VENV (Python $HAVE_PY)"
  "$PY" -m venv --without-pip "$VENV" >/dev/null 2>&1 || { rm -rf "$VENV"; die 14 "$PY -m venv failed: install the venv module (sudo apt install python3-venv)"; }
  EXTRAS="$(manifest "','.join(extras)")"
  PIPWHL="$(ls "$HERE"/wheels/pip-*.whl | head -1)"
  say "installing edgeprune[$EXTRAS] from $(ls "$HERE"/wheels | wc -l) wheels (no network)"
  # constraints.txt: the dependency versions this release was tested with (the bundle holds just those)
  if ! "$VENV/bin/python" "$PIPWHL/pip" install -q --no-index --find-links "$HERE/wheels" \
      --constraint "$HERE/constraints.txt" \
      --disable-pip-version-check "edgeprune[$EXTRAS]" pip > "$HERE/pip.log" 2>&1; then
    tail -15 "$HERE/pip.log" >&2
    rm -rf "$VENV"
    die 14 "pip install failed (log above; full log $HERE/pip.log)"
  fi
  "$VENV/bin/python" -c 'import edge_agent.cli' || { rm -rf "$VENV"; die 14 "the installed agent does not import"; }
  touch "$VENV/.complete"
fi

# -- config, service, start: edge_agent.service does it and undoes it on failure --------------
say "configuring and starting the agent service"
set -- install --venv "$VENV" --bundle-id "$BUNDLE_ID"
[ -n "$TLS" ] && set -- "$@" --tls-dir "$TLS"
[ -n "$PWF" ] && set -- "$@" --password-file "$PWF"
OLDIFS="$IFS"; IFS='
'
for kv in $SETS; do [ -n "$kv" ] && set -- "$@" --set "$kv"; done
IFS="$OLDIFS"
if ! "$VENV/bin/python" -m edge_agent.service "$@"; then
  [ "$NEW" = 1 ] && [ "$(readlink "$PREFIX/current" 2>/dev/null)" != "venvs/$(basename "$VENV")" ] && rm -rf "$VENV"
  die 15 "the agent service did not start (details above)"
fi
