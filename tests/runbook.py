"""The runbook of deploy/README.md, read step by step and run on one machine (deploy.loopback).

The runbook's commands are the fenced `bash` blocks of its numbered steps (C1.1 ... R3.2); a block whose
first line begins `# for reference` is not typed and not run. They are extracted with the shell reader
of tests/test_doc_commands.py (the README command test): `\\` continuations, `&&` / `;` lists,
comments, quotes. Each simple command is then run as written, except for what one machine needs
instead of a coordinator host and two hospital hosts; that mapping is all here:

Paths and names (substituted in every word, longest first):
  coordinator steps (C1, R3): /etc/slmfed -> deployment/coordinator (the bundle is used where
    `deploy init` wrote it), /var/lib/slmfed -> the state folder and /var/log/slmfed -> the log folder
    that the init line was given (`--state-dir`, `--log-dir`), ~/.flwr -> the researcher's FLWR_HOME;
    the commands run in the work folder (so `deployment` is the init line's output).
  hospital steps (H2, once per site): the runbook's example site `center-primary` -> that site,
    /etc/slmfed -> deployment/sites/<site>, /data/slm-site -> the site's folder of the synthetic
    cohort (`slmfed synth --preset small`; the test writes each a site.toml), /opt/slmfed/src -> the release the sites approve (the FAB
    of this checkout, unpacked), /srv/slmfed, /var/lib/slmfed and /var/lib/slmfed-app -> folders under
    hosts/<site>/; the commands run in deployment/sites (where `center-primary/.` is the received folder).
  files the commands read from a bundle (the SuperLink unit, flwr-config.toml, the front door) have their
    install paths mapped the same way (LoopbackFederation.local_copy).
Commands added to:
  C1.1 `slmfed deploy init`: + LoopbackFederation.init_options() (front door on 127.0.0.2, free ports,
    state / logs in the work folder, this virtualenv, k = 3 for the small cohort); the host name
    slm.coordinator.example.org -> 127.0.0.2.
  R3.1 `slmfed deploy run`: + one `--run-config` with a one-round, two-fold, DL-only study without
    augmentation (CI time);
    the runbook's own keys (scenario, run-dir, site-registry) are passed unchanged; it runs in the
    unpacked release (the researcher's "clean checkout"), so `.` is the app.
Commands replaced (no root, no systemd here):
  `useradd`, `chown`: skipped (one user runs everything); `cp` of a bundle onto itself (the mapped
  install dir is the bundle) and `cp` into /etc/systemd/system/ or /etc/nginx/conf.d/: skipped;
  `rm -f /etc/nginx/sites-enabled/default`: skipped (the nginx here includes only the front door);
  `apt-get install -y nginx`: nginx must be installed; `nginx -t`: `nginx -t` of the front door with a
  minimal main config; `systemctl enable --now flower-superlink`: the unit's ExecStart + Environment
  (LoopbackFederation.start_superlink_unit); `systemctl reload nginx`: nginx in the foreground with the
  front door; `systemctl enable --now flower-supernode slmfed-launcher`: `slmfed site join --bundle
  /etc/slmfed --cache /srv/slmfed/cache` (mapped), which the runbook names as the alternative.
Anything else (a new program, another `systemctl` verb, a `cp` elsewhere) fails, naming the step, the
README line and the command, so an edited runbook is either run as edited or reported.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from test_doc_commands import logical_lines, markdown_blocks, tokenize

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "deploy" / "README.md"
EXAMPLE_SITE = "center-primary"          # the site the runbook's hospital commands name
EXAMPLE_HOST = "slm.coordinator.example.org"
REFERENCE = "# for reference"


# the programs _one maps (each only in the forms it checks there): a runbook command with any other fails
MAPPED_PROGRAMS = {"useradd", "chown", "mkdir", "chmod", "cp", "rm", "apt-get", "nginx", "systemctl", "cat", "sh", "slmfed"}


class RunbookError(AssertionError):
    """A runbook command that failed or has no mapping here; the message names the step and line."""


@dataclass
class Step:
    id: str                   # "C1.4"
    line: int                 # README line of the step's number
    commands: list[tuple[int, str]] = field(default_factory=list)  # (README line, logical shell line)


def runbook_steps(path: Path = RUNBOOK) -> dict[str, Step]:
    """Every numbered step of the runbook's C/H/R sections with the logical lines of its bash blocks."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines, 1) if l.startswith("## Runbook"))
    end = next((i for i, l in enumerate(lines, 1) if i > start and l.startswith("## ")), len(lines) + 1)
    marks: list[tuple[int, str | None]] = []  # (line, step id or None outside a numbered step)
    section = None
    for no in range(start, end):
        line = lines[no - 1]
        if m := re.match(r"^### ([A-Z]\d)\. ", line):
            section = m.group(1)
            marks.append((no, None))
        elif line.startswith("#"):
            section = None
            marks.append((no, None))
        elif section and (m := re.match(r"^(\d+)\. ", line)):
            marks.append((no, f"{section}.{m.group(1)}"))
        elif section and line and not line.startswith(" "):  # a paragraph after the numbered list
            marks.append((no, None))
    steps = {sid: Step(sid, no) for no, sid in marks if sid}

    def owner(no: int) -> str | None:
        found = None
        for mark, sid in marks:
            if mark > no:
                break
            found = sid
        return found

    for info, body in markdown_blocks(text):
        if not body or not start < body[0][0] < end or info != "bash":
            continue
        sid = owner(body[0][0])
        if sid is None:
            continue
        if body[0][1].strip().startswith(REFERENCE):
            continue
        steps[sid].commands += [(no, l) for no, l in logical_lines(body) if l.strip() and not l.strip().startswith("#")]
    return steps


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a logical line joined by `&&` or `;` (other operators are not in the runbook
    and have no mapping); redirections stay in argv (`>>`, its target)."""
    cmds, cur = [], []
    for word, is_op in tokenize(line):
        if not is_op:
            cur.append(word)
        elif word in ("&&", ";"):
            cmds.append(cur)
            cur = []
        else:
            raise ValueError(f"operator {word!r} has no mapping")
    cmds.append(cur)
    return [c for c in cmds if c]


def _answers(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _is_status(argv: list[str]) -> bool:
    return _strip_sudo(argv)[:3] == ["slmfed", "deploy", "status"]


def _strip_sudo(argv: list[str]) -> list[str]:
    while argv and argv[0] == "sudo":
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    return argv


@dataclass
class Ran:
    step: str
    where: str
    command: str          # as written in the runbook
    mapped: str           # what ran here ("skipped: why" when nothing ran)
    rc: int = 0
    output: str = ""
    seconds: float = 0.0


class LoopbackRunbook:
    """Runs runbook steps on a deploy.loopback.LoopbackFederation created with init=False."""

    def __init__(self, fed, *, cohort: Path | None = None, release: Path | None = None,
                 study_config: str = "", path: Path = RUNBOOK):
        self.fed = fed
        self.path = path
        self.steps = runbook_steps(path)
        self.cohort = cohort
        self.release = release
        self.study_config = study_config
        self.ran: list[Ran] = []

    # --- the mapping
    def site_host(self, site: str) -> Path:
        return self.fed.work / "hosts" / site

    def cache(self, site: str) -> Path:
        return self.site_host(site) / "srv" / "slmfed" / "cache"

    def _paths(self, site: str | None) -> list[tuple[str, str]]:
        f = self.fed
        if site is None:
            return [("/etc/slmfed", str(f.out / "coordinator")), ("/var/lib/slmfed", str(f.state_dir)),
                    ("/var/log/slmfed", str(f.log_dir)), ("~/.flwr", str(f.flwr_home))]
        host = self.site_host(site)
        out = [("/etc/slmfed", str(f.site_bundle(site))),
               ("/var/lib/slmfed-app", str(host / "var" / "lib" / "slmfed-app")),
               ("/var/lib/slmfed", str(host / "var" / "lib" / "slmfed")),
               ("/srv/slmfed", str(host / "srv" / "slmfed"))]
        if self.cohort is not None:
            out.append(("/data/slm-site", str(self.cohort / site)))
        if self.release is not None:
            out.append(("/opt/slmfed/src", str(self.release)))
        return out

    def map_word(self, word: str, site: str | None) -> str:
        if site is not None:
            word = re.sub(rf"(?<![\w.-]){re.escape(EXAMPLE_SITE)}(?![\w-])", site, word)
        word = word.replace(EXAMPLE_HOST, "127.0.0.2")
        for src, dst in self._paths(site):
            word = re.sub(rf"(?<![\w.~-]){re.escape(src)}(?![\w-])", lambda _: dst, word)
        return word

    def _cwd(self, step: str, site: str | None) -> Path:
        if site is not None:
            return self.fed.out / "sites"
        if step.startswith("R") and self.release is not None:
            return self.release
        return self.fed.work

    def _env(self, site: str | None) -> dict[str, str]:
        home = self.fed.flwr_home if site is None else self.fed.work / f"flwr-{site}"
        home.mkdir(parents=True, exist_ok=True)
        return self.fed._env(home)

    def _inside(self, paths: list[str], where: str) -> None:
        for p in paths:
            if not Path(p).resolve().is_relative_to(self.fed.work.resolve()):
                raise RunbookError(f"{where}: {p} is outside the loopback folder {self.fed.work} (no mapping for it)")

    # --- running
    def run(self, step_id: str, site: str | None = None, *, check: bool = True, only_status: bool = False) -> list[Ran]:
        """Run every command of the step; with check, a non-zero exit fails naming the step, except for
        `slmfed deploy status` (exit 1 while something is DOWN, e.g. a site not yet online: see watch)."""
        if step_id not in self.steps:
            raise RunbookError(f"{self.path.name}: the runbook has no step {step_id} (steps: {', '.join(self.steps)})")
        step = self.steps[step_id]
        if step_id.startswith("H") and site is None:
            raise RunbookError(f"step {step_id} is a hospital step: name the site")
        done = []
        for no, line in step.commands:
            where = f"runbook step {step_id} ({self.path.name}:{no})"
            try:
                cmds = split_commands(line)
            except ValueError as exc:
                raise RunbookError(f"{where}: `{line.strip()}`: {exc}") from None
            for argv in cmds:
                status = _is_status(argv)
                if only_status and not status:
                    continue
                t0 = time.perf_counter()
                r = self._one(step_id, where, argv, site)
                r.seconds = time.perf_counter() - t0
                self.ran.append(r)
                with (self.fed.logs / "runbook.log").open("a", encoding="utf-8") as log:  # what ran, for a failure
                    log.write(f"{where}{f' [{site}]' if site else ''}: {r.command}\n    -> {r.mapped}\n"
                              f"    exit {r.rc} in {r.seconds:.1f} s\n")
                done.append(r)
                if check and r.rc != 0 and not status:
                    raise RunbookError(f"{where}: `{r.command}` exited {r.rc} (ran: {r.mapped})\n{r.output[-3000:]}")
        return done

    def watch(self, step_id: str, site: str | None = None, timeout: float = 120.0) -> list[Ran]:
        """Re-run the step's `slmfed deploy status` ("watch ... come online") until it exits 0; first, a
        cheaper probe of what it waits for (a site: its SuperNode's Runtime API port answers; the
        coordinator: the SuperLink lists every site online), so the status command runs about once."""
        deadline = time.monotonic() + timeout
        if site is None:
            self.fed.wait_connected(len(self.fed.sites), timeout=timeout)
        else:
            port = self.fed.supernode_port + self.fed.sites.index(site)
            while not _answers("127.0.0.1", port) and time.monotonic() < deadline:
                time.sleep(0.2)  # probe interval
        while True:
            done = self.run(step_id, site, check=False, only_status=True)
            if not done:
                raise RunbookError(f"runbook step {step_id}: no `slmfed deploy status` to watch")
            if all(r.rc == 0 for r in done) or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # between probes of the SuperLink's state
        bad = [r for r in done if r.rc != 0]
        if bad:
            raise RunbookError(f"runbook step {step_id}: `{bad[0].command}` still exits {bad[0].rc} after "
                               f"{timeout:.0f}s:\n{bad[0].output[-3000:]}")
        return done

    def _one(self, step: str, where: str, written: list[str], site: str | None) -> Ran:
        command = shlex.join(written)
        argv = _strip_sudo(list(written))
        mapped = [self.map_word(w, site) for w in argv]
        prog = argv[0] if argv else ""
        fed = self.fed

        def skipped(why: str) -> Ran:
            return Ran(step, where, command, f"skipped: {why}")

        if prog in ("useradd", "chown"):
            return skipped("one user runs everything on loopback")
        if prog == "mkdir":
            dirs = [d for d in mapped[1:] if not d.startswith("-")]
            self._inside(dirs, where)
            for d in dirs:
                Path(d).mkdir(parents=True, exist_ok=True)
            return Ran(step, where, command, shlex.join(mapped))
        if prog == "chmod":
            mode, files = mapped[1], mapped[2:]
            self._inside(files, where)
            for p in files:
                os.chmod(p, int(mode, 8))
            return Ran(step, where, command, shlex.join(mapped))
        if prog == "cp":
            args = [a for a in mapped[1:] if not a.startswith("-")]
            srcs, dest = args[:-1], args[-1]
            if dest.startswith(("/etc/systemd/system", "/etc/nginx/conf.d/")):
                return skipped(f"no systemd / host nginx here: {dest} is used from the bundle")
            cwd = self._cwd(step, site)
            same = [(cwd / s.rstrip(".")).resolve() == (cwd / dest).resolve() for s in srcs]
            if srcs and all(same):
                return skipped("the bundle is used where it lies (the mapped install dir)")
            raise RunbookError(f"{where}: `{command}`: no loopback mapping for this cp")
        if prog == "rm" and mapped[1:] == ["-f", "/etc/nginx/sites-enabled/default"]:
            return skipped("the nginx here has no default site (its main config includes only the front door)")
        if prog == "apt-get" and mapped[1:] == ["install", "-y", "nginx"]:
            from deploy.loopback import nginx_binary

            if nginx_binary() is None:
                raise RunbookError(f"{where}: nginx is not installed")
            return skipped("nginx is installed")
        if prog == "nginx" and mapped[1:] == ["-t"]:
            res = fed.nginx_test()
            return Ran(step, where, command, "nginx -t (front door, minimal main config)", res.returncode,
                       res.stdout + res.stderr)
        if prog == "systemctl":
            verb = mapped[1:]
            if verb == ["enable", "--now", "flower-superlink"] and site is None:
                fed.start_superlink_unit()
                return Ran(step, where, command, "the unit's ExecStart (start_superlink_unit)")
            if verb == ["reload", "nginx"] and site is None:
                fed.start_front_door()
                return Ran(step, where, command, "nginx with the front door (start_front_door)")
            if verb == ["enable", "--now", "flower-supernode", "slmfed-launcher"] and site is not None:
                fed.join(site, self.cache(site), bundle_port=True)
                return Ran(step, where, command,
                           f"slmfed site join --bundle {fed.site_bundle(site)} --cache {self.cache(site)}")
            raise RunbookError(f"{where}: `{command}`: no loopback mapping for this systemctl call")
        if prog == "cat" and len(mapped) == 4 and mapped[2] == ">>":
            self._inside([mapped[1], mapped[3]], where)
            with open(mapped[3], "a", encoding="utf-8") as out:
                out.write(fed.local_copy(Path(mapped[1])) if site is None else Path(mapped[1]).read_text())
            return Ran(step, where, command, f"append {mapped[1]} (install paths mapped) to {mapped[3]}")
        if prog == "sh" and len(mapped) == 2:
            self._inside([mapped[1]], where)
            return self._exec(step, where, command, ["sh", mapped[1]], site)
        if prog == "slmfed":
            args = mapped[1:]
            if args[:2] == ["deploy", "init"]:
                args = args + fed.init_options()
            if args[:2] == ["deploy", "run"] and self.study_config:
                args = args + ["--run-config", self.study_config]
            exe = Path(sys.executable).with_name("slmfed")
            prefix = [str(exe)] if exe.is_file() else [sys.executable, "-m", "common.cli"]
            return self._exec(step, where, command, prefix + args, site)
        raise RunbookError(f"{where}: `{command}`: no loopback mapping for `{prog}` (tests/runbook.py)")

    def _exec(self, step: str, where: str, command: str, argv: list[str], site: str | None) -> Ran:
        res = subprocess.run(argv, capture_output=True, text=True, env=self._env(site), cwd=self._cwd(step, site),
                             timeout=900)
        return Ran(step, where, command, shlex.join(argv), res.returncode, res.stdout + res.stderr)

    def output(self, step_id: str) -> str:
        return "\n".join(r.output for r in self.ran if r.step == step_id)
