"""The layers hold by test, not by convention: `worker/` imports llama_cpp and never starlette,
`pool/` imports neither, `http/` imports starlette and never llama_cpp; no import cycle anywhere
in `edison/`; and at run time the web process never loads libllama while a worker never loads
starlette.

The static rules walk the AST of every module (imports inside functions included: a lazy
import is still an import). Reachability follows module-level imports only, since those are
what importing a module executes (a function-level import runs in whatever process calls it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO, Service

PACKAGE = REPO / "edison"

# layer -> top-level packages it must never import, directly or through edison modules.
FORBIDDEN = {
    "edison.worker": {"starlette", "uvicorn", "anyio", "prometheus_client", "edison.http", "edison.pool"},
    "edison.pool": {"starlette", "uvicorn", "llama_cpp", "edison.http"},
    "edison.http": {"llama_cpp", "edison.worker.engine", "edison.worker.sequence"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` blocks never run
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports(path, top_level_only) if m in modules or not m.startswith("edison")}
    return edges


def matches(module: str, banned: str) -> bool:
    return module == banned or module.startswith(banned + ".")


def test_each_layer_imports_only_what_it_may() -> None:
    edges = graph(top_level_only=False)
    broken = [
        f"{module} imports {target}"
        for module, targets in edges.items()
        for layer, banned in FORBIDDEN.items()
        if matches(module, layer)
        for target in targets
        for b in banned
        if matches(target, b)
    ]
    assert not broken, broken


def test_nothing_a_layer_loads_at_import_time_reaches_a_forbidden_package() -> None:
    edges = graph(top_level_only=True)

    def closure(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            for target in edges.get(module, ()):
                parents = [target] + [target.rsplit(".", i)[0] for i in range(1, target.count(".") + 1)]
                for t in parents:  # importing a.b.c runs a and a.b too
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
        return seen

    for layer, banned in FORBIDDEN.items():
        for module in [m for m in edges if matches(m, layer)]:
            bad = sorted(t for t in closure(module) for b in banned if matches(t, b) and not matches(module, b))
            assert not bad, f"importing {module} loads {bad}"


def test_no_import_cycle_in_the_package() -> None:
    edges = {m: {t for t in ts if t.startswith("edison")} for m, ts in graph(top_level_only=True).items()}
    edges = {m: {t for t in ts if t in edges} for m, ts in edges.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target] if target in stack else [module, target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


@pytest.mark.timeout(120)
def test_at_run_time_the_worker_has_no_http_stack_and_the_web_process_no_libllama(service: Service) -> None:
    details = service.health(verbose=True)["worker_details"]
    assert details, "no worker reported"
    for worker in details:
        packages = set(worker["packages"])
        assert "llama_cpp" in packages  # the probe works: the worker did load the engine
        assert not packages & {"starlette", "uvicorn", "anyio", "prometheus_client"}, sorted(packages)
    assert service.proc is not None
    maps = Path(f"/proc/{service.proc.pid}/maps").read_text()
    assert "libllama" not in maps and "libggml" not in maps
