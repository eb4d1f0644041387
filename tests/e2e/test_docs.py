"""The user docs' shell blocks run, in order, as written (as rustdoc runs doc examples).

Fence conventions (the first word stays the language, so renderers show the
blocks as usual):

- ```` ```sh ````: run. The blocks of one document run in order in one bash
  (``set -euo pipefail``), in a fresh folder holding a link to examples/,
  with the venv's ``cove`` first on PATH and private HOME, platform and
  broker folders.
- ```` ```sh skip: REASON ````: shown, not run (it needs hardware, a real host's
  root, or another machine). The test reports each one with its reason.
- A command whose comment starts with ``# cove: error:`` must fail with a
  ``cove: error:`` line on stderr.
- Every fence names a language (``sh``, ``toml``, ``python``, ``json``,
  ``text``): an unlabelled block fails the test, so a command cannot hide
  from it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, require

DOCS = ("quickstart", "config", "secure-fs", "attestation", "kbs")
FENCE = re.compile(r"^```(.*)$")
LANGUAGES = {"sh", "toml", "python", "json", "text", "cbor", "http"}
VENV_BIN = Path(sys.executable).parent


@dataclass
class Block:
    line: int
    language: str
    skip: str | None
    body: str


def blocks(path: Path) -> list[Block]:
    found, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if not match:
            if current is not None:
                current.body += line + "\n"
            continue
        if current is not None:
            found.append(current)
            current = None
            continue
        info = match.group(1).strip()
        language, _, rest = info.partition(" ")
        skip = rest.partition("skip:")[2].strip() if rest.startswith("skip:") else None
        current = Block(number, language, skip, "")
    return found


def _commands(body: str) -> list[str]:
    """Lines joined at backslash continuations."""
    out, pending = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def script(doc: Path, runnable: list[Block]) -> str:
    lines = [
        "set -euo pipefail",
        f"export PATH={VENV_BIN}:$PATH",
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
    ]  # a broker a block left running
    for block in runnable:
        lines.append(f"echo '### {doc.name}:{block.line}' >&2")
        for command in _commands(block.body):
            code, _, comment = command.partition(" # ")
            if comment.strip().startswith("cove: error:"):
                lines.append(
                    f'if ( {code.strip()} ) 2>"$DOCTEST_ERR"; then '
                    f"echo {shlex.quote('expected to fail: ' + code.strip())} >&2; exit 1; fi"
                )
                lines.append('grep -q \'^cove: error: \' "$DOCTEST_ERR" || { cat "$DOCTEST_ERR" >&2; exit 1; }')
            else:
                lines.append(command)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", DOCS)
def test_doc_runs_as_written(cove, tmp_path, name):
    doc = ROOT / "docs" / f"{name}.md"
    found = blocks(doc)
    unlabelled = [b.line for b in found if b.language not in LANGUAGES]
    assert not unlabelled, f"{doc}: fences without a known language at lines {unlabelled}: label them"
    for block in found:
        if block.language == "sh" and block.skip is not None:
            assert block.skip, f"{doc}:{block.line}: `skip:` needs a reason"
            warnings.warn(f"{doc.name}:{block.line} not run: {block.skip}", stacklevel=1)
    runnable = [b for b in found if b.language == "sh" and b.skip is None]
    if not runnable:
        return
    require("bash")
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    env = dict(
        cove.env,
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"),
        COVE_PLATFORM_DIR=str(tmp_path / "platform"),
        DOCTEST_ERR=str(tmp_path / "stderr"),
    )
    command = ["bash", "-c", script(doc, runnable)]
    if os.geteuid() == 0:  # a network namespace of its own: the docs' fixed ports (a broker on 8443) never clash
        command = [
            require("unshare"),
            "--net",
            "--",
            "bash",
            "-c",
            f'{require("ip")} link set lo up && exec "$@"',
            "doc",
            *command,
        ]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{doc.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
