"""`slmfed deploy ...` (coordinator side) and `slmfed site ...` (hospital side)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from common.cli import CommandError


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def cmd_init(args) -> int:
    from deploy import pki
    from deploy.init import DeployPlan, init_deployment

    plan = DeployPlan(
        out=Path(args.out), superlink_hosts=_split(args.superlink_host), sites=_split(args.sites),
        port=args.port, install_dir=args.install_dir, cache_dir=args.cache_dir, venv=args.venv,
        bind_host=args.bind_host, image=args.image,
    )
    try:
        files = init_deployment(plan, force=args.force)
    except (ValueError, pki.PKIError) as exc:
        raise CommandError(str(exc)) from None
    print(f"wrote {len(files)} files under {plan.out}")
    print(f"  coordinator bundle: {plan.out / 'coordinator'}  (SuperLink at {plan.address})")
    for s in plan.sites:
        print(f"  site bundle:        {plan.out / 'sites' / s}  -> copy to the site, then `slmfed site join`")
    print(f"  CA private key:     {plan.out / 'ca' / 'ca.key'}  (keep offline)")
    print(f"next: slmfed deploy check {plan.out}")
    return 0


def cmd_check(args) -> int:
    from deploy.check import check_deployment

    findings = check_deployment(args.dir)
    for f in findings:
        print(f)
    if findings:
        print(f"{len(findings)} finding(s)", file=sys.stderr)
        return 1
    print(f"{args.dir}: OK (TLS, SuperNode authentication, front door, no runtime installs, app approval, "
          "least privilege, private keys 0600, caches, privacy and DP policy, signing keys and peer rosters)")
    return 0


def cmd_register(args) -> int:
    """Print (or run) the `flwr supernode register` commands for the coordinator's site keys."""
    from deploy import bundle as B
    from deploy.init import FEDERATION

    try:
        b = B.read_bundle(args.bundle)
    except B.BundleError as exc:
        raise CommandError(str(exc)) from None
    if b.kind != "coordinator":
        raise CommandError(f"{args.bundle}: expected the coordinator bundle, found a {b.kind} bundle")
    names = b.data.get("sites", {}).get("names", [])
    keys = [b.root / B.SITE_KEYS_DIR / f"{n}.pub" for n in names]  # exactly the sites the bundle names
    missing = [str(k) for k in keys if not k.is_file()]
    if not keys or missing:
        raise CommandError(f"{b.root / B.SITE_KEYS_DIR}: no public key for "
                           f"{', '.join(missing) or 'any site ([sites] names is empty)'}")
    conn = args.connection or FEDERATION
    for k in keys:
        print(shlex.join(["flwr", "supernode", "register", str(k), conn, "--name", k.stem]))
    return 0


def cmd_register_sites(args) -> int:
    """Register the bundle's sites with the SuperLink and record which node is which site."""
    from deploy import bundle as B
    from deploy.registry import RegisterError, register_sites

    try:
        nodes = register_sites(args.bundle, args.registry, args.connection)
    except (RegisterError, B.BundleError) as exc:
        raise CommandError(str(exc)) from None
    for name, node in nodes.items():
        print(f"site {name}: node {node}")
    print(f"recorded in {args.registry}; the ServerApp enrols only these nodes (run config site-registry)")
    return 0


def cmd_approve(args) -> int:
    from deploy import bundle as B
    from deploy.launcher import LauncherError, approve

    allow = Path(args.bundle) / B.APPROVED_APPS
    try:
        digest = approve(allow, args.app, args.note or "", revoke=args.revoke)
    except (LauncherError, B.BundleError) as exc:
        raise CommandError(str(exc)) from None
    print(f"{'revoked' if args.revoke else 'approved'} app {digest} in {allow}")
    return 0


def cmd_launcher(args) -> int:
    from deploy.launcher import LauncherError, main

    try:
        return main(args.supernode, args.secret_file, args.approved, warm=args.warm, parent_pid=args.parent_pid)
    except LauncherError as exc:
        raise CommandError(str(exc)) from None


def cmd_join(args) -> int:
    from deploy import bundle as B
    from deploy.join import JoinError, join_command, join_env, launcher_command, preflight_tls

    try:
        argv = join_command(args.bundle, args.cache, port=args.port)
        if not args.no_preflight:
            warning = preflight_tls(B.read_bundle(args.bundle).data["superlink"]["address"],
                                    Path(args.bundle) / B.CA_CERT)
            if warning:
                print(f"slmfed site join: warning: {warning}", file=sys.stderr)
    except (JoinError, B.BundleError) as exc:
        raise CommandError(str(exc)) from None
    launcher = launcher_command(args.bundle, argv, warm=args.warm)
    if args.dry_run:
        print(shlex.join(argv))
        print(shlex.join(launcher))
        return 0
    sys.stdout.flush()
    # the site's launcher runs the approved apps; it stops when the SuperNode (this PID after exec) stops
    subprocess.Popen([*launcher, "--parent-pid", str(os.getpid())], env=join_env())
    os.execvpe(argv[0], argv, join_env())  # same PID: systemd / the caller can stop it by PID
    return 0  # pragma: no cover


def register(sub) -> None:
    from deploy import bundle as B

    p = sub.add_parser("deploy", help="certificates, keys and configs for a multi-hospital deployment")
    dsub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)

    pi = dsub.add_parser("init", help="generate the CA, SuperLink certificate, site keys and all configs")
    pi.add_argument("--out", required=True, help="output folder (coordinator/, sites/<name>/, ca/)")
    pi.add_argument("--superlink-host", action="append", required=True,
                    help="host name or IP sites use to reach the SuperLink (repeat or comma list; first is used in configs)")
    pi.add_argument("--sites", action="append", required=True, help="site names, comma list (e.g. a,b,c)")
    pi.add_argument("--port", type=int, default=B.DEFAULT_SUPERLINK_PORT, help="SuperLink port (default %(default)s)")
    pi.add_argument("--bind-host", default="0.0.0.0", help="address the SuperLink listens on (default %(default)s)")
    pi.add_argument("--install-dir", default=B.DEFAULT_INSTALL_DIR, help="where bundles are copied on each machine")
    pi.add_argument("--cache-dir", default=B.DEFAULT_CACHE_DIR, help="prepared cache path on site machines")
    pi.add_argument("--venv", default=B.DEFAULT_VENV, help="virtualenv holding slmfed + flwr on each machine")
    pi.add_argument("--image", default="slmfed:0.1.0", help="container image for the compose files")
    pi.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    pi.set_defaults(func=cmd_init)

    pc = dsub.add_parser("check", help="lint deployment configs (one line per finding, exit 1 if any)")
    pc.add_argument("dir", help="the `deploy init` folder, one bundle, or one config file")
    pc.set_defaults(func=cmd_check)

    pr = dsub.add_parser("register-commands", help="print the `flwr supernode register` command for each site key")
    pr.add_argument("bundle", help="the coordinator bundle folder")
    pr.add_argument("--connection", help="SuperLink connection name in $FLWR_HOME/config.toml (default slmfed)")
    pr.set_defaults(func=cmd_register)

    prs = dsub.add_parser("register-sites", help="register each site's key with the SuperLink and record which "
                                                 "node is which site (what register-sites.sh runs)")
    prs.add_argument("bundle", help="the coordinator bundle folder")
    prs.add_argument("--registry", required=True, help="the site registry to write (the ServerApp's site-registry)")
    prs.add_argument("--connection", default="slmfed", help="SuperLink connection in $FLWR_HOME/config.toml")
    prs.set_defaults(func=cmd_register_sites)

    s = sub.add_parser("site", help="hospital side: join the federation with a site bundle")
    ssub = s.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    pj = ssub.add_parser("join", help="check the bundle and cache, then start this site's SuperNode")
    pj.add_argument("--bundle", required=True, help="this site's bundle folder (from the coordinator)")
    pj.add_argument("--cache", required=True, help="the prepared cache (output of `slmfed prepare`)")
    pj.add_argument("--port", type=int, help="local Runtime API port (when several SuperNodes share a host)")
    pj.add_argument("--dry-run", action="store_true", help="print the flower-supernode command instead of starting it")
    pj.add_argument("--no-preflight", action="store_true", help="skip the TLS handshake check against the SuperLink")
    pj.add_argument("--no-warm", dest="warm", action="store_false",
                    help="the launcher starts a fresh Python per message instead of forking a warm one")
    pj.set_defaults(func=cmd_join)

    pa = ssub.add_parser("approve", help="approve the exact app (FAB) this site reviewed: its SHA-256 goes "
                                         "into the bundle's approved-apps.toml")
    pa.add_argument("--bundle", required=True, help="this site's bundle folder")
    pa.add_argument("app", help="a .fab file (flwr build), an app folder (built as `flwr run` builds it) or a SHA-256")
    pa.add_argument("--note", help="why / which release (kept beside the hash)")
    pa.add_argument("--revoke", action="store_true", help="remove the app from the allow-list instead")
    pa.set_defaults(func=cmd_approve)

    pl = ssub.add_parser("launcher", help="run the ClientApp for approved apps only (beside a SuperNode "
                                          "started with --isolation process)")
    pl.add_argument("--supernode", required=True, help="the SuperNode's Runtime API, host:port")
    pl.add_argument("--secret-file", required=True, help="the SuperExec secret shared with the SuperNode")
    pl.add_argument("--approved", required=True, help="the site's approved-apps.toml")
    pl.add_argument("--no-warm", dest="warm", action="store_false",
                    help="a fresh Python per message instead of forking from a warm interpreter")
    pl.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) exits")
    pl.set_defaults(func=cmd_launcher)
