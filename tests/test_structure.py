"""Modules keep to their public names: no `mod._x` on an imported cove module, no `from cove.m import _x`.

A package's private modules (`attest/_reader.py`, `_x509`, `_cbor`, `_keys`) may be imported inside their
own package only. Generated protobuf modules are not Cove's code and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package(module: str) -> str:
    return module.rpartition(".")[0]


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Private-name uses across modules in one module's source, as 'line: what'."""
    here = module if is_package else _package(module)
    tree = ast.parse(source)
    found: list[str] = []
    cove_names: set[str] = set()  # local names bound to cove modules

    def private_module_outside(target: str, line: int) -> None:
        parts = target.split(".")
        for depth, part in enumerate(parts):
            if _is_private(part):
                owner = ".".join(parts[:depth])
                if here != owner and not here.startswith(owner + "."):
                    found.append(f"{line}: imports the private module {target} from outside {owner}")
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cove":
                    private_module_outside(alias.name, node.lineno)
                    if alias.asname:
                        cove_names.add(alias.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in Cove; resolve them anyway
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cove":
                continue
            private_module_outside(target, node.lineno)
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if _is_private(alias.name):
                    if full != module and _package(full) == target and _is_module(full):
                        private_module_outside(full, node.lineno)
                    elif target != module:
                        found.append(f"{node.lineno}: imports the private name {alias.name} from {target}")
                if _is_module(full):
                    cove_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in cove_names
        ):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr} is private to that module")
    return found


def _is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules():
    for path in sorted((SRC / "cove").rglob("*.py")):
        relative = path.relative_to(SRC).with_suffix("")
        if "proto" in relative.parts:
            continue
        parts = list(relative.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        yield ".".join(parts), path, is_package


def test_no_module_uses_another_modules_private_names():
    problems = [
        f"{path.relative_to(SRC)}:{line}"
        for module, path, is_package in _modules()
        for line in violations(module, path.read_text(), is_package)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        (
            "cove.fs.server",
            "from cove.fs import encrypted_image\nencrypted_image._listing(1)\n",
            "encrypted_image._listing is private",
        ),
        ("cove.fs.server", "import cove.fs.encrypted_image as image\nimage._listing(1)\n", "image._listing is private"),
        ("cove.platform.endorse", "from cove.attest._cbor import loads\n", "private module cove.attest._cbor"),
        ("cove.platform.endorse", "from cove.attest import _cbor\n", "private module cove.attest._cbor"),
        ("cove.kbs.broker", "from cove.kbs.jose import _admin_alg\n", "private name _admin_alg"),
    ],
)
def test_the_check_catches(module, source, expected):
    assert any(expected in v for v in violations(module, source))


@pytest.mark.parametrize(
    "module, source",
    [
        ("cove.attest.dcap", "from cove.attest._x509 import load_pem_chain\n"),  # its own package's private module
        ("cove.attest.dcap", "from cove.attest import _keys\n_keys.verify_ecdsa\n"),
        ("cove.fs.volume", "self._inodes = {}\nos._exit(0)\n"),  # own state; not a cove module
        ("cove.fs.volume", "from cove.fs import encrypted_image\nencrypted_image.listing_of(1)\n"),
    ],
)
def test_the_check_allows(module, source):
    assert violations(module, source) == []
