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

    from deploy import bundle as B

    privacy = dict(B.DEFAULT_SITE_PRIVACY)
    if args.min_cell_size is not None:
        privacy["min-cell-size"] = args.min_cell_size
    plan = DeployPlan(
        out=Path(args.out), superlink_hosts=_split(args.superlink_host), sites=_split(args.sites),
        port=args.port, internal_port=args.internal_port, supernode_port=args.supernode_port,
        install_dir=args.install_dir, cache_dir=args.cache_dir, venv=args.venv,
        state_dir=args.state_dir, log_dir=args.log_dir,
        bind_host=args.bind_host, image=args.image, privacy=privacy,
    )
    try:
        files = init_deployment(plan, force=args.force)
    except (ValueError, pki.PKIError) as exc:
        raise CommandError(str(exc)) from None
    print(f"wrote {len(files)} files under {plan.out}")
    print(f"  coordinator bundle: {plan.out / 'coordinator'}  (front door at {plan.address}, "
          f"SuperLink on {plan.internal_host}:{plan.internal_port})")
    for i, s in enumerate(plan.sites):
        print(f"  site bundle:        {plan.out / 'sites' / s}  (Runtime API port {plan.supernode_port + i}, "
              f"k = {plan.privacy['min-cell-size']})  -> copy to the site")
    from deploy import pki

    print(f"  deployment CA:      SHA-256 {pki.fingerprint(pki.load_cert(plan.out / 'ca' / 'ca.crt'))}"
          "  (tell each site by phone; `deploy check` of a site bundle prints it)")
    print(f"  CA private key:     {plan.out / 'ca' / 'ca.key'}  (keep offline)")
    print(f"next: slmfed deploy check {plan.out}")
    return 0


def cmd_check(args) -> int:
    from deploy.check import check_deployment, pinned_ca_notes

    findings = check_deployment(args.dir)
    problems = [f for f in findings if not f.warning]
    for f in findings:
        print(f)
    for note in pinned_ca_notes(args.dir):
        print(note)
    if problems:
        print(f"{len(problems)} finding(s)" + (f", {len(findings) - len(problems)} warning(s)"
                                               if len(findings) > len(problems) else ""), file=sys.stderr)
        return 1
    print(f"{args.dir}: OK (TLS, SuperNode authentication, front door, no runtime installs, app approval, "
          "least privilege, private keys 0600, caches, privacy and DP policy, signing keys and peer rosters)"
          + (f"; {len(findings)} warning(s) above" if findings else ""))
    return 0


def cmd_run(args) -> int:
    from deploy.study import run_study

    outcome = run_study(args.app, args.connection, args.run_config or [])
    print(f"slmfed deploy run: {outcome.message}", file=sys.stderr if outcome.code else sys.stdout)
    return outcome.code


def cmd_status(args) -> int:
    from deploy.status import status

    lines, code = status(args.bundle, connection=args.connection, registry=args.registry, run_dir=args.run_dir)
    for line in lines:
        print(line)
    return code


def cmd_sync(args) -> int:
    from deploy import bundle as B
    from deploy.sync import sync_site

    try:
        changed = sync_site(args.bundle)
    except B.BundleError as exc:
        raise CommandError(str(exc)) from None
    for path in changed:
        print(f"rewrote the SuperNode command in {path} from {Path(args.bundle) / B.BUNDLE_FILE}")
    if not changed:
        print(f"{args.bundle}: the SuperNode commands already match bundle.toml")
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
                    help="public host name or IP of the coordinator's front door (nginx), what sites dial; the "
                         "SuperLink certificate carries it (repeat or comma list; the first is used in configs)")
    pi.add_argument("--sites", action="append", required=True, help="site names, comma list (e.g. a,b,c)")
    pi.add_argument("--port", type=int, default=B.DEFAULT_SUPERLINK_PORT,
                    help="the front door's public port, what sites dial (default %(default)s)")
    pi.add_argument("--bind-host", default="0.0.0.0",
                    help="address the front door (nginx) listens on (default %(default)s); the SuperLink itself "
                         "always listens on 127.0.0.1")
    pi.add_argument("--internal-port", type=int, default=B.DEFAULT_INTERNAL_PORT,
                    help="the SuperLink's own port on the coordinator's loopback: the front door forwards to it, "
                         "the researcher's flwr dials it (default %(default)s)")
    pi.add_argument("--supernode-port", type=int, default=B.DEFAULT_SUPERNODE_PORT,
                    help="the first site's SuperNode Runtime API port on its loopback; site i gets this + i, so "
                         "sites sharing a host never collide (default %(default)s)")
    pi.add_argument("--min-cell-size", type=int,
                    help="k for every site's [privacy] (default 10; 3 is the floor): written once into each site's "
                         "bundle.toml and its SuperNode commands; a site changes it later with `slmfed site "
                         "sync-policy` after editing its bundle.toml")
    pi.add_argument("--install-dir", default=B.DEFAULT_INSTALL_DIR, help="where bundles are copied on each machine")
    pi.add_argument("--cache-dir", default=B.DEFAULT_CACHE_DIR, help="prepared cache path on site machines")
    pi.add_argument("--venv", default=B.DEFAULT_VENV, help="virtualenv holding slmfed + flwr on each machine")
    pi.add_argument("--state-dir", default=B.DEFAULT_STATE_DIR,
                    help="writable state on each machine: the SuperLink's database and the site registry "
                         "(coordinator), the SuperNode's state (site); the ClientApp's is this + '-app' "
                         "(default %(default)s)")
    pi.add_argument("--log-dir", default=B.DEFAULT_LOG_DIR, help="the SuperLink's log folder (default %(default)s)")
    pi.add_argument("--image", default="slmfed:0.1.0", help="container image for the compose files")
    pi.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    pi.set_defaults(func=cmd_init)

    pc = dsub.add_parser("check", help="lint deployment configs (one line per finding, exit 1 if any)")
    pc.add_argument("dir", help="the `deploy init` folder, one bundle, or one config file")
    pc.set_defaults(func=cmd_check)

    pu = dsub.add_parser("run", help="the researcher's study command: `flwr run APP CONNECTION --stream` with "
                                     "the run config, then a non-zero exit when the run failed or left no result")
    pu.add_argument("app", nargs="?", default=".", help="the app folder (default: the current folder)")
    pu.add_argument("connection", nargs="?", default="slmfed", help="SuperLink connection (default %(default)s)")
    pu.add_argument("--run-config", "-c", action="append", help="as for flwr run (key=value pairs; repeatable)")
    pu.set_defaults(func=cmd_run)

    pt = dsub.add_parser("status", help="which processes are up, which sites are online, approved and recorded, "
                                        "and how the last run ended")
    pt.add_argument("bundle", nargs="?", default=B.DEFAULT_INSTALL_DIR,
                    help="the installed coordinator or site bundle (default %(default)s)")
    pt.add_argument("--connection", default="slmfed", help="coordinator: SuperLink connection (default %(default)s)")
    pt.add_argument("--registry", help="coordinator: the site registry (default: bundle.toml [sites] registry)")
    pt.add_argument("--run-dir", help="coordinator: a run folder whose results.json to summarise")
    pt.set_defaults(func=cmd_status)

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

    py = ssub.add_parser("sync-policy", help="after editing bundle.toml ([privacy], [node]): rewrite the SuperNode "
                                            "command of the bundle's systemd unit and compose file to match it")
    py.add_argument("--bundle", required=True, help="this site's bundle folder")
    py.set_defaults(func=cmd_sync)

    pl = ssub.add_parser("launcher", help="run the ClientApp for approved apps only (beside a SuperNode "
                                          "started with --isolation process)")
    pl.add_argument("--supernode", required=True, help="the SuperNode's Runtime API, host:port")
    pl.add_argument("--secret-file", required=True, help="the SuperExec secret shared with the SuperNode")
    pl.add_argument("--approved", required=True, help="the site's approved-apps.toml")
    pl.add_argument("--no-warm", dest="warm", action="store_false",
                    help="a fresh Python per message instead of forking from a warm interpreter")
    pl.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) exits")
    pl.set_defaults(func=cmd_launcher)
