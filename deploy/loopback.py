"""A real deployment on one machine (loopback): SuperLink with TLS + SuperNode authentication behind
the generated nginx front door, SuperNodes (+ their app launchers) started by `slmfed site join` from
generated bundles, sites registered and recorded by `deploy register-sites`, a study submitted with
`flwr run` on the coordinator's internal address.

Two loopback addresses keep the test honest: the front door listens on PUBLIC_HOST (what sites and
an attacker reach), the SuperLink on INTERNAL_HOST only (what the researcher's flwr reaches).

Why: the end-to-end test and `slmfed bench deploy` must exercise exactly the generated configs.
Every process is started in its own session and stopped by PID (its descendants too, found via
/proc before the parent goes), never by name, so other users' Flower processes are untouched.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.processes import descendants, free_port
from deploy import bundle as B
from deploy.init import DEFAULT_PRIVACY, FEDERATION, DeployPlan, init_deployment
from deploy.join import preflight_tls
from deploy.registry import register_site, register_sites

PUBLIC_HOST = "127.0.0.2"    # the front door: all that sites (and anyone else) can reach
INTERNAL_HOST = "127.0.0.1"  # the SuperLink itself: the coordinator's loopback


class NginxMissing(RuntimeError):
    """No nginx binary: the front door cannot be started here."""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).is_file()), None)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process and its descendants by PID, SIGKILL whatever is left after `grace`."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # already gone
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if proc.poll() is None:
        proc.wait(timeout=grace)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class LoopbackFederation:
    """One coordinator + N sites on 127.0.0.1, from `deploy init` bundles."""

    work: Path
    sites: list[str]
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    # the sites' [privacy] overrides (tests on tiny caches lower min-cell-size to its floor, 3)
    privacy: dict = field(default_factory=dict)

    # the sites' launchers: a warm interpreter (forkserver) or a fresh Python per message
    warm: bool = True
    # False: the deployment folder is written by `slmfed deploy init` run with init_options() (the
    # runbook test runs the runbook's own init line), then load(); True: written here, at once
    init: bool = True

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        self.out = self.work / "deployment"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(PUBLIC_HOST)
        self.internal_port = free_port(INTERNAL_HOST)
        self.supernode_port = _free_port_run(len(self.sites))
        self.state_dir = self.work / "state"     # the coordinator's /var/lib/slmfed
        self.log_dir = self.work / "var-log"     # its /var/log/slmfed (the SuperLink's --log-file)
        self.flwr_home = self.work / "flwr-researcher"
        self.address = f"{PUBLIC_HOST}:{self.port}"                  # sites dial this (the front door)
        self.internal_address = f"{INTERNAL_HOST}:{self.internal_port}"  # the researcher's flwr dials this
        self.registry = self.state_dir / B.SITE_REGISTRY
        if self.init:
            init_deployment(DeployPlan(out=self.out, superlink_hosts=[PUBLIC_HOST], sites=self.sites, port=self.port,
                                       bind_host=PUBLIC_HOST, internal_host=INTERNAL_HOST,
                                       internal_port=self.internal_port, supernode_port=self.supernode_port,
                                       state_dir=str(self.state_dir), log_dir=str(self.log_dir),
                                       privacy={**DEFAULT_PRIVACY, **self.privacy}))
            self.load()
            self.flwr_home.mkdir(exist_ok=True)
            # The researcher's connection, as flwr-config.toml says, with the CA where it lies here.
            (self.flwr_home / "config.toml").write_text(self.local_copy(self.coord.root / "flwr-config.toml"))

    def init_options(self) -> list[str]:
        """What `slmfed deploy init` needs beyond a deployment's own choices to run on this machine: the
        front door on PUBLIC_HOST, free ports, state and logs under the work folder, this interpreter's
        virtualenv, and the sites' [privacy] overrides (only min-cell-size has a flag)."""
        opts = ["--bind-host", PUBLIC_HOST, "--port", str(self.port), "--internal-port", str(self.internal_port),
                "--supernode-port", str(self.supernode_port), "--state-dir", str(self.state_dir),
                "--log-dir", str(self.log_dir), "--venv", sys.prefix]
        unsupported = set(self.privacy) - {"min-cell-size"}
        if unsupported:
            raise ValueError(f"deploy init has no flag for {sorted(unsupported)}")
        if "min-cell-size" in self.privacy:
            opts += ["--min-cell-size", str(self.privacy["min-cell-size"])]
        return opts

    def load(self) -> None:
        """Read the coordinator bundle `deploy init` wrote."""
        self.coord = B.read_bundle(self.out / "coordinator")

    def local_copy(self, path: Path) -> str:
        """A generated coordinator file with its install paths mapped into the bundle folder here."""
        return path.read_text().replace(f"{self.coord.install_dir}/", f"{self.coord.root}/")

    def _env(self, flwr_home: Path) -> dict[str, str]:
        # Flower starts flower-superexec / flwr-clientapp by name: this interpreter's bin dir comes
        # first, also when the venv is not activated (as in CI)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, **self.env, "FLWR_HOME": str(flwr_home), "PATH": path,
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
        return env

    def _spawn(self, name: str, argv: list[str], flwr_home: Path, extra_env: dict | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**self._env(flwr_home), **(extra_env or {})}, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- coordinator
    def start_superlink(self, timeout: float = 60.0, front_door: bool = True) -> None:
        """The SuperLink on the internal address, then (front_door) the generated nginx front door."""
        link = self.coord.data["superlink"]
        argv = B.superlink_argv(
            ca_cert=str(self.coord.root / B.COORD_CA), server_cert=str(self.coord.root / B.SERVER_CERT),
            server_key=str(self.coord.root / B.SERVER_KEY), host=link["internal-host"],
            port=int(link["internal-port"]), database=str(self.work / "superlink.db"),
            program=str(Path(sys.executable).with_name("flower-superlink")),
        )
        home = self.work / "flwr-superlink"
        home.mkdir(exist_ok=True)
        proc = self._spawn("superlink", argv, home)
        self._wait_tls(proc, "superlink", self.internal_address, timeout)
        if front_door:
            self.start_front_door(timeout)

    def start_superlink_unit(self, timeout: float = 60.0) -> None:
        """`systemctl enable --now flower-superlink` here: the generated unit's ExecStart with its
        Environment (install paths mapped into the bundle folder), as this user, without the unit's
        sandbox directives (User, ProtectSystem, ...), which only systemd applies."""
        from deploy.check import _systemd_commands

        unit = self.coord.root / "flower-superlink.service"
        cmds = list(_systemd_commands(unit, self.local_copy(unit)))
        if len(cmds) != 1:
            raise RuntimeError(f"{unit}: expected one ExecStart, found {len(cmds)}")
        argv, env = cmds[0].argv, cmds[0].env
        home = Path(env.get("FLWR_HOME") or self.work / "flwr-superlink")
        home.mkdir(parents=True, exist_ok=True)
        proc = self._spawn("superlink", argv, home, extra_env={k: v for k, v in env.items() if k != "FLWR_HOME"})
        self._wait_tls(proc, "superlink", self.internal_address, timeout)

    def _wait_tls(self, proc: subprocess.Popen, name: str, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
            if preflight_tls(address, self.coord.root / B.COORD_CA, timeout=1.0) is None:
                return
            time.sleep(0.3)
        raise RuntimeError(f"{name} did not accept TLS connections on {address} within {timeout:.0f}s")

    def start_front_door(self, timeout: float = 30.0) -> None:
        """nginx with the generated front-door config (install paths mapped here), in the foreground."""
        nginx, main = self.front_door_config()
        run = main.parent
        proc = self._spawn("front-door", [nginx, "-p", str(run), "-c", str(main), "-e", str(self.logs / "front-door.log")],
                           self.work)
        self._wait_tls(proc, "front-door", self.address, timeout)

    def nginx_test(self) -> subprocess.CompletedProcess:
        """`nginx -t` of the front door as start_front_door runs it (the host's nginx.conf replaced by a
        minimal one that includes only the generated front door)."""
        nginx, main = self.front_door_config()
        return subprocess.run([nginx, "-t", "-p", str(main.parent), "-c", str(main), "-e", str(self.logs / "front-door.log")],
                              capture_output=True, text=True, timeout=60)

    def front_door_config(self) -> tuple[str, Path]:
        """(nginx binary, the main config written under the work folder)."""
        nginx = nginx_binary()
        if nginx is None:
            raise NginxMissing("nginx is not installed (apt-get install -y nginx); the front door cannot start")
        run = self.work / "nginx"
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (run / d).mkdir(parents=True, exist_ok=True)
        site = run / B.FRONT_DOOR
        # the front door's own access log (what it logs: no request header) goes to this run's logs
        site.write_text(self.local_copy(self.coord.root / B.FRONT_DOOR).replace(
            B.FRONT_DOOR_ACCESS_LOG, str(self.logs / "front-door-access.log")))
        temp = " ".join(f"{d}_temp_path {run / d.split('_')[-1]};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        main = run / "nginx.conf"
        main.write_text(
            f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {run / 'nginx.pid'};\n"
            f"error_log {self.logs / 'front-door.log'} info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    {temp}\n"
            f"    include {site};\n}}\n")
        return nginx, main

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("flwr")), *args], capture_output=True, text=True,
                              env=self._env(self.flwr_home), timeout=timeout, cwd=self.work)

    def register_sites(self) -> dict[str, int]:
        """What register-sites.sh runs: register every site's key and record node id -> site."""
        return register_sites(self.coord.root, self.registry, FEDERATION, env=self._env(self.flwr_home))

    def register_unrecorded(self, key_file: Path, name: str) -> int:
        """Register a key with the SuperLink WITHOUT recording it as a site (a careless admin's extra key)."""
        return register_site(key_file, name, FEDERATION, env=self._env(self.flwr_home))

    def approve(self, site: str, fab_hash: str) -> None:
        from deploy.launcher import approve

        approve(self.site_bundle(site) / B.APPROVED_APPS, fab_hash, "the reviewed release")

    # --- sites
    def site_bundle(self, site: str) -> Path:
        return self.out / "sites" / site

    def join(self, site: str, cache: Path, *, bundle: Path | None = None, bundle_port: bool = False) -> subprocess.Popen:
        """`slmfed site join` as a site runs it (python -m common.cli is the `slmfed` entry point); on a
        free port, or (bundle_port) on the Runtime API port of the site's bundle, as its unit does."""
        argv = [sys.executable, "-m", "common.cli", "site", "join", "--bundle", str(bundle or self.site_bundle(site)),
                "--cache", str(cache)] + ([] if bundle_port else ["--port", str(free_port())])
        if not self.warm:
            argv.append("--no-warm")
        home = self.work / f"flwr-{site}"
        home.mkdir(exist_ok=True)
        return self._spawn(f"site-{site}", argv, home)

    def supernode(self, name: str, argv_tail: list[str], *, internal: bool = False) -> subprocess.Popen:
        """A hand-configured flower-supernode (for the refusal tests); `internal`: dialling the SuperLink
        itself, past the front door (which lets through only the deployment's site keys)."""
        argv = [str(Path(sys.executable).with_name("flower-supernode")), "--superlink",
                self.internal_address if internal else self.address,
                "--port", str(free_port()), *argv_tail]
        home = self.work / f"flwr-{name}"
        home.mkdir(exist_ok=True)
        return self._spawn(name, argv, home)

    def wait_connected(self, n: int, timeout: float = 60.0) -> None:
        """Until the SuperLink lists n online SuperNodes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.flwr("supernode", "list", FEDERATION, "--format", "json", timeout=30)
            if res.returncode == 0 and res.stdout.count('"online"') >= n:
                return
            time.sleep(1.0)
        raise RuntimeError(f"fewer than {n} SuperNodes online after {timeout:.0f}s:\n{res.stdout[-2000:]}")

    # --- researcher
    def run_study(self, app_dir: Path, run_config: dict, timeout: float = 900.0) -> tuple[subprocess.CompletedProcess, float]:
        if self.registry.is_file():
            run_config = {"site-registry": str(self.registry), **run_config}
        cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        t0 = time.perf_counter()
        # the runbook's researcher command: `flwr run ... --stream`, then non-zero unless the run completed
        # with result rows (deploy/study.py)
        res = subprocess.run([sys.executable, "-m", "common.cli", "deploy", "run", str(app_dir), FEDERATION,
                              "--run-config", cfg], capture_output=True, text=True, env=self._env(self.flwr_home),
                             timeout=timeout, cwd=self.work)
        return res, time.perf_counter() - t0

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            stop_process(self.procs[name])

    def __enter__(self) -> "LoopbackFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port_run(n: int, host: str = "127.0.0.1") -> int:
    """A port p with p .. p+n-1 free now (the sites' Runtime API ports, as `deploy init` numbers them)."""
    for _ in range(50):
        p = free_port(host)
        if p + n - 1 <= 65535 and all(_port_free(host, q) for q in range(p + 1, p + n)):
            return p
    raise RuntimeError(f"no run of {n} free ports found on {host}")


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return '"' + str(v).replace('"', '\\"') + '"'


def command_line(argv: list[str]) -> str:
    return shlex.join(argv)
