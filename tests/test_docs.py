"""The README and docs/ checked like code: docs that drift from the code fail here.

For every Markdown file (README.md, CHANGELOG.md, docs/*.md, benchmarks/stand_ins/README.md):

* every command line in a fenced ``bash``/``sh``/``shell``/``console`` block (and every inline code
  span that starts with one of the commands below) names things that exist:

  - ``make X``: a target of the Makefile;
  - ``python path/to/script.py --flag``: the script exists, and its flags are ones its argparse
    parser defines (read from the script's source); ``python -m module``: the module is importable;
  - ``bash path/to/script.sh``: the script exists;
  - ``fairchem-eqv2 SUB --flag``: the subcommand and its flags exist in
    :func:`fairchem_equiformerv2.tools.cli.build_parser`;
  - ``fairchem --mode M --flag``: the mode and flags exist in fairchem's own parser
    (``--key=value`` config overrides are fairchem's and let through);
  - ``--config-yml FILE`` and any argument under configs/, scripts/, benchmarks/, tests/, docs/ or
    src/: the file exists (or is written earlier in the same block, e.g. ``cat > relax.yml``);

* every relative link and image resolves to a file or folder, and a ``#anchor`` to a heading of the
  target (GitHub's slugs);
* every ``fairchem_equiformerv2.<name>`` resolves, every ``EQUIFORMERV2_*`` variable is read
  somewhere in src/, every path-like inline code span (``nn/ops/dense.py``, ``configs/demo/s2ef.yml``)
  names a file of the repository.

Heredoc bodies, placeholders (``<id>``, ``...``, ``ID.npz``) and other programs (``cat``, ``pip``) are
not checked. The CLI's own help is checked too: ``--help`` of every subcommand runs and explains
every flag, its examples pass the same command check, and ``fairchem-eqv2 --version`` prints the
package's version.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fairchem_equiformerv2"
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/stand_ins/README.md"]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
REPO_FOLDERS = ("configs/", "scripts/", "benchmarks/", "tests/", "docs/", "src/")
INLINE_PROGRAMS = ("make ", "fairchem ", "fairchem-eqv2 ", "python ", "bash ", ".venv/bin/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>"}

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
PACKAGE_NAME = re.compile(r"\bfairchem_equiformerv2(?:\.[A-Za-z_]\w*)+")
ENV_VARIABLE = re.compile(r"\bEQUIFORMERV2_[A-Z0-9_]+")
PATH_LIKE = re.compile(r"^[\w.-]+(?:/[\w.-]+)+\.(?:py|yml|yaml|sh|png|md|toml)$")
MODULE_FILE = re.compile(r"^[a-z_][a-z0-9_]*\.py$")
MODULE_ATTRIBUTE = re.compile(r"^([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)$")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


# ---------------------------------------------------------------------------------------------
# What the code defines


@cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(m.group(1) for m in re.finditer(r"^([A-Za-z0-9_-]+)\s*:(?!=)", text, re.MULTILINE))


@cache
def cli_parser() -> argparse.ArgumentParser:
    from fairchem_equiformerv2.tools.cli import build_parser

    return build_parser()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@cache
def fairchem_parser() -> argparse.ArgumentParser:
    from fairchem.core.common.flags import flags

    return flags.get_parser()


@cache
def script_flags(path: Path) -> frozenset[str] | None:
    """The option strings a Python script's argparse parser defines (None: the script has no parser)."""
    tree = ast.parse(path.read_text())
    flags = set()
    found = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            found = True
            flags.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-"))
    return frozenset(flags | {"-h", "--help"}) if found else None


@cache
def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


@cache
def package_modules() -> dict[str, list[Path]]:
    """``{"scatter": [.../nn/scatter.py], ...}``: the package's modules by file stem."""
    modules: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        modules.setdefault(path.stem, []).append(path)
    return modules


@cache
def defined_names(path: Path) -> frozenset[str]:
    """Functions, classes (and their methods) and assigned names defined anywhere in a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names)


def tracked_modules() -> list[Path]:
    """The package's modules in git (all of them without git): what architecture.md must describe."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "src/fairchem_equiformerv2"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return sorted(PACKAGE.rglob("*.py"))
    return sorted(ROOT / p for p in listed if p.endswith(".py") and (ROOT / p).exists()) or sorted(PACKAGE.rglob("*.py"))


@cache
def source_text() -> str:
    return "\n".join(p.read_text() for p in sorted(PACKAGE.rglob("*.py")))


# ---------------------------------------------------------------------------------------------
# Reading Markdown


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(language, line number of the first line, lines)`` of each fenced code block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = len(match.group(1)), match.group(2), match.group(3).lower()
        body, start = [], i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        blocks.append((language, start, body))
        i += 1
    return blocks


def without_code_blocks(text: str) -> list[str]:
    """The lines of ``text``, those of fenced blocks (fences included) blanked."""
    lines = text.splitlines()
    for _, start, body in fenced_blocks(text):
        for j in range(start - 2, start + len(body)):  # the opening fence to the closing one
            if 0 <= j < len(lines):
                lines[j] = ""
    return lines


def without_code(text: str) -> str:
    """``text`` with fenced blocks blanked and inline code spans replaced by a placeholder."""
    return INLINE_CODE.sub("code", "\n".join(without_code_blocks(text)))


def inline_code(text: str) -> list[str]:
    """The inline code spans of ``text`` outside fenced blocks."""
    return [m.group(2).strip() for m in INLINE_CODE.finditer("\n".join(without_code_blocks(text)))]


def shell_lines(language: str, body: list[str]) -> list[tuple[int, str]]:
    """``(offset in the block, command line)``: continuation lines joined, heredoc bodies and console
    output left out."""
    out, i = [], 0
    while i < len(body):
        line, offset = body[i], i
        if language == "console":
            if not line.lstrip().startswith("$ "):
                i += 1
                continue
            line = line.lstrip()[2:]
        while line.rstrip().endswith("\\") and i + 1 < len(body):
            i += 1
            line = line.rstrip()[:-1] + " " + body[i].strip()
        heredoc = HEREDOC.search(line)
        i += 1
        if heredoc:
            while i < len(body) and body[i].strip() != heredoc.group(2):
                i += 1
            i += 1
        out.append((offset, line))
    return out


def split_commands(line: str) -> tuple[list[list[str]], set[str]]:
    """The simple commands of a shell line (tokens, redirections removed) and the files it writes."""
    tokens = shlex.split(HEREDOC.sub(" ", line), comments=True)
    commands, current, written = [], [], set()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in SEPARATORS or token.endswith(";"):
            if token.endswith(";") and token != ";":
                current.append(token[:-1])
            commands.append(current)
            current = []
        elif token in REDIRECTS:
            if token.startswith(">") and i + 1 < len(tokens):
                written.add(tokens[i + 1])
            i += 1
        elif re.fullmatch(r"\d?>&\d", token):
            pass
        else:
            current.append(token)
        i += 1
    commands.append(current)
    return [c for c in commands if c], written


# ---------------------------------------------------------------------------------------------
# Checking one command


def is_placeholder(token: str) -> bool:
    return "<" in token or "..." in token or "*" in token or "$" in token


def check_path(token: str, written: set[str], what: str) -> list[str]:
    if is_placeholder(token) or token in written or (ROOT / token).exists():
        return []
    return [f"{what} {token!r} does not exist"]


def flag_names(tokens: list[str]) -> list[str]:
    """``--flag`` / ``-f`` tokens (brackets of optional ``[--flag X]`` stripped, ``=value`` cut off)."""
    out = []
    for token in tokens:
        token = token.strip("[]")
        if token.startswith("-") and token not in ("-", "--") and not re.fullmatch(r"-\d.*", token):
            out.append(token.split("=", 1)[0])
    return out


def check_command(tokens: list[str], written: set[str]) -> list[str]:
    """Problems with one simple command (empty if it names only things that exist)."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if not tokens:
        return []
    program, args = os.path.basename(tokens[0]), tokens[1:]
    problems = []

    for i, token in enumerate(args):  # config files and repository paths, whatever the program
        if token == "--config-yml" and i + 1 < len(args):
            problems += check_path(args[i + 1], written, "config file")
        elif token.startswith("--config-yml="):
            problems += check_path(token.split("=", 1)[1], written, "config file")
        elif not token.startswith("-") and token.startswith(REPO_FOLDERS):
            problems += check_path(token, written, "path")

    if program == "make":
        for target in (a for a in args if not a.startswith("-") and "=" not in a):
            if target not in make_targets():
                problems.append(f"make target {target!r} is not in the Makefile")
    elif program in ("python", "python3"):
        if not args or args[0] in ("-c", "-"):
            return problems
        if args[0] == "-m":
            if len(args) < 2 or not module_exists(args[1]):
                problems.append(f"python -m {args[1] if len(args) > 1 else ''}: no such module")
            return problems
        script = args[0]
        if is_placeholder(script):
            return problems
        if not (ROOT / script).is_file():
            return problems + [f"script {script!r} does not exist"]
        known = script_flags(ROOT / script)
        if known is not None:
            problems += [f"{script}: no flag {flag}" for flag in flag_names(args[1:]) if flag not in known]
    elif program in ("bash", "sh"):
        if args and not args[0].startswith("-"):
            problems += check_path(args[0], written, "script")
    elif program == "fairchem-eqv2":
        problems += check_cli(args)
    elif program == "fairchem":
        problems += check_fairchem(args)
    return problems


def check_cli(args: list[str]) -> list[str]:
    parser = cli_parser()
    positional = [a for a in args if not a.startswith("-")]
    if not positional:
        return [f"fairchem-eqv2: no flag {f}" for f in flag_names(args) if f not in parser._option_string_actions]
    sub = positional[0]
    if sub.isupper() or is_placeholder(sub):
        return []  # fairchem-eqv2 COMMAND --help
    commands = subparsers(parser)
    if sub not in commands:
        return [f"fairchem-eqv2: no subcommand {sub!r} (has {sorted(commands)})"]
    known = commands[sub]._option_string_actions
    after = args[args.index(sub) + 1:]
    return [f"fairchem-eqv2 {sub}: no flag {flag}" for flag in flag_names(after) if flag not in known]


def check_fairchem(args: list[str]) -> list[str]:
    parser = fairchem_parser()
    known = parser._option_string_actions
    problems = []
    for i, token in enumerate(args):
        raw = token.strip("[]")
        if not raw.startswith("--"):
            continue
        name = raw.split("=", 1)[0]
        if name in known:
            choices = known[name].choices
            value = raw.split("=", 1)[1] if "=" in raw else (args[i + 1] if i + 1 < len(args) else None)
            if choices and value is not None and not is_placeholder(value) and value not in choices:
                problems.append(f"fairchem {name}: {value!r} is not one of {list(choices)}")
        elif "=" not in raw:  # --key=value is a config override; a bare unknown flag is not
            problems.append(f"fairchem: no flag {name}")
    return problems


# ---------------------------------------------------------------------------------------------
# Checking one Markdown file


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of ``text``."""
    anchors, seen = set(), {}
    lines = without_code_blocks(text)
    for line in lines:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def check_links(text: str, path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(without_code(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:  # an anchor in this file
            if anchor not in heading_anchors(text):
                problems.append(f"link {target!r}: no heading #{anchor} in this file")
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            problems.append(f"link {target!r}: {file_part} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            problems.append(f"link {target!r}: no heading #{anchor} in {resolved.name}")
    return problems


def check_names(text: str, path: Path) -> list[str]:
    """``fairchem_equiformerv2.*`` names, ``EQUIFORMERV2_*`` variables and inline file paths."""
    problems = []
    for name in sorted(set(PACKAGE_NAME.findall(text))):
        if not resolves(name):
            problems.append(f"{name} does not exist")
    for variable in sorted(set(ENV_VARIABLE.findall(text))):
        if variable not in source_text():
            problems.append(f"environment variable {variable} is read nowhere in src/")
    for span in inline_code(text):
        if PATH_LIKE.match(span) and not any(
            (base / span).exists() for base in (ROOT, PACKAGE, path.parent)
        ):
            problems.append(f"file {span!r} does not exist")
        match = MODULE_ATTRIBUTE.match(span)
        if match and match.group(1) in package_modules() and not span.endswith(".py"):
            module, name = match.groups()
            if not any(name in defined_names(f) for f in package_modules()[module]):
                problems.append(f"{span}: {module}.py defines no {name}")
        if path == ARCHITECTURE and MODULE_FILE.match(span) and span[:-3] not in package_modules():
            problems.append(f"module {span} is not in the package")
    return problems


@cache
def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ImportError:
        return False
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return _defined_in_source(parts[: i + 1], parts[i + 1:])
    return True


def _defined_in_source(module: list[str], names: list[str]) -> bool:
    """For a module that exists but imports only with the other fairchem (``fairchem2`` here, whose
    fairchem is not in this environment): its file defines the first of ``names`` (if any)."""
    try:
        spec = importlib.util.find_spec(".".join(module))
    except ImportError:
        return False
    if spec is None or spec.origin is None:
        return False
    if not names:
        return True
    source = Path(spec.origin).read_text()
    return re.search(rf"^(class|def) {re.escape(names[0])}\b|^{re.escape(names[0])}\s*[:=]", source, re.M) is not None


def check_markdown(text: str, path: Path) -> list[str]:
    """Every problem of one Markdown file, each as ``"<file>:<line>: <problem>"``."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    problems = []
    for language, start, body in fenced_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        written: set[str] = set()
        for offset, line in shell_lines(language, body):
            try:
                commands, files = split_commands(line)
            except ValueError as error:  # unbalanced quotes
                problems.append(f"{name}:{start + offset}: cannot parse {line!r}: {error}")
                continue
            written |= files
            for tokens in commands:
                problems += [f"{name}:{start + offset}: {p}" for p in check_command(tokens, written)]
    for span in inline_code(text):
        if span.startswith(INLINE_PROGRAMS):
            try:
                commands, files = split_commands(span)
            except ValueError:
                continue
            for tokens in commands:
                problems += [f"{name}: `{span}`: {p}" for p in check_command(tokens, files)]
    problems += [f"{name}: {p}" for p in check_links(text, path) + check_names(text, path)]
    return problems


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_names_only_what_exists(path):
    assert check_markdown(path.read_text(), path) == []


def test_architecture_describes_every_module():
    """A module added to (and committed in) the package gets its line in docs/architecture.md."""
    spans = set(inline_code(ARCHITECTURE.read_text()))
    missing = [
        str(p.relative_to(PACKAGE)) for p in tracked_modules()
        if p.name != "__init__.py" and p.name not in spans and str(p.relative_to(PACKAGE)) not in spans
    ]
    assert missing == [], f"docs/architecture.md does not mention {missing}"


def test_architecture_checks_catch(monkeypatch):
    assert any("no_such_module.py is not in the package" in p for p in check_names("`no_such_module.py`", ARCHITECTURE))
    monkeypatch.setattr(sys.modules[__name__], "tracked_modules", lambda: [PACKAGE / "nn" / "undocumented.py"])
    with pytest.raises(AssertionError, match="undocumented.py"):
        test_architecture_describes_every_module()


def test_docs_are_found():
    names = {p.name for p in DOCS}
    assert {"README.md", "architecture.md", "performance.md", "inputs.md"} <= names


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 320


SYNTHETIC = ROOT / "docs" / "synthetic.md"


@pytest.mark.parametrize(
    "markdown, expected",
    [
        ("```bash\nfairchem-eqv2 make-submission --no-such-flag x\n```", "no flag --no-such-flag"),
        ("```bash\nfairchem-eqv2 convert-checkpoints a b\n```", "no subcommand 'convert-checkpoints'"),
        ("```bash\nmake tests\n```", "make target 'tests'"),
        ("```bash\npython benchmarks/no_such_bench.py\n```", "script 'benchmarks/no_such_bench.py'"),
        ("```bash\npython benchmarks/compare_fairchem.py --shapes 31M\n```", "no flag --shapes"),
        ("```sh\nbash scripts/nope.sh\n```", "script 'scripts/nope.sh'"),
        ("```bash\nfairchem --mode train --config-yml configs/s2ef/nope.yml\n```", "config file"),
        ("```bash\nfairchem --mode trian --config-yml configs/demo/s2ef.yml\n```", "'trian' is not one of"),
        ("```bash\nfairchem --mode train --no-such-fairchem-flag\n```", "no flag --no-such-fairchem-flag"),
        ("```console\n$ fairchem-eqv2 demo-data out --num-s2ef-trian 5\n```", "no flag --num-s2ef-trian"),
        ("```bash\nfairchem-eqv2 demo-data out \\\n    --sed 1\n```", "no flag --sed"),
        ("Run `fairchem-eqv2 fix-checkpoint a b --trusted`.", "no flag --trusted"),
        ("See [the docs](no_such_page.md).", "no_such_page.md does not exist"),
        ("![plot](../benchmarks/no_such_plot.png)", "no_such_plot.png does not exist"),
        ("See [configs](configs.md#no-such-heading).", "no heading #no-such-heading"),
        ("Use `fairchem_equiformerv2.NoSuchHead`.", "fairchem_equiformerv2.NoSuchHead does not exist"),
        ("Set `EQUIFORMERV2_NO_SUCH_SETTING=1`.", "EQUIFORMERV2_NO_SUCH_SETTING"),
        ("Open `nn/no_such_module.py`.", "'nn/no_such_module.py' does not exist"),
        ("Call `scatter.no_such_function`.", "scatter.py defines no no_such_function"),
    ],
)
def test_checker_catches(markdown, expected):
    problems = check_markdown(markdown, SYNTHETIC)
    assert any(expected in p for p in problems), problems


def test_checker_passes_what_exists():
    markdown = "\n".join([
        "## A heading, with `code`",
        "```bash",
        "make setup   # a comment --no-such-flag",
        "PIP_FIND_LINKS=/wheels make test",
        "fairchem-eqv2 make-submission --dataset OC22 --id ID.npz --ood OOD.npz --out-path s.npz",
        "fairchem --mode train --config-yml configs/demo/s2ef.yml --cpu --optim.batch_size=8 --logger=wandb \\",
        "    [--slurm-account A] --checkpoint runs/checkpoints/<id>/checkpoint.pt",
        "python benchmarks/compare_fairchem.py --shape 31M --sweep 20,50 --plot benchmarks/scaling.png",
        "python -m pytest -q tests/test_docs.py",
        "python - <<'PY'",
        "print('--not-a-flag')",
        "PY",
        "cat > my.yml <<'YML'",
        "fairchem-eqv2 nothing-checked-here --bogus",
        "YML",
        "fairchem --mode validate --config-yml my.yml",
        "```",
        "See [configs](configs.md#the-bundled-configs-the-papers-recipes), [here](#a-heading-with-code),",
        "![plot](../benchmarks/scaling.png), `nn/ops/dense.py`, `fairchem_equiformerv2.tools.checkpoints.convert_checkpoint`,",
        "`EQUIFORMERV2_CPU_MATMUL`, `scatter.gather_pairs`, `backbone.EquiformerV2Backbone`, `torch.compile`.",
    ])
    assert check_markdown(markdown, SYNTHETIC) == []


@pytest.mark.parametrize("command", [None, *sorted(subparsers(cli_parser()))])
def test_cli_help_explains_every_flag(command, capsys):
    parser = cli_parser() if command is None else subparsers(cli_parser())[command]
    assert parser.description, f"{parser.prog}: no description"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(choice.help for choice in action._choices_actions), f"{parser.prog}: a command without help"
        elif not isinstance(action, argparse._HelpAction):
            assert action.help and action.help != argparse.SUPPRESS, f"{parser.prog} {action.dest}: no help"
    with pytest.raises(SystemExit) as exit_info:
        cli_parser().parse_args(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text, f"{parser.prog}: no examples"
    examples = [line for _, line in shell_lines("bash", text.split("examples:", 1)[1].splitlines())]
    assert any(line.strip().startswith(parser.prog) for line in examples), f"{parser.prog}: no example of itself"
    problems = []
    for line in examples:
        commands, written = split_commands(line)
        for tokens in commands:
            problems += check_command(tokens, written)
    assert problems == []


def test_cli_version():
    from fairchem_equiformerv2 import __version__

    script = Path(sys.executable).with_name("fairchem-eqv2")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "fairchem_equiformerv2.tools.cli"]
    result = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fairchem-eqv2 {__version__}"


# ---------------------------------------------------------------------------------------------
# Train commands that are safe to run twice

TRAIN_COMMAND = re.compile(r"\bfairchem\s+--mode\s+train\b")
NAMED_RUN = re.compile(r"--timestamp-id[ =]\S*\$\(date\b")


def documented_train_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every ``fairchem --mode train`` command in the docs' shell blocks and
    in the configs' comments (continuation lines joined)."""
    found = []
    for path in DOCS:
        for language, start, body in fenced_blocks(path.read_text()):
            if language in SHELL_LANGUAGES | {""}:
                found += [(f"{path.relative_to(ROOT)}:{start + offset}", line)
                          for offset, line in shell_lines(language or "bash", body) if TRAIN_COMMAND.search(line)]
    for path in sorted((ROOT / "configs").rglob("*.yml")):
        comments = [line.lstrip()[1:] for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
        found += [(f"{path.relative_to(ROOT)}", line)
                  for _, line in shell_lines("bash", comments) if TRAIN_COMMAND.search(line)]
    return found


def test_documented_train_commands_name_their_run():
    """Each documented train command names its run with the date (fairchem's own name collides, see
    below), or resumes one on purpose with ``--checkpoint``."""
    commands = documented_train_commands()
    assert len(commands) >= 20
    unnamed = [where for where, line in commands if not NAMED_RUN.search(line) and "--checkpoint" not in line]
    assert unnamed == [], f"train commands without --timestamp-id NAME-$(date ...): {unnamed}"


def test_fairchem_unnamed_runs_collide(monkeypatch):
    """Why the docs name every run: fairchem 1.10 broadcasts the start time as a float32 tensor, which
    rounds the seconds since 1970 to the nearest multiple of 128, so runs started a minute apart share an id (and a
    checkpoint folder, which the second run resumes from). If this fails, fairchem fixed it: the
    paragraph in docs/workflow.md#train can go."""
    import datetime
    import types

    import torch
    from fairchem.core.trainers import base_trainer

    def started_at(seconds: float) -> str:
        clock = type("Clock", (datetime.datetime,), {"now": classmethod(lambda cls, tz=None: cls.fromtimestamp(seconds))})
        monkeypatch.setattr(base_trainer, "datetime", types.SimpleNamespace(datetime=clock))
        return base_trainer.BaseTrainer._get_timestamp(torch.device("cpu"), None)

    start = 128 * 14_000_000 - 63.0  # in 2026; float32 rounds it and the next 127 s to 128 * 14e6
    assert started_at(start) == started_at(start + 60) == started_at(start + 120)
    assert started_at(start) != started_at(start + 130)
