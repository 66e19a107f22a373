"""Check the import rules of ARCHITECTURE.md: no import cycle among visrep's modules, no import against
the layer table, and no file but the distribution module that reads DeepSpeed's ``ds_*`` attributes or
imports ``deepspeed``. Prints each violation and exits 1; silent and 0 when the tree is clean.

    python tools/check_imports.py [REPO_ROOT]
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

# package -> layer; a module may import lower layers (its own for 0-2), never higher; methods (3) import no
# other method but the allowed pairs, and launch (4) imports no method: it dispatches on export kinds
LAYERS = {"visrep.errors": 0, "visrep.checks": 0, "visrep": 0,
          "visrep.zoo": 1, "visrep.data": 1,
          "visrep.engine": 2,
          "visrep.distill": 3, "visrep.ssl": 3, "visrep.clip": 3, "visrep.transfer": 3,
          "visrep.launch": 4, "visrep.cli": 4, "visrep.report": 4}
ALLOWED_LATERAL = {("visrep.clip", "visrep.distill")}  # CLIP-to-CLIP distillation uses distill's KD loss
ZOO_OWN_ONLY = "visrep.zoo"  # the zoo imports nothing of ours at all
DISTRIBUTION = "visrep/engine/distributed.py"
DS_ATTR = re.compile(r"\bds_\w+|\bimport deepspeed\b|\bfrom deepspeed\b")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in sorted((root / "visrep").rglob("*.py")):
        name = ".".join(p.relative_to(root).with_suffix("").parts)
        out[name[:-9] if name.endswith(".__init__") else name] = p
    return out


def package(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def imports(name: str, path: Path, mods: dict) -> list[tuple[int, str]]:
    """(line, imported visrep module) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            cands = [f"{mod}.{a.name}" for a in node.names] + [mod]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:
            if c in mods and c != name:
                out.append((node.lineno, c))
                break
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check(root: Path) -> list[str]:
    mods = modules(root)
    problems, graph = [], {}
    for name, path in mods.items():
        rel = path.relative_to(root).as_posix()
        src_pkg = package(name)
        edges = imports(name, path, mods)
        # a package's __init__ re-exporting its own modules is not a dependency between modules
        graph[name] = {t for _, t in edges if not t.startswith(name + ".")}
        for line, target in edges:
            dst_pkg = package(target)
            if dst_pkg == src_pkg:
                continue
            if src_pkg == ZOO_OWN_ONLY:
                problems.append(f"{rel}:{line}: the zoo imports nothing of ours, but imports {target}")
                continue
            a, b = LAYERS.get(src_pkg), LAYERS.get(dst_pkg)
            if a is None or b is None:
                continue
            if b > a or (b == a and a == 3 and (src_pkg, dst_pkg) not in ALLOWED_LATERAL) or (a == 4 and b == 3):
                problems.append(f"{rel}:{line}: {src_pkg} (layer {a}) imports {target} (layer {b})")
        if rel != DISTRIBUTION:
            for i, text in enumerate(path.read_text().splitlines(), 1):
                code = text.split("#", 1)[0]
                if DS_ATTR.search(code):
                    problems.append(f"{rel}:{i}: DeepSpeed internals outside {DISTRIBUTION}: {text.strip()}")
    for comp in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(comp))
    recipes = sorted((root / "recipes").glob("*.py"))
    for path in recipes:
        for i, text in enumerate(path.read_text().splitlines(), 1):
            if DS_ATTR.search(text.split("#", 1)[0]):
                problems.append(f"{path.relative_to(root).as_posix()}:{i}: DeepSpeed internals in a recipe")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    problems = check(root)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
