"""The pack's shape: import circles, private names crossing modules, long files.

    python tools/structure.py            # from the repository root (stdlib only; nothing of the pack is imported)

Prints three sections and exits 1 when there is an import circle or a private name crossing modules, 0 otherwise.
Long files are reported, not failed: a file is split by meaning, not to meet a number.

* Circles: every import of a pack module counts, wherever it is written (module level, inside a function, under
  `if TYPE_CHECKING:`): a function-local import only postpones a circle, it does not open it.
* Private crossings: a `_name` (not `__dunder__`) taken from another pack module, by `from .mod import _name` or
  `mod._name`. Tests are not part of the pack: a test may reach into a module.
* Long files: Python files of training/, nodes/, runner/ and bench/ over 500 lines (the settings catalogue,
  training/settings.py, is declarative and may stay long).
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

PACKAGE = "comfyui_dreambooth"          # the installed name of the repository root (pyproject.toml package-dir)
NOT_PACK = {"tests", "tools", "example_workflows", "web"}   # top-level folders that are not the pack's code
SIZE_FOLDERS = ("training", "nodes", "runner", "bench")
SIZE_LIMIT = 500
SIZE_EXEMPT = {"training/settings.py"}


def pack_files(root: Path) -> dict[str, Path]:
    """Module name (dotted, relative to the root; "" is the root package) -> file."""
    modules = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__"))
                             and not (rel_dir == Path(".") and d in NOT_PACK))
        for name in sorted(filenames):
            if name.endswith(".py"):
                parts = list(rel_dir.parts) + [name[:-3]]
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = Path(dirpath) / name
    return modules


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Imports:
    """The pack imports of one module: edges to other modules, names bound to modules, private names taken."""

    def __init__(self, module: str, path: Path, modules: dict[str, Path]):
        self.module, self.path, self.modules = module, path, modules
        self.is_package = path.name == "__init__.py"
        self.edges: dict[str, list[int]] = {}          # target module -> lines
        self.private: list[tuple[int, str, str]] = []  # (line, target module, name)
        self.module_names: dict[str, str] = {}         # local name bound to a pack module -> that module

    def package(self) -> list[str]:
        parts = self.module.split(".") if self.module else []
        return parts if self.is_package else parts[:-1]

    def resolve(self, level: int, name: str | None) -> str | None:
        """A pack module for `from <level dots><name>` / `import <name>`, or None when it is not the pack's."""
        if level:
            base = self.package()
            if level > 1:
                base = base[:len(base) - (level - 1)]
            target = ".".join(base + (name.split(".") if name else []))
        elif name == PACKAGE or (name or "").startswith(PACKAGE + "."):
            target = name[len(PACKAGE) + 1:]
        elif name and self.path.parent.name == "bench" and name.split(".")[0] in {
                p.stem for p in self.path.parent.glob("*.py")}:   # bench scripts import their siblings by path
            target = "bench." + name
        else:
            return None
        return target if target in self.modules else None

    def add(self, target: str, line: int) -> None:
        if target != self.module:
            self.edges.setdefault(target, []).append(line)

    def visit(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = self.resolve(0, alias.name)
                    if target is not None:
                        self.add(target, node.lineno)
                        if alias.asname:
                            self.module_names[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                source = self.resolve(node.level, node.module)
                if source is None:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}" if source else alias.name
                    if sub in self.modules:          # `from . import module`
                        self.add(sub, node.lineno)
                        self.module_names[alias.asname or alias.name] = sub
                    else:
                        self.add(source, node.lineno)
                        if is_private(alias.name):
                            self.private.append((node.lineno, source, alias.name))
        for node in ast.walk(tree):                   # `module._name` on a module bound above
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in self.module_names and is_private(node.attr)):
                target = self.module_names[node.value.id]
                if target != self.module:
                    self.private.append((node.lineno, target, node.attr))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def label(module: str) -> str:
    return module or PACKAGE


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    modules = pack_files(root)
    scanned = {}
    for module, path in modules.items():
        imports = Imports(module, path, modules)
        imports.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        scanned[module] = imports
    graph = {m: set(i.edges) for m, i in scanned.items()}

    found = circles(graph)
    print(f"import circles: {len(found)}")
    for component in found:
        members = set(component)
        print("  " + " <-> ".join(label(m) for m in component))
        for module in component:
            for target in sorted(graph[module] & members):
                lines = ",".join(str(n) for n in sorted(set(scanned[module].edges[target])))
                print(f"    {label(module)} -> {label(target)} (line {lines})")

    crossings = sorted((str(scanned[m].path.relative_to(root)), line, target, name)
                       for m in scanned for line, target, name in scanned[m].private)
    print(f"private names crossing modules: {len(crossings)}")
    for path, line, target, name in crossings:
        print(f"  {path}:{line}: {label(target)}.{name}")

    long_files = []
    for module, path in modules.items():
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in SIZE_FOLDERS:
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > SIZE_LIMIT:
                long_files.append((lines, rel))
    print(f"files over {SIZE_LIMIT} lines: {sum(rel not in SIZE_EXEMPT for _, rel in long_files)}")
    for lines, rel in sorted(long_files, reverse=True):
        print(f"  {rel}: {lines}" + ("  (exempt: the settings catalogue)" if rel in SIZE_EXEMPT else ""))

    return 1 if found or crossings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
