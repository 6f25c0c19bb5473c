"""`edgeprune` commands: installing the agent on a device over SSH, and removing it. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import output
from ..store import default_home
from .common import _common, _connection, _store
from .fleet import _print_caps


def _ssh_arguments(p: argparse.ArgumentParser) -> None:
    """The SSH flags flash and unflash share (read back by _ssh)."""
    p.add_argument("--identity", help="SSH private key file (default: your SSH config and agent)")
    p.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra ssh -o option, repeatable (e.g. UserKnownHostsFile=/tmp/kh)",
    )
    p.add_argument("--ssh-timeout", type=float, default=10.0, help="SSH connect timeout in seconds (default 10)")


def _ssh(args: argparse.Namespace):
    from ..ssh import Ssh, Target

    target = Target.parse(args.target)
    return target, Ssh(target, args.identity, args.ssh_option, args.ssh_timeout)


def cmd_flash(args: argparse.Namespace) -> int:
    from .. import bundle
    from ..flash import flash, undo_after_timeout, wait_online
    from ..progress import Reporter
    from ..ssh import FlashError

    say = Reporter(quiet=args.json).say
    home = Path(args.home) if args.home else default_home()
    if args.bundle:  # only write the bundle: for devices without network, installed by hand
        if args.target:
            return output.fail(
                "give either a TARGET to flash or --bundle OUT, not both", code="usage", as_json=args.json, status=2
            )
        try:
            platform = bundle.Platform.parse(args.arch, args.python_version, args.glibc)
            manifest = bundle.build(platform, Path(args.bundle), train=args.train, offline=args.offline, say=say)
        except bundle.BundleError as exc:
            return output.fail(str(exc), code=exc.code, as_json=args.json)
        if args.json:
            output.print_json(manifest)
        else:
            print(
                f"wrote {args.bundle}: {len(manifest['wheels'])} wheels for {platform.arch} / Python "
                f"{platform.python}, {manifest['bundle_bytes'] / 1e6:.1f} MB\n"
                f"on the device: tar xzf {Path(args.bundle).name} && sh {manifest['dir']}/install.sh "
                f"--device-id ID --broker mqtt://LAPTOP:1883"
            )
        return 0
    if not args.target or not args.device_id:
        return output.fail(
            "flash needs TARGET and --device-id (or --bundle OUT to only write a bundle)",
            code="usage",
            as_json=args.json,
            status=2,
        )
    try:
        target, ssh = _ssh(args)
        done = flash(
            target,
            ssh,
            device_id=args.device_id,
            broker_url=args.broker,
            fleet=args.fleet,
            home=home,
            python=args.remote_python,
            data=args.data,
            train=args.train,
            reinstall=args.reinstall,
            offline=args.offline,
            from_bundle=Path(args.from_bundle) if args.from_bundle else None,
            extra_settings=args.set,
            device_username=args.device_username,
            device_password_file=Path(args.device_password_file) if args.device_password_file else None,
            say=say,
        )
    except FlashError as exc:
        return output.fail(str(exc), code=exc.code, as_json=args.json)
    install = done["install"]
    say(f"      {install.get('service_detail')}")
    for note in install.get("notes") or []:
        say(f"      note: {note}")
    say(f"[5/5] waiting for {args.device_id} to come online on {args.local_broker or args.broker}")
    from ..session import Session

    try:
        url = args.local_broker or args.broker
        session = Session(url, args.fleet, _store(args), **_connection(args, url)).start(args.connect_timeout)
    except ConnectionError as exc:
        return output.fail(
            f"the agent is installed, but this laptop cannot reach the broker to confirm it: {exc}",
            code="connect",
            as_json=args.json,
        )
    try:
        caps = wait_online(session, args.device_id, args.online_timeout)
    finally:
        session.close()
    if caps is None:
        try:
            undone = undo_after_timeout(ssh, install.get("first_install", True))
        except FlashError as exc:
            undone = f"then failed to undo it: {exc}"
        return output.fail(
            f"{args.device_id} was installed but did not come online within {args.online_timeout:.0f} s, "
            f"so flash {undone}. Check that the device reaches {args.broker} with the fleet's "
            f"credentials; the agent's log: {install.get('service_detail')}",
            code="not_online",
            as_json=args.json,
        )
    done["caps"] = caps
    if args.json:
        output.print_json(done)
        return 0
    verb = "upgraded" if install.get("upgraded") else ("re-flashed" if not install.get("first_install") else "flashed")
    print(
        f"{args.device_id} {verb} and online in fleet {args.fleet}: {caps.get('arch')}, Python "
        f"{caps.get('python_version')}, agent {caps.get('agent_version')}"
    )
    _print_caps([{"device_id": args.device_id, "caps": caps}])
    return 0


def cmd_unflash(args: argparse.Namespace) -> int:
    from ..flash import unflash
    from ..ssh import FlashError

    try:
        target, ssh = _ssh(args)
        result = unflash(ssh, keep_state=args.keep_state)
    except FlashError as exc:
        return output.fail(str(exc), code=exc.code, as_json=args.json)
    if args.device_id:  # forget it in the fleet too: clear its retained presence, drop it from the registry
        from ..session import Session

        try:
            with Session(args.broker, args.fleet, _store(args), **_connection(args, args.broker)).start(
                args.connect_timeout
            ) as session:
                # clear only once the agent's last word (its own "offline" or its Will) is in, or it would
                # land after the clear and bring the device back as a retained ghost
                session.discover(1.0)
                session.wait_for(
                    lambda rows: all(r["device_id"] != args.device_id or r["state"] == "offline" for r in rows), 30
                )
                session.clear_device(args.device_id)
            result["forgotten"] = args.device_id
        except (ConnectionError, RuntimeError, OSError) as exc:  # the device is gone either way
            result["forget_error"] = f"{type(exc).__name__}: {exc}"
    if args.json:
        output.print_json(result)
    elif result.get("not_installed"):
        print(f"{target}: no edgeprune agent installed; nothing to remove")
    else:
        print(f"removed the edgeprune agent from {target}: " + ", ".join(result.get("removed", [])))
        if result.get("forget_error"):
            print(f"could not clear {args.device_id} from the fleet: {result['forget_error']}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "flash",
        help="install the agent on a device over SSH (or write an offline bundle)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
    Install (or upgrade) the edgeprune agent on a device over SSH and wait until it
    is online in the fleet:

      edgeprune flash pi@raspberrypi.local --device-id pi-01 --broker mqtt://192.168.1.10:1883

    It probes the device (architecture, OS, Python, disk, systemd, root, broker
    reachability), builds an offline bundle of wheels for exactly that platform
    (cached; --train adds TensorFlow + TF-MOT so the device can train), copies it with
    scp, installs it into a venv with pip --no-index, writes the agent config (mode
    0600) and starts a systemd unit (system unit as root, user unit with lingering
    otherwise; a supervisor process where systemd is absent). Running it again
    upgrades in place and keeps the device's identity, config and state.

    For a device without network, write the bundle and install it by hand:

      edgeprune flash --bundle agent.tar.gz --arch aarch64 --python 3.11
      scp agent.tar.gz pi@raspberrypi.local: ; then on the device:
      tar xzf agent.tar.gz && sh edgeprune-agent-*/install.sh --device-id pi-01 --broker mqtt://LAPTOP:1883""",
    )
    p.add_argument("target", nargs="?", help="[ssh://]USER@HOST[:PORT] (your ~/.ssh/config applies)")
    _common(p)
    p.add_argument("--device-id", help="the device's id in the fleet, [A-Za-z0-9_-]")
    p.add_argument("--data", help="training data on the device: a path there (.npz, .csv, image folder) or 'digits'")
    p.add_argument(
        "--train", action="store_true", help="also install TensorFlow + TF-MOT so the device can train (~600 MB)"
    )
    _ssh_arguments(p)
    p.add_argument("--remote-python", default="python3", help="the Python interpreter on the device (default python3)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other agent setting for the device's config, repeatable (edgeprune-agent settings)",
    )
    p.add_argument(
        "--device-username",
        help="MQTT user name the device connects with (password authentication; "
        "with --device-password-file) [default: none]",
    )
    p.add_argument(
        "--device-password-file",
        help="file (mode 0600) with that user's password: copied to the device "
        "0600, never put on a command line [default: none]",
    )
    p.add_argument("--reinstall", action="store_true", help="make a fresh venv even if this bundle is installed")
    p.add_argument("--from-bundle", help="install this bundle file instead of building one")
    p.add_argument(
        "--offline", action="store_true", help="build bundles from the local wheel cache only; never download"
    )
    p.add_argument("--local-broker", help="broker URL as this laptop sees it, if different from --broker")
    p.add_argument(
        "--online-timeout", type=float, default=120.0, help="seconds to wait for the device online (default 120)"
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    g = p.add_argument_group("offline bundle only (no TARGET)")
    g.add_argument("--bundle", metavar="OUT.tar.gz", help="only write the offline bundle to this file")
    g.add_argument("--arch", default="aarch64", help="device architecture as `uname -m` prints it (default aarch64)")
    g.add_argument(
        "--python",
        dest="python_version",
        default="3.11",
        help="device Python major.minor (default 3.11 = Raspberry Pi OS Bookworm)",
    )
    g.add_argument("--glibc", default="2.36", help="device glibc version (default 2.36 = Bookworm)")
    p.set_defaults(func=cmd_flash)
    p = sub.add_parser(
        "unflash",
        help="stop and remove the agent from a device over SSH",
        description="Stop the agent's service and remove it, its venvs, its config and (unless "
        "--keep-state) its state from the device. With --device-id it also clears the "
        "device's retained presence on the broker and drops it from the registry.",
    )
    p.add_argument("target", help="[ssh://]USER@HOST[:PORT]")
    _common(p)
    p.add_argument("--device-id", help="also forget this device in the fleet")
    p.add_argument("--keep-state", action="store_true", help="keep the agent's state directory (blob cache)")
    _ssh_arguments(p)
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_unflash)
