"""The documentation's examples are checked, not only read: commands parse, configs validate, links resolve.

No engine starts. Every `--speculative-config` in a shell block of README.md, docs/*.md or configs/README.md
goes through STD's argparse type, and every `vllm serve ...` line through vLLM's own serve parser with the
plugin loaded (what `vllm serve` does before it starts anything). Every offline
`LLM(..., speculative_config=...)` in a Python block is validated by `STDConfig`. The quick-start client
must compile, and every relative link must point at a file (and heading) that exists. Each checker also
gets a known-bad example, so that a checker that silently finds nothing fails too.
"""

import argparse
import ast
import contextlib
import dataclasses
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from helpers import serve_arg_parser, shell_commands

from vllm_std.config import METHOD, STDConfig, STDConfigError
from vllm_std.patches import speculative_config_type

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "configs" / "README.md"]
SHELL = {"bash", "sh", "shell", "console"}
PLACEHOLDER = "MODEL"
"""What `$MODEL`, `"${VIDEO}"` and other shell variables become before a command line is parsed."""
QUICKSTART_CLIENT = "python quickstart-client"


# ------------------------------------------------------------------------------------------ extraction


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts, its info string and its text."""

    path: Path
    line: int
    info: str
    text: str

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*)$")


def code_blocks(path: Path, text: str | None = None) -> list[Block]:
    """Fenced blocks of a markdown file (`text` overrides the file's contents, for the self-tests)."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match.groups()
        body, j = [], i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence) and set(closing) == {fence[0]}:
                break
            body.append(lines[j].removeprefix(indent))
            j += 1
        blocks.append(Block(path, i + 1, info.strip(), "\n".join(body)))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in DOCS for block in code_blocks(path)]


def command_lines(block: Block) -> list[str]:
    """Logical shell lines: continuations joined; in `console` blocks only `$ ` lines (the rest is output)."""
    lines = []
    for line in block.text.replace("\\\n", " ").splitlines():
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if line.strip():
            lines.append(line)
    return lines


_CAT = re.compile(r"\"\$\(cat ([^)\s]+)\)\"")
_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


def shell_words(line: str) -> list[list[str]]:
    """The simple commands of one shell line, as the shell would split them.

    `"$(cat FILE)"` becomes FILE's contents (FILE relative to the repository root, where the docs' commands
    run), other variables become a placeholder; `# comments`, pipes and `&&` are handled.
    """
    line = _CAT.sub(lambda m: shlex.quote((ROOT / m.group(1)).read_text().strip()), line)
    line = _VARIABLE.sub(PLACEHOLDER, line)
    if "$(" in line or "`" in line:
        raise ValueError(f"cannot expand the command substitution in: {line}")
    return shell_commands(line)


def speculative_config_values(words: list[str]) -> list[str]:
    values = []
    for i, word in enumerate(words):
        if word in ("--speculative-config", "-sc") and i + 1 < len(words):
            values.append(words[i + 1])
        elif word.startswith("--speculative-config="):
            values.append(word.split("=", 1)[1])
    return values


def serve_arguments(words: list[str]) -> list[str] | None:
    """`[model, *flags]` if the command is `[VAR=x ...] .../vllm serve ...`, else None."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    if len(words) >= 2 and Path(words[0]).name == "vllm" and words[1] == "serve":
        return words[2:]
    return None


@dataclasses.dataclass(frozen=True)
class SpecCommand:
    where: str
    line: str


def spec_commands(blocks: list[Block]) -> list[SpecCommand]:
    """Every shell line that sets `--speculative-config` or runs `vllm serve` (a typo in a flag name must not
    hide a line from the check)."""
    return [
        SpecCommand(f"{block.where}[{i}]", line)
        for block in blocks
        if block.lang in SHELL
        for i, line in enumerate(command_lines(block))
        if "--speculative-config" in line
        or re.search(r"(^|\s)-sc(\s|$)", line)
        or re.search(r"(^|[\s/])vllm\s+serve(\s|$)", line)
    ]


# -------------------------------------------------------------------------------------------- checkers


def _is_std(value: Any) -> bool:
    return value == METHOD or (isinstance(value, dict) and value.get("method") == METHOD)


def check_command(line: str, parser: Any) -> list[str]:
    """Errors of one documented command line (empty if it is fine)."""
    try:
        commands = shell_words(line)
    except (ValueError, OSError) as e:
        return [str(e)]
    errors, found = [], 0
    for words in commands:
        values = speculative_config_values(words)
        found += len(values) + (serve_arguments(words) is not None)
        parsed = []
        for value in values:
            try:
                parsed.append(speculative_config_type(value))
            except argparse.ArgumentTypeError as e:
                errors.append(f"--speculative-config {value!r}: {e}")
        args = serve_arguments(words)
        if args is None or errors:
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                namespace = parser.parse_args(args)
        except SystemExit:
            errors.append(f"`vllm serve` rejects it: {stderr.getvalue().strip().splitlines()[-1]}")
            continue
        if parsed and namespace.speculative_config != parsed[-1]:
            errors.append(f"vllm serve parsed {namespace.speculative_config!r}, expected {parsed[-1]!r}")
        if parsed and _is_std(parsed[-1]) and not isinstance(namespace.speculative_config, dict):
            errors.append("the plugin's --speculative-config type was not installed in vLLM's parser")
    if not found:
        errors.append("neither a --speculative-config value nor a `vllm serve` command on this line")
    return errors


def _literal(node: ast.expr, module: ast.Module) -> Any:
    """A literal, or a name assigned a literal somewhere in the same block."""
    if isinstance(node, ast.Name):
        for statement in ast.walk(module):
            if isinstance(statement, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == node.id for t in statement.targets
            ):
                return ast.literal_eval(statement.value)
    return ast.literal_eval(node)


def llm_speculative_configs(source: str) -> list[tuple[int, Any]]:
    """`(line, value)` of every `LLM(..., speculative_config=...)` call in a Python block."""
    module = ast.parse(source)
    found = []
    for node in ast.walk(module):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name != "LLM":
            continue
        for keyword in node.keywords:
            if keyword.arg == "speculative_config":
                found.append((node.lineno, _literal(keyword.value, module)))
    return found


def check_llm_config(value: Any) -> list[str]:
    if not _is_std(value):
        return []
    try:
        STDConfig.parse(value)
    except STDConfigError as e:
        return [str(e)]
    return []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _without_code(path.read_text(), keep_spans=True)  # `selection` in a heading is in its anchor
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def _without_code(text: str, keep_spans: bool = False) -> str:
    """The text outside fenced blocks and (unless `keep_spans`) inline code spans: links there are
    examples, not links."""
    kept, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
        elif fence is not None and line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
            fence = None
        elif fence is None:
            kept.append(line)
    text = "\n".join(kept)
    return text if keep_spans else re.sub(r"`[^`\n]*`", "", text)


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Relative links (and their #anchors) of a markdown file that point nowhere."""
    errors = []
    for target in _LINK.findall(_without_code(path.read_text() if text is None else text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            errors.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            errors.append(f"{target}: no heading #{fragment} in {resolved.name}")
    return errors


def check_quickstart_client(blocks: list[Block]) -> list[str]:
    """The quick-start client exists once, in docs/quickstart.md, compiles, and takes its settings from
    `OPENAI_BASE_URL` (default the local server) and `VIDEO`, which is all a runner may substitute."""
    found = [b for b in blocks if b.info == QUICKSTART_CLIENT]
    if [b.path.name for b in found] != ["quickstart.md"]:
        return [f"expected one {QUICKSTART_CLIENT!r} block in docs/quickstart.md, found {found}"]
    try:
        code = compile(found[0].text, found[0].where, "exec", ast.PyCF_ONLY_AST)
    except SyntaxError as e:
        return [f"{found[0].where}: {e}"]
    strings = {n.value for n in ast.walk(code) if isinstance(n, ast.Constant)}
    missing = {"OPENAI_BASE_URL", "VIDEO", "http://127.0.0.1:8000/v1"} - strings
    return [f"{found[0].where}: does not mention {sorted(missing)}"] if missing else []


# -------------------------------------------------------------------------------------------- the docs

BLOCKS = all_blocks()
COMMANDS = spec_commands(BLOCKS)
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]


@pytest.fixture(scope="module")
def parser() -> Any:
    return serve_arg_parser()


def test_docs_have_commands_to_check() -> None:
    """The extraction finds the commands the docs are known to show (an extractor that finds none fails)."""
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/configuration.md", "docs/quickstart.md", "configs/README.md"} <= where
    assert sum(serve_arguments(w) is not None for c in COMMANDS for w in shell_words(c.line)) >= 6
    assert any("$(cat configs/" in c.line for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_documented_command_is_accepted(command: SpecCommand, parser: Any) -> None:
    """STD's argparse type accepts the value, and vLLM's serve parser the whole command line."""
    errors = check_command(command.line, parser)
    assert not errors, f"{command.where}: {command.line}\n" + "\n".join(errors)


def test_documented_llm_configs_are_valid() -> None:
    """Every offline `LLM(..., speculative_config=...)` in a Python block is a valid STD config."""
    checked = 0
    for block in PYTHON_BLOCKS:
        try:
            configs = llm_speculative_configs(block.text)
        except (SyntaxError, ValueError) as e:
            pytest.fail(f"{block.where}: {e}")
        for line, value in configs:
            errors = check_llm_config(value)
            assert not errors, f"{block.where} (+{line}): {errors}"
            checked += _is_std(value)
    assert checked >= 3, "README.md, docs/configuration.md and docs/quickstart.md each show one"


def test_quickstart_client_compiles() -> None:
    """The block another test runs against a real server is there and compiles."""
    assert check_quickstart_client(BLOCKS) == []


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert not broken_links(path), broken_links(path)


def test_docs_index_lists_every_doc() -> None:
    """docs/README.md links every file in docs/, and README.md links the index."""
    index = (ROOT / "docs" / "README.md").read_text()
    for doc in (ROOT / "docs").glob("*.md"):
        if doc.name != "README.md":
            assert f"]({doc.name})" in index, f"docs/README.md does not link {doc.name}"
    assert "](docs/README.md)" in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------- the checkers can fail


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("""vllm serve M --speculative-config '{"method": "std", "topk": 1024}'""", "topk"),
        ("""vllm serve M --speculative-config '{"method": "std", "top_k": 0}'""", "top_k"),
        ("vllm serve M --speculative-config sdt", "JSON"),
        ("vllm serve M --speculative-config std --no-such-flag", "no-such-flag"),
        ("vllm serve M --speculative-confg std", "speculative-confg"),
        ("""docker run i M --speculative-config '{"method": "std", "num_speculative_tokens": 33}'""", "32"),
        ("""vllm serve M --speculative-config "$(cat configs/no-such-file.json)\"""", "no-such-file"),
    ],
)
def test_bad_command_is_reported(line: str, expected: str, parser: Any) -> None:
    errors = check_command(line, parser)
    assert errors and expected in " ".join(errors), errors


def test_good_command_forms_pass(parser: Any) -> None:
    """Continuations, variables, comments, `"$(cat ...)"` and env assignments are understood."""
    block = Block(
        ROOT / "docs" / "x.md",
        1,
        "bash",
        'VLLM_CPU_KVCACHE_SPACE=4 .venv/bin/vllm serve "$MODEL" \\\n'
        '    --speculative-config "$(cat configs/qwen2-vl-7b-instruct.json)"  # a comment\n'
        "vllm serve ${MODEL} --speculative-config std && echo done",
    )
    lines = command_lines(block)
    assert len(lines) == 2
    for line in lines:
        assert check_command(line, parser) == []


def test_bad_llm_config_is_reported() -> None:
    source = 'import vllm\nspec = {"method": "std", "top_k": 0}\nllm = vllm.LLM(M, speculative_config=spec)\n'
    [(_, value)] = llm_speculative_configs(source)
    assert "top_k" in " ".join(check_llm_config(value))
    [(_, value)] = llm_speculative_configs('LLM(M, speculative_config={"method": "std", "gama": 4})')
    assert "gama" in " ".join(check_llm_config(value))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python quickstart-client\nprint(\n```\n", "never closed"),
        ("```python quickstart-client\nimport os\nos.environ['VIDEO']\n```\n", "OPENAI_BASE_URL"),
        ("```python\nprint(1)\n```\n", "expected one"),
    ],
)
def test_bad_quickstart_client_is_reported(text: str, expected: str) -> None:
    errors = check_quickstart_client(code_blocks(ROOT / "docs" / "quickstart.md", text))
    assert errors and expected in errors[0], errors


def test_broken_link_is_reported() -> None:
    path = ROOT / "docs" / "README.md"
    text = "[a](quickstart.md) [b](no-such.md) [c](tuning.md#no-such) [d](https://x.org/y) `[e](z.md)`"
    errors = broken_links(path, text)
    assert len(errors) == 2 and "no-such.md" in errors[0] and "#no-such" in errors[1]


def test_code_blocks_are_split_at_their_fences() -> None:
    text = "x\n```python quickstart-client\na = 1\n```\n  ```bash\n  vllm serve M\n  ```\n"
    blocks = code_blocks(ROOT / "docs" / "x.md", text)
    assert [(b.info, b.text, b.line) for b in blocks] == [
        ("python quickstart-client", "a = 1", 2),
        ("bash", "vllm serve M", 5),
    ]
    assert json.loads(shell_words("""a --speculative-config '{"top_k": 5}'""")[0][2]) == {"top_k": 5}
