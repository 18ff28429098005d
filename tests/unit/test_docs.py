"""The documentation as a newcomer meets it: short README, links that lead somewhere, commands
and config snippets that work.

- README.md stays under 12,000 characters (the rest lives in docs/).
- Every relative link of README.md and docs/*.md points to an existing file, and an
  ``#anchor`` into a markdown file to one of its headings (GitHub's slugs).
- Every repository path quoted as inline code (``streams/…/x.py``) exists.
- Every command a reader would run from a ```sh / ```bash / ```console block names a real
  ``pingpost`` subcommand with options its argparse parser accepts (streams.tools.cli's
  ``build_parser``), and every ``make`` target is one of the Makefile's.
- Every ```yaml block parses, and a config snippet validates once merged onto
  config/demo.yaml (streams.settings.parse_settings).

Nothing here runs the demo or a command: the parser only parses.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import ConfigError, Settings, parse_settings
from streams.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md")])
DEMO_CONFIG = ROOT / "config" / "demo.yaml"

README_LIMIT = 12_000

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SHELL_LANGS = {"sh", "bash", "shell", "console"}
YAML_LANGS = {"yaml", "yml"}

# Config snippets that are deliberately not a valid configuration on their own. Key: (file
# name, first line of the block). None today: every snippet validates merged onto the demo.
PARTIAL_YAML: dict[tuple[str, str], str] = {}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- markdown parsing


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    def where(self) -> str:
        return f"{rel(self.path)}:{self.line} (```{self.lang})"


def split_markdown(path: Path) -> tuple[list[tuple[int, str]], list[Block]]:
    """The lines outside fenced code blocks (1-based numbers), and the fenced blocks."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence = m.group(2)
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{rel(path)}:{start + 1}: code block never closed"
        blocks.append(Block(path, start + 1, m.group(3).lower(), "\n".join(body)))
        i += 1
    return prose, blocks


INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, punctuation other than '-' and '_'
    dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path)
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> Iterator[tuple[int, str]]:
    prose, _ = split_markdown(path)
    for number, line in prose:
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, m.group(1)


# --------------------------------------------------------------------------- (a) README size


def test_readme_is_short() -> None:
    size = len(README.read_text())
    assert size < README_LIMIT, (
        f"README.md has {size:,} characters (limit {README_LIMIT:,}): move detail to docs/"
    )


def test_docs_pages_start_with_a_summary_and_the_readme_links_each() -> None:
    readme_links = {target.split("#")[0] for _, target in links(README)}
    for page in DOCS:
        if page == README:
            continue
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), f"{rel(page)}: no title on the first line"
        first = next((ln for ln in lines[1:] if ln.strip()), "")
        assert first and not first.startswith(("#", "```", "|", "-")), (
            f"{rel(page)}: the title is not followed by a summary paragraph"
        )
        assert f"docs/{page.name}" in readme_links, f"README.md does not link {rel(page)}"


# --------------------------------------------------------------------------- (b) links


def relative_links() -> list[tuple[Path, int, str]]:
    out = []
    for page in DOCS:
        for number, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            out.append((page, number, target))
    return out


def test_documents_have_relative_links() -> None:
    """The link checker sees links at all (a broken regex would pass every check below)."""
    assert len(relative_links()) >= 20


@pytest.mark.parametrize(
    ("page", "number", "target"),
    relative_links(),
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_relative_link_resolves(page: Path, number: int, target: str) -> None:
    where = f"{rel(page)}:{number}: link '{target}'"
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    assert dest.exists(), f"{where}: {path_part} does not exist"
    assert dest == ROOT or ROOT in dest.parents, f"{where}: points outside the repository"
    if anchor:
        assert dest.suffix == ".md", f"{where}: an anchor into a file that is not markdown"
        known = anchors(dest)
        assert anchor in known, (
            f"{where}: no heading '#{anchor}' in {rel(dest)}; its anchors: {sorted(known)}"
        )


REPO_PATH = re.compile(
    r"^(?:streams|connectors|tests|bench|schemas|deploy|config|docs)/"
    r"[\w./-]*\.[A-Za-z0-9]+$"
)


def quoted_repo_paths() -> list[tuple[Path, int, str]]:
    out = []
    for page in DOCS:
        prose, _ = split_markdown(page)
        for number, line in prose:
            for m in INLINE_CODE.finditer(line):
                code = m.group(2).strip()
                if REPO_PATH.match(code):
                    out.append((page, number, code))
    return out


@pytest.mark.parametrize(
    ("page", "number", "path"),
    quoted_repo_paths(),
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_quoted_repository_file_exists(page: Path, number: int, path: str) -> None:
    assert (ROOT / path).exists(), f"{rel(page)}:{number}: `{path}` does not exist"


# --------------------------------------------------------------------------- (c) commands


def blocks(langs: set[str]) -> list[Block]:
    return [b for page in DOCS for b in split_markdown(page)[1] if b.lang in langs]


def commands(block: Block) -> Iterator[str]:
    """The command lines of a shell block, continuation lines joined. In a ```console block
    only the lines after a `$ ` prompt are commands (the rest is output)."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        yield line


def words(line: str) -> list[list[str]]:
    """A shell line as simple commands (split at |, &&, ||, ;), each as its words."""
    lex = shlex.shlex(line, posix=True, punctuation_chars="|&;()")
    lex.whitespace_split = True
    lex.commenters = "#"
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok and set(tok) <= set("|&;()"):
            out.append([])
        else:
            out[-1].append(tok)
    return [c for c in out if c]


INVOKES = re.compile(
    r"(?:^|[\s|&;(])(?:[\w./-]*/)?(?:pingpost|make)(?:\s|$)"
    r"|-m\s+streams\.tools\.cli"
)


def pingpost_argv(cmd: list[str]) -> list[str] | None:
    """The arguments of a pingpost invocation (env assignments skipped), or None."""
    while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
        cmd = cmd[1:]
    if not cmd:
        return None
    prog = cmd[0].rsplit("/", 1)[-1]
    if prog == "pingpost":
        return cmd[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", prog) and cmd[1:3] == ["-m", "streams.tools.cli"]:
        return cmd[3:]
    return None


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise KeyError(command)


def abbreviated_options(argv: list[str], command: str) -> list[str]:
    """Options argparse accepted only as abbreviations (``--htm`` for ``--html``): a later
    option can make them ambiguous, so the docs spell every option out."""
    at = argv.index(command)
    end = argv.index("--", at) if "--" in argv[at:] else len(argv)
    out = []
    for part, names in (
        (argv[:at], option_strings(build_parser())),
        (argv[at + 1 : end], option_strings(subparser(command))),
    ):
        for tok in part:
            if tok.startswith("-") and tok != "-" and tok.split("=", 1)[0] not in names:
                out.append(tok)
    return out


def check_pingpost(argv: list[str]) -> str | None:
    """None when pingpost's own parser accepts ``argv``; else its complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and {"-h", "--help"} & set(argv):
            return None
        return err.getvalue().strip().splitlines()[-1] if err.getvalue() else f"exit {exc.code}"
    misspelt = abbreviated_options(argv, args.command)
    if misspelt:
        return f"options not spelt as declared (argparse took them as abbreviations): {misspelt}"
    if args.command == "supervise":  # `pingpost supervise -- worker --role sink`
        inner = list(args.command_line)
        if inner[:1] == ["--"]:
            inner = inner[1:]
        if not inner:
            return "supervise: no command to run"
        problem = check_pingpost(inner)
        return None if problem is None else f"supervise -- {' '.join(inner)}: {problem}"
    return None


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)", text, re.M)}


@dataclass(frozen=True)
class Invocation:
    where: str
    line: str
    kind: str  # "pingpost" or "make"
    argv: tuple[str, ...]


def invocations() -> list[Invocation]:
    out = []
    for block in blocks(SHELL_LANGS):
        for line in commands(block):
            if not INVOKES.search(line):
                continue
            try:
                simple = words(line)
            except ValueError as exc:  # unbalanced quotes on a line that runs pingpost
                raise AssertionError(f"{block.where()}: cannot parse `{line}`: {exc}") from None
            for cmd in simple:
                argv = pingpost_argv(cmd)
                if argv is not None:
                    out.append(Invocation(block.where(), line.strip(), "pingpost", tuple(argv)))
                elif cmd[0] == "make":
                    out.append(Invocation(block.where(), line.strip(), "make", tuple(cmd[1:])))
    return out


def test_the_readme_commands_are_seen() -> None:
    """The contract's two README commands, and the README's pingpost commands, are among the
    invocations checked (a parser that found nothing would pass every check)."""
    seen = {(i.kind, i.argv) for i in invocations() if i.where.startswith("README.md")}
    assert ("make", ("demo",)) in seen and ("make", ("test",)) in seen
    assert any(kind == "pingpost" and argv[:1] == ("sql",) for kind, argv in seen)


@pytest.mark.parametrize("inv", invocations(), ids=lambda i: f"{i.where} {' '.join(i.argv)}")
def test_documented_command_is_accepted(inv: Invocation) -> None:
    if inv.kind == "make":
        targets = makefile_targets()
        named = [a for a in inv.argv if not a.startswith("-") and "=" not in a]
        assert named, f"{inv.where}: `{inv.line}` names no make target"
        unknown = [t for t in named if t not in targets]
        assert not unknown, (
            f"{inv.where}: `{inv.line}`: no Makefile target {unknown} (targets: {sorted(targets)})"
        )
        return
    problem = check_pingpost(list(inv.argv))
    assert problem is None, f"{inv.where}: `{inv.line}`: {problem}"


def inline_mentions() -> list[tuple[Path, int, str]]:
    out = []
    for page in DOCS:
        for number, line in split_markdown(page)[0]:
            for m in INLINE_CODE.finditer(line):
                code = m.group(2).strip()
                if re.match(r"^(?:[\w./-]*/)?pingpost\s", code):
                    out.append((page, number, code))
    return out


@pytest.mark.parametrize(
    ("page", "number", "code"),
    inline_mentions(),
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_inline_command_mention_names_real_options(page: Path, number: int, code: str) -> None:
    """Prose and tables quote commands as synopses (`pingpost warehouse [--port P]`,
    `kafka start\\|stop`): those are not parsed whole, but the subcommand must exist and every
    option must be one it declares, spelt out."""
    toks = [tok.strip("[]") for tok in code.replace("\\|", " ").split()[1:]]
    top = option_strings(build_parser())
    while toks and toks[0] in top:  # --config FILE before the subcommand
        toks = toks[2:] if toks[0] == "--config" else toks[1:]
    where = f"{rel(page)}:{number}: `{code}`"
    assert toks, f"{where}: no subcommand"
    if re.fullmatch(r"<[^>]+>", toks[0]):  # `pingpost <command> --help`: any subcommand
        names = {"-h", "--help"}
    else:
        try:
            names = option_strings(subparser(toks[0]))
        except KeyError:
            raise AssertionError(f"{where}: no subcommand '{toks[0]}'") from None
    opts = toks[1 : toks.index("--")] if "--" in toks else toks[1:]
    unknown = [o for o in opts if o.startswith("-") and o.split("=", 1)[0] not in names]
    assert not unknown, f"{where}: '{toks[0]}' has no option {unknown}"


# --------------------------------------------------------------------------- (c) YAML


def merge(base: Any, snippet: Any) -> Any:
    """``snippet`` laid over ``base``: mappings merge key by key; a list of mappings with ids
    (buyers: ``id``, alert rules: ``name``) merges item by item, new ids appended; anything
    else replaces."""
    if isinstance(base, dict) and isinstance(snippet, dict):
        out = dict(base)
        for k, v in snippet.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(snippet, list)
        and all(isinstance(x, dict) for x in [*base, *snippet])
    ):
        for key in ("id", "name"):
            if all(key in x for x in [*base, *snippet]):
                merged = list(base)
                index = {x[key]: i for i, x in enumerate(merged)}
                for item in snippet:
                    if item[key] in index:
                        merged[index[item[key]]] = merge(merged[index[item[key]]], item)
                    else:
                        merged.append(copy.deepcopy(item))
                return merged
    return copy.deepcopy(snippet)


def placeholder_env(text: str) -> dict[str, str]:
    """A value for every ${VAR} a snippet names (the docs' secrets)."""
    env = {}
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text):
        env[name] = (
            "https://hooks.example.test/alert"
            if name.endswith("_URL")
            else "doc-test-secret-0123456789"
        )
    return env


def yaml_blocks() -> list[Block]:
    return blocks(YAML_LANGS)


def test_documents_have_config_snippets() -> None:
    assert len(yaml_blocks()) >= 8


@pytest.mark.parametrize("block", yaml_blocks(), ids=Block.where)
def test_yaml_block_parses_and_validates(block: Block) -> None:
    try:
        doc = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        raise AssertionError(f"{block.where()}: not YAML: {exc}") from None
    first = block.text.strip().splitlines()[0]
    if (block.path.name, first) in PARTIAL_YAML:
        pytest.skip(PARTIAL_YAML[(block.path.name, first)])
    known = set(Settings.model_fields)
    if not isinstance(doc, dict) or not known & set(doc):
        return  # not a pingpost configuration
    unknown = set(doc) - known
    assert not unknown, f"{block.where()}: unknown top-level keys {sorted(unknown)}"
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    try:
        parse_settings(merge(demo, doc), env=placeholder_env(block.text))
    except ConfigError as exc:
        raise AssertionError(f"{block.where()}: merged onto config/demo.yaml: {exc}") from None


# --------------------------------------------------------------------------- the checkers


def test_slug_follows_github() -> None:
    assert slug("The one rule: query with `FINAL`") == "the-one-rule-query-with-final"
    assert slug("`leads` — one row per accepted lead") == "leads--one-row-per-accepted-lead"
    assert slug("Waves (multi-tier ping)") == "waves-multi-tier-ping"
    assert slug("Caps and budgets: never exceeded") == "caps-and-budgets-never-exceeded"


def test_checkers_catch_a_bad_flag_and_a_bad_target() -> None:
    assert check_pingpost(["sql", "SELECT 1"]) is None
    assert check_pingpost(["--config", "x.yaml", "check-config"]) is None
    assert check_pingpost(["supervise", "--", "worker", "--role", "sink"]) is None
    assert check_pingpost(["report", "--htm", "x.html"]) is not None  # an abbreviation
    assert check_pingpost(["report", "--pdf", "x.pdf"]) is not None
    assert check_pingpost(["reports"]) is not None
    assert check_pingpost(["supervise", "--", "worker", "--role", "sinks"]) is not None
    assert "demo" in makefile_targets() and "install" in makefile_targets()
    assert ".PHONY" not in makefile_targets()


def test_merge_lays_a_snippet_over_the_demo() -> None:
    base = {"buyers": [{"id": "a", "tier": "x", "timeout_ms": 1}], "flows": {"f": {"a": 1}}}
    got = merge(base, {"buyers": [{"id": "a", "tier": "y"}, {"id": "b"}], "flows": {"f": {"b": 2}}})
    assert got == {
        "buyers": [{"id": "a", "tier": "y", "timeout_ms": 1}, {"id": "b"}],
        "flows": {"f": {"a": 1, "b": 2}},
    }


def test_the_compose_config_is_the_demo_config_with_compose_addresses() -> None:
    """docs/operations.md calls deploy/compose.yaml the demo config pointed at the compose
    services: everything but addresses must be the same (it once lacked the demo's floors,
    caps and auto-pause, so Docker sold differently from `make demo`)."""

    def sans_addresses(doc: Any) -> Any:
        if isinstance(doc, dict):
            return {
                k: sans_addresses(v)
                for k, v in doc.items()
                if k not in {"bootstrap", "url", "listen", "host", "ping_url", "post_url"}
            }
        if isinstance(doc, list):
            return [sans_addresses(v) for v in doc]
        return doc

    demo = yaml.safe_load(Path("config/demo.yaml").read_text())
    compose = yaml.safe_load(Path("deploy/compose.yaml").read_text())
    assert sans_addresses(compose) == sans_addresses(demo)
