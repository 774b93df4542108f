"""Every command the READMEs and the generated deployment files tell someone to run parses.

README.md and deploy/README.md are what partner hospitals, researchers and privacy officers act on;
the systemd units, compose files and scripts of `slmfed deploy init` are what actually runs. This
test extracts every shell command from them and, without running anything:
- `slmfed ...`: parses it with the real `slmfed` argparse parser (common.cli.build_parser);
- `flwr ...`: resolves the subcommand in the installed Flower CLI (the click object behind
  `flwr --help`) and parses the arguments with it, so an unknown subcommand or flag fails;
- `flower-superlink` / `flower-supernode ...`: parses with the argparse parser behind their `--help`.
A failure names the file, the line and the command. Placeholders (`/data/...`, `<site>`, `DIR`,
`NODE_ID`) are accepted where a value is expected.

Commands are taken from fenced blocks tagged bash/sh/shell/console and from 4-space indented code
blocks; `&&`, `||`, `;`, `|`, `\\` continuations, comments, redirections, `sudo`, `VAR=value`
prefixes and paths such as `.venv/bin/slmfed` are handled.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "deploy/README.md"]
SHELL_FENCES = {"bash", "sh", "shell", "console", "shell-session"}
FLOWER_ARGPARSE = {  # program -> (module, function returning its argparse parser)
    "flower-superlink": ("flwr.superlink.cli.flower_superlink", "_parse_args_run_superlink"),
    "flower-supernode": ("flwr.supernode.cli.flower_supernode", "_parse_args_run_supernode"),
}
PREFIXES = {"sudo", "env", "exec", "time", "nohup", "command"}
SUDO_VALUE_FLAGS = {"-u", "-g", "-C", "-D", "-h", "-p", "-R", "-T", "-U"}
PLACEHOLDER = re.compile(r"^(<[^<>]+>|[A-Z][A-Z0-9_]*|.*\.\.\..*)$")


@dataclass
class Command:
    where: str  # "README.md:138"
    argv: list[str]

    @property
    def program(self) -> str:
        return self.argv[0].rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return " ".join(self.argv)


# ---- shell extraction -------------------------------------------------------------------------

OPERATORS = ("&&", "||", ";;", "|&", ";", "|", "&")


def tokenize(line: str) -> list[tuple[str, bool]]:
    """Shell words of one logical line as (word, is_operator); quotes and escapes resolved,
    `#` at the start of a word begins a comment (as in bash)."""
    out: list[tuple[str, bool]] = []
    word: list[str] = []
    in_word = False
    i, n = 0, len(line)

    def end_word():
        nonlocal word, in_word
        if in_word:
            out.append(("".join(word), False))
        word, in_word = [], False

    while i < n:
        c = line[i]
        if c in " \t\n":
            end_word()
            i += 1
        elif c == "#" and not in_word:
            break
        elif c == "\\":
            word.append(line[i + 1] if i + 1 < n else "")
            in_word = True
            i += 2
        elif c == "'":
            j = line.index("'", i + 1)  # ValueError: unterminated quote, a broken doc line
            word.append(line[i + 1 : j])
            in_word = True
            i = j + 1
        elif c == '"':
            i += 1
            while line[i] != '"':  # IndexError: unterminated quote
                if line[i] == "\\" and line[i + 1] in '"\\$`':
                    i += 1
                word.append(line[i])
                i += 1
            in_word = True
            i += 1
        elif c in ";|&" and not (c == "&" and word and word[-1] in "<>"):  # `2>&1` is a redirection
            if c == "&" and line[i + 1 : i + 2] == ">":  # `&>file`
                end_word()
                word, in_word = ["&"], True
                i += 1
                continue
            end_word()
            op = next(o for o in OPERATORS if line.startswith(o, i))
            out.append((op, True))
            i += len(op)
        else:
            word.append(c)
            in_word = True
            i += 1
    end_word()
    return out


REDIRECT_ALONE = re.compile(r"^(\d*|&)(>>?|<|<<<?)$")  # target is the next word
REDIRECT_ATTACHED = re.compile(r"^(\d*|&)>>?(&\d+|\S+)$")  # `2>&1`, `>out.log` (not `<site>`)


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands (argv) of one logical shell line, prefixes and redirections removed."""
    cmds, cur = [], []
    for word, is_op in tokenize(line) + [("", True)]:
        if not is_op:
            cur.append(word)
            continue
        argv, skip = [], False
        for w in cur:
            if skip:
                skip = False
            elif REDIRECT_ALONE.match(w):
                skip = True
            elif not REDIRECT_ATTACHED.match(w):
                argv.append(w)
        while argv and (re.match(r"^[A-Za-z_]\w*=", argv[0]) or argv[0] in PREFIXES):
            prefix = argv.pop(0)
            while prefix == "sudo" and argv and argv[0].startswith("-"):
                if argv.pop(0) in SUDO_VALUE_FLAGS and argv:
                    argv.pop(0)
        if argv:
            cmds.append(argv)
        cur = []
    return cmds


def logical_lines(lines: list[tuple[int, str]], prompt: bool = False) -> list[tuple[int, str]]:
    """Join `\\`-continued lines; each logical line keeps the number of its first line."""
    out: list[tuple[int, str]] = []
    start, buf = None, []
    for no, text in lines:
        if prompt and start is None:
            if not text.lstrip().startswith("$ "):
                continue  # console output, not a command
            text = text.lstrip()[2:]
        if start is None:
            start = no
        if text.rstrip().endswith("\\") and not _is_comment(text):
            buf.append(text.rstrip()[:-1])
            continue
        buf.append(text)
        out.append((start, " ".join(buf)))
        start, buf = None, []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def _is_comment(text: str) -> bool:
    return text.lstrip().startswith("#")


def shell_commands(lines: list[tuple[int, str]], source: str, prompt: bool = False) -> list[Command]:
    return [
        Command(f"{source}:{no}", argv)
        for no, line in logical_lines(lines, prompt)
        for argv in simple_commands(line)
    ]


def markdown_blocks(text: str) -> list[tuple[str | None, list[tuple[int, str]]]]:
    """(fence info or None for an indented block, [(line number, text)]) for every code block."""
    blocks: list[tuple[str | None, list[tuple[int, str]]]] = []
    fence, info, body = None, None, []
    indented: list[tuple[int, str]] = []
    prev_blank = True
    for no, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if line.strip().startswith(fence):
                blocks.append((info, body))
                fence, body = None, []
            else:
                body.append((no, line))
            continue
        m = re.match(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)", line)
        if m:
            if indented:
                blocks.append((None, indented))
                indented = []
            fence, info = m.group(1), m.group(2).lower()
            continue
        if line.startswith(("    ", "\t")) and (indented or prev_blank) and line.strip():
            indented.append((no, line.strip()))
        elif line.strip() or not indented:
            if indented:
                blocks.append((None, indented))
                indented = []
        prev_blank = not line.strip()
    if indented:
        blocks.append((None, indented))
    return blocks


CHECKED = re.compile(r"^(slmfed|flwr|flower-[\w-]+)$")


def doc_commands(name: str) -> list[Command]:
    """Every command in the shell-tagged fenced blocks and indented blocks of one Markdown file."""
    cmds = []
    for info, body in markdown_blocks((ROOT / name).read_text(encoding="utf-8")):
        if info is None or info in SHELL_FENCES:
            cmds += shell_commands(body, name, prompt=info == "console")
    return cmds


# ---- checking one command with the real parsers -------------------------------------------------

@lru_cache(maxsize=None)
def slmfed_parser():
    from common.cli import build_parser

    return build_parser()


@lru_cache(maxsize=None)
def bench_parser(name: str):
    """`slmfed bench NAME`'s own flags: the benchmark module's `configure` (simulation/bench.py)."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog=f"slmfed bench {name}")
    importlib.import_module(f"simulation.bench_{name}").configure(parser)
    return parser


@lru_cache(maxsize=None)
def flower_argparse(program: str):
    import importlib

    module, func = FLOWER_ARGPARSE[program]
    return getattr(importlib.import_module(module), func)()


def _placeholder_value_error(message: str) -> bool:
    """argparse / click rejecting a placeholder (`N`, `NODE_ID`, `<site>`) only for its type."""
    m = re.search(r"invalid (?:choice|[\w ]+ value): '([^']*)'", message) or re.search(
        r"'([^']*)' is not a valid", message)
    return bool(m and PLACEHOLDER.match(m.group(1)))


def _argparse_problem(parser, args: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help / --version
            return None
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
        return None if _placeholder_value_error(message) else message
    return None


def _flwr_problem(args: list[str]) -> str | None:
    import click
    from flwr.cli.app import typer_click_object as cmd

    path = ["flwr"]
    rest = list(args)
    while isinstance(cmd, click.Group):
        if rest and rest[0].startswith("-"):  # group options (`-V`, `--help`) end the command
            opt = rest[0]
            if not any(opt in p.opts for p in cmd.params) and opt not in ("-h", "--help"):
                return f"{' '.join(path)}: no such option {opt!r}"
            return None
        if not rest:
            return None
        ctx = click.Context(cmd, info_name=path[-1])
        name = rest.pop(0)
        sub = cmd.get_command(ctx, name)
        if sub is None:
            return (f"{' '.join(path)}: no such command {name!r} "
                    f"(has: {', '.join(cmd.list_commands(ctx))})")
        cmd = sub
        path.append(name)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cmd.make_context(" ".join(path), rest)
    except click.exceptions.Exit:  # --help
        return None
    except click.ClickException as exc:
        message = f"{' '.join(path)}: {exc.format_message()}"
        return None if _placeholder_value_error(message) else message
    return None


def problem(cmd: Command) -> str | None:
    """Why this command would not parse, or None (also None for commands we do not check)."""
    prog, args = cmd.program, cmd.argv[1:]
    if prog == "slmfed":
        if len(args) > 1 and args[0] == "bench" and not args[1].startswith("-"):  # the benchmark's own flags
            return _argparse_problem(slmfed_parser(), args[:2]) or _argparse_problem(bench_parser(args[1]), args[2:])
        return _argparse_problem(slmfed_parser(), args)
    if prog == "flwr":
        return _flwr_problem(args)
    if prog.startswith("flower-"):
        if prog not in FLOWER_ARGPARSE:
            return f"{prog}: no parser known for this Flower command (add it to FLOWER_ARGPARSE)"
        return _argparse_problem(flower_argparse(prog), args)
    return None


def failures(cmds: list[Command]) -> list[str]:
    out = []
    for c in cmds:
        why = problem(c)
        if why:
            out.append(f"{c.where}: `{c}`\n    -> {why}")
    return out


def checked(cmds: list[Command]) -> list[Command]:
    return [c for c in cmds if CHECKED.match(c.program)]


# ---- the READMEs -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DOCS)
def test_every_readme_command_parses(name):
    cmds = checked(doc_commands(name))
    assert cmds, f"{name}: no slmfed / flwr / flower-* command found (is the extraction broken?)"
    bad = failures(cmds)
    assert not bad, f"{name}: {len(bad)} command(s) the CLI would reject:\n" + "\n".join(bad)


def test_readme_commands_cover_each_step():
    """The extraction sees the commands a hospital and a researcher run (not a vacuous pass)."""
    progs = {" ".join([c.program, *c.argv[1:3]]) for c in checked(doc_commands("README.md"))}
    for expected in ("slmfed simulate", "slmfed deploy init", "slmfed deploy check",
                     "slmfed site join", "slmfed deploy run", "slmfed fetch"):
        assert any(p.startswith(expected) for p in progs), (expected, sorted(progs))
    assert any(c.argv[:2] == ["slmfed", "prepare"] for c in checked(doc_commands("README.md")))
    assert any(c.argv[:3] == ["slmfed", "deploy", "check"] for c in checked(doc_commands("deploy/README.md")))


def test_untagged_fences_hold_no_commands():
    """A fenced block without a shell tag is not checked, so it must not hold a command line."""
    for name in DOCS:
        for info, body in markdown_blocks((ROOT / name).read_text(encoding="utf-8")):
            if info is None or info in SHELL_FENCES:
                continue
            for no, line in body:
                first = line.split()[0] if line.split() else ""
                assert not CHECKED.match(first.rsplit("/", 1)[-1]), (
                    f"{name}:{no}: command in a ```{info} block; tag the block ```bash so it is checked")


# ---- inline `slmfed ...` spans in the prose (usage table, revoke steps) -------------------------

def inline_spans(name: str) -> list[tuple[int, str]]:
    """(line, text) of each inline code span that starts with slmfed / flwr / flower-*, outside
    code blocks; a span wrapped over two lines counts from its first line."""
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    in_block = {no for _, body in markdown_blocks("\n".join(lines)) for no, _ in body}
    text = "\n".join("" if no in in_block or re.match(r"^\s*(```|~~~)", l) else l
                     for no, l in enumerate(lines, 1))
    spans = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        words = m.group(1).split()
        if words and CHECKED.match(words[0].rsplit("/", 1)[-1]):
            spans.append((text.count("\n", 0, m.start()) + 1, " ".join(words)))
    return spans


def _options_and_children(node):
    """(option strings -> choices or None, subcommand name -> node, positional choices) of one
    argparse parser or click command."""
    import argparse

    import click

    if isinstance(node, argparse.ArgumentParser):
        opts = {o: (a.choices if a.nargs != 0 else None) for o, a in node._option_string_actions.items()}
        children, pos_choices = {}, None
        for a in node._actions:
            if isinstance(a, argparse._SubParsersAction):
                children = dict(a.choices)
            elif not a.option_strings and a.choices and pos_choices is None:
                pos_choices = list(a.choices)
        return opts, children, pos_choices
    opts = {"-h": None, "--help": None}
    for prm in node.params:
        choices = getattr(prm.type, "choices", None) if isinstance(prm, click.Option) else None
        opts.update({o: choices for o in [*prm.opts, *prm.secondary_opts]} if isinstance(prm, click.Option) else {})
    children = {}
    if isinstance(node, click.Group):
        ctx = click.Context(node)
        children = {n: node.get_command(ctx, n) for n in node.list_commands(ctx)}
    return opts, children, None


def inline_problem(span: str) -> str | None:
    """Usage-style check of a prose span (`slmfed synth --out DIR [--preset paper|small|tiny]`):
    the subcommands exist, every flag exists for that subcommand, and listed choices are valid.
    Positional arguments and required flags are not checked (a span may show part of a command)."""
    words = re.sub(r"\s+/\s+", "|", span.replace("\\|", "|")).replace("[", " ").replace("]", " ").split()
    prog, words = words[0].rsplit("/", 1)[-1], words[1:]
    if prog == "slmfed":
        node = slmfed_parser()
    elif prog == "flwr":
        from flwr.cli.app import typer_click_object as node
    elif prog in FLOWER_ARGPARSE:
        node = flower_argparse(prog)
    else:
        return f"{prog}: no parser known for this Flower command (add it to FLOWER_ARGPARSE)"
    path, resolving, checked_positional = [prog], True, False
    for i, w in enumerate(words):
        opts, children, pos_choices = _options_and_children(node)
        flag = w.split("=", 1)[0]
        if w.startswith("-"):
            if flag not in opts:
                return f"{' '.join(path)}: no such option {flag!r}"
            choices = opts[flag]
            value = w.split("=", 1)[1] if "=" in w else (words[i + 1] if i + 1 < len(words) else "")
            if choices and value and not value.startswith("-") and not PLACEHOLDER.match(value):
                bad = [v for v in value.split("|") if v not in choices]
                if bad:
                    return f"{' '.join(path)} {flag}: invalid choice(s) {bad} (choose from {list(choices)})"
            continue
        if resolving and children and not PLACEHOLDER.match(w) and w not in ("...", "|"):
            alternatives = [a for a in w.split("|") if a]
            bad = [a for a in alternatives if a not in children]
            if bad:
                return f"{' '.join(path)}: no such command(s) {bad} (has: {', '.join(sorted(children))})"
            node = children[alternatives[0]]
            path.append(alternatives[0])
            continue
        resolving = False
        if pos_choices and not checked_positional and not PLACEHOLDER.match(w) and i > 0 \
                and not words[i - 1].startswith("-"):
            checked_positional = True
            bad = [a for a in w.split("|") if a and a not in pos_choices]
            if bad:
                return f"{' '.join(path)}: invalid choice(s) {bad} (choose from {pos_choices})"
            if path == ["slmfed", "bench"] and "|" not in w:  # one benchmark named: its own flags follow
                node = bench_parser(w)
                path.append(w)
    return None


@pytest.mark.parametrize("name", DOCS)
def test_every_inline_command_uses_real_subcommands_and_flags(name):
    spans = inline_spans(name)
    bad = [f"{name}:{no}: `{span}`\n    -> {why}" for no, span in spans if (why := inline_problem(span))]
    assert not bad, f"{name}: {len(bad)} inline command(s) naming what the CLI lacks:\n" + "\n".join(bad)


# ---- the generated deployment -------------------------------------------------------------------

def unit_commands(path: Path, source: str) -> list[Command]:
    """ExecStart= / ExecStartPre= / ... of a systemd unit (systemd splits them like a shell)."""
    lines = list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
    cmds = []
    for no, line in logical_lines(lines):
        m = re.match(r"^Exec\w*=[-@:+!]*(.*)$", line)
        if m:
            cmds += [Command(f"{source}:{no}", argv) for argv in simple_commands(m.group(1))]
    return cmds


def compose_commands(path: Path, source: str) -> list[Command]:
    import shlex

    import yaml

    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    cmds = []
    for name, svc in (yaml.safe_load(text).get("services") or {}).items():
        entry, command = svc.get("entrypoint"), svc.get("command")
        argv = []
        for part in (entry, command):
            argv += shlex.split(part) if isinstance(part, str) else [str(t) for t in part or []]
        if argv:
            no = next((i for i, l in enumerate(lines, 1) if l.strip().startswith(("command:", "entrypoint:"))), 0)
            cmds.append(Command(f"{source}:{no} (service {name})", argv))
    return cmds


def dockerfile_commands(path: Path, source: str) -> list[Command]:
    lines = list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
    return [Command(f"{source}:{no}", argv) for no, line in logical_lines(lines)
            if re.match(r"^(RUN|CMD|ENTRYPOINT)\s", line) and not line.split(None, 1)[1].startswith("[")
            for argv in simple_commands(line.split(None, 1)[1])]


# certificates, keys, secrets, TOML data, nginx configs (deploy check reads those): no command lines
INERT = re.compile(r"\.(crt|key|pub|toml|secret|conf)$")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from deploy.init import DeployPlan, init_deployment

    out = tmp_path_factory.mktemp("doc-commands") / "deployment"
    files = init_deployment(DeployPlan(out=out, superlink_hosts=["slm.coordinator.example.org"],
                                       sites=["center-primary", "center-external"]))
    return out, files


def deployment_commands(out: Path, files: list[Path]) -> list[Command]:
    cmds = []
    for path in files:
        source = str(path.relative_to(out))
        if path.suffix == ".service":
            cmds += unit_commands(path, source)
        elif path.suffix in (".yaml", ".yml"):
            cmds += compose_commands(path, source)
        elif path.suffix == ".sh":
            cmds += shell_commands(list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1)), source)
        elif path.name == "Dockerfile":
            cmds += dockerfile_commands(path, source)
        else:
            assert INERT.search(path.name), f"{source}: generated file of a kind this test does not read"
    return cmds


def test_every_generated_deployment_command_parses(deployment):
    out, files = deployment
    cmds = checked(deployment_commands(out, files))
    found = {(c.where.split(":")[0], c.program) for c in cmds}
    expected = {("coordinator/flower-superlink.service", "flower-superlink"),
                ("coordinator/compose.yaml", "flower-superlink"),
                ("coordinator/register-sites.sh", "slmfed")}
    for site in ("center-primary", "center-external"):
        expected |= {(f"sites/{site}/flower-supernode.service", "flower-supernode"),
                     (f"sites/{site}/compose.yaml", "flower-supernode"),
                     (f"sites/{site}/slmfed-launcher.service", "slmfed"),
                     (f"sites/{site}/compose.yaml", "slmfed")}
    assert expected <= found, f"commands not found in the generated files: {sorted(expected - found)}"
    bad = failures(cmds)
    assert not bad, f"{len(bad)} generated command(s) the CLI would reject:\n" + "\n".join(bad)


def test_register_commands_output_parses(deployment, capsys):
    """`slmfed deploy register-commands` prints `flwr supernode register ...` lines: they parse too."""
    from common.cli import main

    out, _ = deployment
    assert main(["deploy", "register-commands", str(out / "coordinator")]) == 0
    printed = capsys.readouterr().out.splitlines()
    cmds = shell_commands(list(enumerate(printed, 1)), "register-commands output")
    assert [c.argv[:3] for c in cmds] == [["flwr", "supernode", "register"]] * 2
    assert not failures(cmds), failures(cmds)


# ---- the checker itself ------------------------------------------------------------------------

def test_extraction_handles_shell_syntax():
    text = "\n".join([
        "# a comment line with slmfed simulate --bogus",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/slmfed simulate --quick",
        "slmfed deploy init --out d --superlink-host h.example.org \\",
        "    --sites a,b   # trailing comment",
        "sudo -u slmfed FLWR_HOME=/x slmfed site join --bundle /etc/slmfed --cache /srv/c 2>&1 | tee log; echo '#; not &&'",
        "cat a >> ~/.flwr/config.toml; flwr supernode list slmfed",
    ])
    cmds = shell_commands(list(enumerate(text.splitlines(), 1)), "t")
    assert [(c.where, c.argv) for c in cmds] == [
        ("t:2", ["python3", "-m", "venv", ".venv"]),
        ("t:2", [".venv/bin/pip", "install", "-e", ".[test]"]),
        ("t:2", [".venv/bin/slmfed", "simulate", "--quick"]),
        ("t:3", ["slmfed", "deploy", "init", "--out", "d", "--superlink-host", "h.example.org", "--sites", "a,b"]),
        ("t:5", ["slmfed", "site", "join", "--bundle", "/etc/slmfed", "--cache", "/srv/c"]),
        ("t:5", ["tee", "log"]),
        ("t:5", ["echo", "#; not &&"]),
        ("t:6", ["cat", "a"]),
        ("t:6", ["flwr", "supernode", "list", "slmfed"]),
    ]
    assert cmds[2].program == "slmfed"


def test_markdown_blocks_fenced_and_indented():
    md = "\n".join([
        "text", "", "    slmfed deploy check DIR      # a comment", "", "```bash", "slmfed simulate", "```",
        "```", " | slmfed prepare (diagram)", "```", "- item", "  continued",
    ])
    blocks = markdown_blocks(md)
    assert blocks == [(None, [(3, "slmfed deploy check DIR      # a comment")]),
                      ("bash", [(6, "slmfed simulate")]), ("", [(9, " | slmfed prepare (diagram)")])]


@pytest.mark.parametrize("line, fragment", [
    ("slmfed prepare /data/slm-site /srv/slmfed/cache", "--cache"),  # the README bug of issue 13
    ("slmfed simulate --no-such-flag", "--no-such-flag"),
    ("slmfed frobnicate", "invalid choice"),
    ("slmfed deploy check", "dir"),
    ("flwr supernode register k.pub slmfed --bogus", "--bogus"),
    ("flwr supernodes list", "supernodes"),
    ("flwr run . slmfed --run-config x --streams", "--streams"),
    ("flower-supernode --root-certificates ca.crt --no-such", "--no-such"),
    ("flower-superlink --ssl-certfile", "--ssl-certfile"),
    ("flower-superbogus --x", "no parser"),
    ("flwr --bogus", "--bogus"),
])
def test_checker_rejects_bad_commands(line, fragment):
    (cmd,) = shell_commands([(7, line)], "doc.md")
    why = problem(cmd)
    assert why and fragment in why, why


@pytest.mark.parametrize("span, fragment", [
    ("slmfed synth --out DIR [--preset paper\\|huge]", "huge"),
    ("slmfed simulate [--rounds N]", "--rounds"),
    ("slmfed deploy init / verify", "verify"),
    ("slmfed bench prepare\\|speed", "speed"),
    ("slmfed bench dp --parts auc", "--parts"),
    ("flwr supernode remove NODE_ID slmfed", "remove"),
    ("flower-supernode --trusted-entity", "--trusted-entity"),
])
def test_inline_check_rejects_bad_spans(span, fragment):
    why = inline_problem(span)
    assert why and fragment in why, why


def test_inline_spans_found_including_wrapped_ones():
    spans = [s for _, s in inline_spans("deploy/README.md")]
    assert any(s.startswith("slmfed deploy init --out NEW --superlink-host HOST") for s in spans), spans
    assert any(s.startswith("flwr supernode unregister") for s in spans), spans


@pytest.mark.parametrize("line", [
    "slmfed deploy check DEPLOYMENT_DIR",
    "slmfed prepare /data/<site> --cache /srv/slmfed/cache",
    "slmfed synth --out DIR --sites N",
    "flwr supernode unregister NODE_ID slmfed",
    "flwr run . slmfed --run-config 'scenario=\"paper\"' --stream",
    "flower-supernode --help",
])
def test_checker_accepts_placeholders(line):
    (cmd,) = shell_commands([(1, line)], "doc.md")
    assert problem(cmd) is None
