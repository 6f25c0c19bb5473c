#!/bin/sh
# edgeprune agent uninstaller: stops and removes the service, the venvs, the config and
# (unless --keep-state) the agent's state. Run as the user that installed it (root or not).
#   sh uninstall.sh [--keep-state]
set -eu
if [ "$(id -u)" = 0 ]; then
  PREFIX=/opt/edgeprune; CONFIG=/etc/edgeprune/agent.toml; STATE=/var/lib/edgeprune
  UNIT=/etc/systemd/system/edgeprune-agent.service
else
  PREFIX="$HOME/.local/share/edgeprune"; CONFIG="$HOME/.config/edgeprune/agent.toml"; STATE="$HOME/.local/state/edgeprune"
  UNIT="$HOME/.config/systemd/user/edgeprune-agent.service"
fi
if [ ! -e "$PREFIX" ] && [ ! -e "$CONFIG" ] && [ ! -e "$UNIT" ]; then
  echo 'EDGEPRUNE_RESULT {"ok": true, "removed": [], "not_installed": true}'
  exit 0
fi
# the installed agent knows how it was started (systemd unit or supervisor): let it undo that
if [ -x "$PREFIX/current/bin/python" ] && "$PREFIX/current/bin/python" -m edge_agent.service uninstall "$@"; then
  exit 0
fi
# broken venv: remove by hand
echo "edgeprune uninstall: the installed agent could not remove itself; removing files directly" >&2
if [ -f "$UNIT" ] && command -v systemctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then systemctl disable --now edgeprune-agent.service || true
  else systemctl --user disable --now edgeprune-agent.service || true; fi
fi
[ -f "$STATE/supervisor.pid" ] && kill "$(cat "$STATE/supervisor.pid")" 2>/dev/null || true
rm -f "$UNIT"
rm -rf "$PREFIX" "$CONFIG" "$(dirname "$CONFIG")/tls"
case " $* " in *" --keep-state "*) ;; *) rm -rf "$STATE" ;; esac
echo "EDGEPRUNE_RESULT {\"ok\": true, \"removed\": [\"$PREFIX\", \"$CONFIG\"], \"by_hand\": true}"
