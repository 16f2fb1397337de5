"""The package's rooms (docs/ARCHITECTURE.md): every module lives in one, and imports run one way only,
core ← policy ← edge, postfix ← ops ← cli. Read from the source with `ast`, so an import inside a function
or under TYPE_CHECKING counts as much as one at the top."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

# A room may import its own modules and those of the rooms ranked below it. The edge and the Postfix front
# ends share a rank: neither imports the other.
RANK = {"core": 0, "policy": 1, "edge": 2, "postfix": 2, "ops": 3, "cli": 4}


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module under the package, by dotted name."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path) -> list[tuple[int, str]]:
    """The gateway modules (or packages) that the module imports: (line, dotted name)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
    return [(line, target) for line, target in out if target == "gateway" or target.startswith("gateway.")]


def room_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def layout_problems(package: Path = PACKAGE) -> list[str]:
    problems = []
    for name, path in modules(package).items():
        room = room_of(name)
        if room is None or room == "__main__":
            continue  # the package itself and `python -m gateway`, the entry point above every room
        if room not in RANK:
            problems.append(f"{path}: in no room ({', '.join(RANK)})")
            continue
        for line, target in imported(name, path):
            other = room_of(target)
            if other is None or other == room:
                continue  # the package's own __init__ (the version) and the room's own modules
            if other not in RANK or RANK[other] >= RANK[room]:
                problems.append(f"{path}:{line}: the {room} room imports {target}")
    return problems


def test_every_module_is_in_a_room_and_imports_only_rooms_below_it():
    assert layout_problems() == []


def test_nothing_in_the_core_imports_another_room():
    core = {name: path for name, path in modules().items() if room_of(name) == "core"}
    tag_core = {"gateway.core.addresses", "gateway.core.prvs", "gateway.core.srs", "gateway.core.keyring"}
    assert tag_core <= set(core)
    for name, path in core.items():
        assert [target for _, target in imported(name, path) if room_of(target) not in (None, "core")] == []


def test_the_check_sees_an_import_that_runs_the_wrong_way(tmp_path):
    package = tmp_path / "gateway"
    for room in RANK:
        (package / room).mkdir(parents=True)
        (package / room / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "prvs.py").write_text("def f():\n    from ..policy import policy\n")
    (package / "edge" / "relay.py").write_text("from gateway.postfix.socketmap import PolicySource\n")
    (package / "ops" / "serve.py").write_text("from ..edge import relay\nfrom ..core.replies import Reply\n")
    (package / "flat.py").write_text("")
    assert layout_problems(package) == [
        f"{package / 'core' / 'prvs.py'}:2: the core room imports gateway.policy",
        f"{package / 'edge' / 'relay.py'}:1: the edge room imports gateway.postfix.socketmap",
        f"{package / 'flat.py'}: in no room ({', '.join(RANK)})",
    ]


def test_logger_names_are_written_out_not_built_from_module_paths():
    """Operators grep the logger names (logger=gateway.smtpd); a move between rooms must not change them."""
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger":
                (argument,) = node.args
                names = {n.id for n in ast.walk(argument) if isinstance(n, ast.Name)}
                assert "__name__" not in names, f"{path}:{node.lineno}"
                if isinstance(argument, ast.Constant):
                    assert argument.value.split(".")[0] == "gateway", f"{path}:{node.lineno}"


def test_pyproject_ships_every_room_and_its_script_points_at_main():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert set(project["tool"]["setuptools"]["packages"]) == packages
    target = project["project"]["scripts"]["batv-gateway"]
    module, _, attribute = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


@pytest.mark.parametrize("room", sorted(RANK))
def test_each_room_says_what_it_holds(room):
    assert ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))


def test_every_module_path_the_docs_name_exists():
    """A move between rooms takes the docs with it: README, docs/, bench/, deploy/, keys/ and the
    comments of pyproject.toml name modules by path."""
    docs = [ROOT / "README.md", ROOT / "pyproject.toml", *ROOT.glob("docs/*.md"), *ROOT.glob("keys/*.md")]
    docs += [p for folder in ("bench", "deploy") for p in (ROOT / folder).rglob("*") if p.is_file()]
    missing = []
    for doc in docs:
        for found in re.finditer(r"(?<![\w/.-])gateway/[\w/]+\.py\b", doc.read_text(errors="replace")):
            if not (ROOT / found.group()).is_file():
                missing.append(f"{doc.relative_to(ROOT)}: {found.group()}")
    assert missing == []
