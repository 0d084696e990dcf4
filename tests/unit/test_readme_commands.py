"""README.md's command lines match the code, without running any of them.

* every ``gen-ad ...`` line (fenced blocks, and inline code spans that start with ``gen-ad ``;
  ``python -m gen_ad.cli ...`` and ``accelerate launch -m gen_ad.cli ...`` count too) names an
  existing subcommand (and action: ``knn fit``, ``weights install``) and only options that
  subcommand's parser accepts, written in full (argparse would take an abbreviation; docs should
  not rely on it). Options in brackets or with placeholder values (``[--threshold iqr|fpr]``)
  are checked like the others; ``key.sub=value`` overrides are positional. A written value of
  a one-value option must be one of its choices (each of ``iqr|fpr``) and pass its type;
  placeholders (``N``, ``DIR``, ``<run>``) are not values;
* every ``python|python3 bench/*.py|scripts/*.py|train/*.py ...`` line (also after ``VAR=value``
  and ``accelerate launch``) names an existing file and only options its parser declares. The
  option lists are read statically from the files' ``add_argument`` calls (``--help`` of the
  benches imports torch: about 90 s for all of them on 2 busy cores); the ``slow`` test below
  checks the static lists against the real ``--help`` output;
* every ``configs/...yaml`` path exists (``<name>`` and ``*`` must match at least one file), every
  ``make <target>`` is a Makefile target, and ``GPU_CHECK_ARGS="..."`` holds only options of
  ``scripts/gpu_check.py`` (the recipe that receives them).

Every failure names the README line and what is wrong.
"""

from __future__ import annotations

import argparse
import ast
import functools
import glob
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gen_ad.cli import build_parser, build_train_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

_FENCE = re.compile(r"^\s*(```|~~~)")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_OPTION = re.compile(r"--?[A-Za-z][\w-]*")
_COMMAND_START = re.compile(
    r"(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:gen-ad\s|python3?\s|accelerate\s+launch\s|make\s)")


@dataclass(frozen=True)
class Snippet:
    """One command line of the README: where it starts and its text (continuations joined)."""

    line: int
    text: str

    def where(self) -> str:
        return f"README.md:{self.line}: `{self.text}`"


# ----------------------------------------------------------------------------- README reading


def _fenced_and_prose(lines: list[str]) -> tuple[list[Snippet], list[str]]:
    """Logical lines of fenced blocks (backslash continuations joined), and the README with the
    fenced lines blanked (line numbers kept) for the inline spans."""
    fenced: list[Snippet] = []
    prose: list[str] = []
    in_fence = False
    pending: list[str] = []
    start = 0
    for no, line in enumerate(lines, 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            prose.append("")
            continue
        if not in_fence:
            prose.append(line)
            continue
        prose.append("")
        if not pending:
            start = no
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        fenced.append(Snippet(start, " ".join(p.strip() for p in pending)))
        pending = []
    return fenced, prose


def _inline_spans(prose: list[str]) -> list[Snippet]:
    """Inline code spans (they may wrap onto the next line), whitespace normalised."""
    text = "\n".join(prose)
    spans = []
    for m in re.finditer(r"`([^`]+)`", text):
        body = m.group(1)
        if "\n\n" in body:  # a lone backtick: not a span
            continue
        spans.append(Snippet(text.count("\n", 0, m.start()) + 1, " ".join(body.split())))
    return spans


@functools.cache
def _readme() -> tuple[tuple[Snippet, ...], tuple[Snippet, ...]]:
    """(every command-looking logical line of a fenced block, every inline code span)."""
    fenced, prose = _fenced_and_prose(README.read_text(encoding="utf-8").splitlines())
    return tuple(fenced), tuple(_inline_spans(prose))


def _command_snippets() -> list[Snippet]:
    """Fenced lines and inline spans that are commands (``gen-ad``, ``python``, ``accelerate
    launch``, ``make``, possibly after ``VAR=value`` assignments)."""
    fenced, inline = _readme()
    return [s for s in (*fenced, *inline) if _COMMAND_START.match(s.text + " ")]


def _tokens(text: str) -> list[str]:
    """Shell words without the trailing comment; a span with unbalanced quotes splits on space."""
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return re.split(r"\s+#", text, maxsplit=1)[0].split()


def _bare(token: str) -> str:
    """A word without the brackets of ``[--opt VALUE]`` / ``(--opt)`` usage notation."""
    return token.strip("[](){}")


def _option_name(token: str) -> str | None:
    """``--name`` of an option word (``--name=value`` too), else None."""
    word = _bare(token)
    m = _OPTION.fullmatch(word.split("=", 1)[0])
    return m.group(0) if m else None


def _is_placeholder(token: str) -> bool:
    """A word that stands for a name rather than being one: ``...``, ``<family>``, ``COMMAND``."""
    word = _bare(token)
    return (not word or "..." in word or "…" in word or "<" in word or ">" in word
            or "|" in word or (word.isupper() and word.isalpha()))


# ----------------------------------------------------------------------------- parsers


@functools.cache
def _gen_ad_parser() -> argparse.ArgumentParser:
    """``gen-ad``'s parser, built once (only read here)."""
    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def _check_options(words: list[str], options: set[str], what: str) -> list[str]:
    """Problems of the option words of ``words`` that ``options`` lacks."""
    problems = []
    for word in words:
        name = _option_name(word)
        if name is not None and name not in options:
            problems.append(f"{what} has no option {name} (it has: {' '.join(sorted(options))})")
    return problems


def _check_value(action: argparse.Action, value: str, what: str) -> list[str]:
    """Problems of a written value of a one-value option: not one of its choices, or not of its
    type (``iqr|fpr`` lists alternatives; placeholders such as ``N`` or ``<run>`` are skipped)."""
    word = _bare(value)
    if action.choices is not None:
        wrong = [v for v in word.split("|") if v and v not in action.choices]
        return [f"{what} {action.option_strings[-1]}: {v!r} is not one of "
                f"{', '.join(map(str, action.choices))}" for v in wrong]
    if _is_placeholder(value) or not callable(action.type):
        return []
    try:
        action.type(word)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        return [f"{what} {action.option_strings[-1]}: bad value {word!r} ({e})"]
    return []


def _check_leaf(args: list[str], parser: argparse.ArgumentParser, what: str) -> list[str]:
    """Problems of the words after a (sub)command that has no subcommands of its own."""
    problems = _check_options(args, set(parser._option_string_actions), what)
    for word, value in zip(args, [*args[1:], ""]):
        name = _option_name(word)
        action = parser._option_string_actions.get(name) if name else None
        if action is None or action.nargs is not None:
            continue
        if "=" in word:
            value = word.split("=", 1)[1]
        elif not value or _option_name(value) is not None or word.endswith("]"):
            continue  # `[--opt] VALUE` is not the option's value; a missing one: a fragment
        problems += _check_value(action, value, what)
    return problems


def _check_gen_ad(args: list[str]) -> list[str]:
    """Problems of ``gen-ad ARGS``: unknown subcommand or action, unknown options, and values
    outside an option's choices or type."""
    parser = _gen_ad_parser()
    path = "gen-ad"
    i = 0
    while (subs := _subcommands(parser)) is not None and i < len(args):
        word = args[i]
        name = _option_name(word)
        if name is not None:  # an option of the command itself (gen-ad --debug knn ...)
            action = parser._option_string_actions.get(name)
            if action is None:
                return _check_options([word], set(parser._option_string_actions), path)
            i += 1 if action.nargs == 0 or "=" in word else 2
            continue
        if _is_placeholder(word):  # `gen-ad <command> ...`: nothing more to attribute
            return []
        if word not in subs:
            return [f"{path} has no subcommand {word!r} (it has: {', '.join(sorted(subs))})"]
        parser, path = subs[word], f"{path} {word}"
        i += 1
    return _check_leaf(args[i:], parser, path) if subs is None else []


def _static_options(path: Path) -> set[str]:
    """Option strings of every ``add_argument`` call in a script, plus ``-h/--help``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    options: set[str] = set()
    add_help = True
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "ArgumentParser":
            for kw in node.keywords:
                if kw.arg == "add_help" and isinstance(kw.value, ast.Constant):
                    add_help = bool(kw.value.value)
        if name != "add_argument":
            continue
        for arg in node.args:
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: add_argument "
                                     "with a computed name: the README check cannot read it")
            if arg.value.startswith("-"):
                options.add(arg.value)
    if add_help:
        options |= {"-h", "--help"}
    return options


def _delegates_to_train_main(path: Path) -> bool:
    """``train/<family>.py``: a script whose parser is :func:`gen_ad.cli.build_train_parser`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "train_main"
               for n in ast.walk(tree))


@functools.cache
def _script_options(rel: str) -> frozenset[str]:
    path = ROOT / rel
    if _delegates_to_train_main(path):
        return frozenset(build_train_parser(path.stem)._option_string_actions)
    return frozenset(_static_options(path))


def _check_script(rel: str, args: list[str]) -> list[str]:
    """Problems of ``python REL ARGS``: a missing file or unknown options."""
    if "<" in rel or "*" in rel:
        return []  # `train/<family>.py`: a pattern, not one file
    if not (ROOT / rel).is_file():
        return [f"{rel} does not exist"]
    return _check_options(args, set(_script_options(rel)), rel)


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """A README command resolved to what it runs."""

    kind: str  # "gen-ad", "script" or "make"
    snippet: Snippet
    target: str  # the script path for "script"
    args: tuple[str, ...]


def _resolve(snippet: Snippet) -> Command | None:
    """What a command line runs, or None for a line this test does not know (``pip``, ...)."""
    words = _tokens(snippet.text)
    while words and _ENV.match(words[0]):
        words = words[1:]
    if not words:
        return None
    head, rest = words[0], words[1:]
    if head == "gen-ad":
        return Command("gen-ad", snippet, "", tuple(rest))
    if head == "make":
        return Command("make", snippet, "", tuple(rest))
    if head == "accelerate" and rest[:1] == ["launch"]:
        rest = rest[1:]
        while rest and rest[0] != "-m" and not rest[0].endswith(".py"):
            rest = rest[1:]  # accelerate's own options
    elif head not in ("python", "python3"):
        return None
    if rest[:2] == ["-m", "gen_ad.cli"]:
        return Command("gen-ad", snippet, "", tuple(rest[2:]))
    if rest and rest[0].endswith(".py"):
        return Command("script", snippet, rest[0], tuple(rest[1:]))
    return None


@functools.cache
def _commands() -> tuple[Command, ...]:
    return tuple(c for s in _command_snippets() if (c := _resolve(s)) is not None)


@functools.cache
def _make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.MULTILINE))
    phony = re.search(r"^\.PHONY\s*:(.*)$", text, flags=re.MULTILINE)
    return frozenset(targets - {".PHONY"} | set(phony.group(1).split() if phony else ()))


def _gpu_check_recipe_takes_args() -> bool:
    return "scripts/gpu_check.py $(GPU_CHECK_ARGS)" in (ROOT / "Makefile").read_text("utf-8")


def _check_make(args: list[str]) -> list[str]:
    problems = []
    for word in args:
        if "=" in word:
            var, value = word.split("=", 1)
            if var == "GPU_CHECK_ARGS":
                assert _gpu_check_recipe_takes_args(), "Makefile no longer passes GPU_CHECK_ARGS"
                problems += _check_options(value.split(), set(_script_options(
                    "scripts/gpu_check.py")), "GPU_CHECK_ARGS (scripts/gpu_check.py)")
        elif not word.startswith("-") and not _is_placeholder(word):
            if word not in _make_targets():
                problems.append(f"the Makefile has no target {word!r} (it has: "
                                f"{', '.join(sorted(_make_targets()))})")
    return problems


def _problems(kind: str) -> Iterator[str]:
    for cmd in _commands():
        if cmd.kind != kind:
            continue
        if kind == "gen-ad":
            found = _check_gen_ad(list(cmd.args))
        elif kind == "script":
            found = _check_script(cmd.target, list(cmd.args))
        else:
            found = _check_make(list(cmd.args))
        for problem in found:
            yield f"{cmd.snippet.where()}: {problem}"


def _report(problems: list[str]) -> str:
    return f"{len(problems)} README command problem(s):\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- the checks


def test_readme_is_read() -> None:
    """The extraction finds what the README is known to hold (so an empty pass means nothing
    was wrong, not that nothing was read)."""
    cmds = _commands()
    gen_ad = [" ".join(c.args[:2]) for c in cmds if c.kind == "gen-ad"]
    assert len(gen_ad) >= 40, gen_ad
    for expected in ("knn fit", "knn score", "weights install", "weights list", "train wgan",
                     "score checkpoints/wgan-pcam64-encoder", "slide SLIDE.svs"):
        assert expected in gen_ad, (expected, gen_ad)
    scripts = {c.target for c in cmds if c.kind == "script"}
    assert {"bench/wgan.py", "bench/knn.py", "scripts/gpu_check.py",
            "scripts/feature_probe_study.py", "train/ddpm.py"} <= scripts, scripts
    # the continuation line of a fenced command is part of it
    assert any(c.kind == "gen-ad" and "[--calibration-limit" in c.args for c in cmds)
    # `accelerate launch -m gen_ad.cli train ...` is read as `gen-ad train ...`
    assert any(c.kind == "gen-ad" and c.snippet.text.startswith("accelerate") for c in cmds)


def test_gen_ad_commands_exist_with_their_options() -> None:
    problems = list(_problems("gen-ad"))
    assert not problems, _report(problems)


def test_script_commands_exist_with_their_options() -> None:
    problems = list(_problems("script"))
    assert not problems, _report(problems)


def test_make_targets_exist() -> None:
    problems = list(_problems("make"))
    for snippet in _readme()[0]:  # `make X` quoted in a fenced line's comment
        for m in re.finditer(r"`make ([A-Za-z0-9_.-]+)", snippet.text):
            if m.group(1) not in _make_targets():
                problems.append(f"{snippet.where()}: the Makefile has no target "
                                f"{m.group(1)!r}")
    assert not problems, _report(problems)


def test_config_paths_exist() -> None:
    problems = []
    for no, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        for m in re.finditer(r"configs/[^\s`'\"()\[\]|,;]+?\.yaml\b", line):
            path = m.group(0)
            pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", path)
            found = glob.glob(str(ROOT / pattern)) if "*" in pattern else (
                [pattern] if (ROOT / pattern).is_file() else [])
            if not found:
                problems.append(f"README.md:{no}: `{line.strip()}`: {path} "
                                f"{'matches no file' if '*' in pattern else 'does not exist'}")
    assert not problems, _report(problems)


# ----------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(("line", "expected"), [
    ("gen-ad score RUN --data D --out O --thresh iqr", "gen-ad score has no option --thresh"),
    ("gen-ad knn fit --extractor x --normal N --out B [--bogus 3]",
     "gen-ad knn fit has no option --bogus"),
    ("gen-ad knn fitt --normal N", "gen-ad knn has no subcommand 'fitt'"),
    ("gen-ad frobnicate --x", "gen-ad has no subcommand 'frobnicate'"),
    ("gen-ad --verbose train wgan", "gen-ad has no option --verbose"),
    ("gen-ad tile a.svs --out t --size 256 --mpp=0.5 --level-0 1",
     "gen-ad tile has no option --level-0"),
    ("gen-ad score R --data D --out O [--threshold iqr|fdr]",
     "gen-ad score --threshold: 'fdr' is not one of iqr, fpr"),
    ("gen-ad synth --out o --n 0", "gen-ad synth --n: bad value '0'"),
    ("gen-ad knn fit --extractor x --normal N --out B --metric=cos",
     "gen-ad knn fit --metric: 'cos' is not one of l2, cosine"),
])
def test_checker_finds_wrong_commands(line: str, expected: str) -> None:
    cmd = _resolve(Snippet(1, line))
    assert cmd is not None
    problems = _check_gen_ad(list(cmd.args))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize("line", [
    "gen-ad train ddpm --config c.yaml train.max_steps=100 --resume latest  # --not-checked",
    "gen-ad score RUN --data DIR --out OUT [--threshold iqr|fpr --fpr 0.05] [--n-boot 2000]",
    "gen-ad --debug ...",
    "gen-ad <command> --whatever",
    "gen-ad weights install --only lpips-vgg16",
    "gen-ad knn score BANK --data DIR --out OUT --k K [--threshold fpr] --fpr 0.1",
    "accelerate launch --num_processes 2 -m gen_ad.cli train ddpm --config c.yaml",
])
def test_checker_accepts_right_commands(line: str) -> None:
    cmd = _resolve(Snippet(1, line))
    assert cmd is not None and cmd.kind == "gen-ad"
    assert _check_gen_ad(list(cmd.args)) == []


def test_checker_reads_scripts_and_make() -> None:
    cmd = _resolve(Snippet(1, "GEN_AD_DATA=x python bench/knn.py --rounds 5 [--roundz 2]"))
    assert cmd is not None and cmd.kind == "script" and cmd.target == "bench/knn.py"
    problems = _check_script(cmd.target, list(cmd.args))
    assert len(problems) == 1 and problems[0].startswith("bench/knn.py has no option --roundz")
    assert _check_script("bench/nope.py", []) == ["bench/nope.py does not exist"]
    launch = _resolve(Snippet(1, "accelerate launch train/ddpm.py --config c.yaml --resume x"))
    assert launch is not None and launch.target == "train/ddpm.py"
    assert _check_script(launch.target, list(launch.args)) == []
    assert _check_script("train/ddpm.py", ["--config", "c", "--epochs", "3"]) != []
    assert _check_make(["tset"]) != [] and _check_make(["test", "PY=python3"]) == []
    assert _check_make(["gpu-check", "GPU_CHECK_ARGS=--patches DIR --nope"]) != []


# ----------------------------------------------------------------------------- slow cross-check


def _help_options(text: str) -> set[str]:
    """Option strings of an argparse ``--help`` text (its option lines)."""
    options = set()
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):
            for part in re.split(r" {2,}", line.strip())[0].split(", "):
                options.add(part.split()[0])
    return options


@pytest.mark.slow
@pytest.mark.parametrize("rel", sorted({c.target for c in _commands() if c.kind == "script"
                                        and (ROOT / c.target).is_file()}))
def test_static_option_lists_match_help(rel: str) -> None:
    """What the fast checks read from the source is what ``--help`` lists."""
    proc = subprocess.run([sys.executable, str(ROOT / rel), "--help"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _help_options(proc.stdout) == set(_script_options(rel)), proc.stdout
