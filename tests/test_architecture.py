"""The layering the code promises: no import cycle between top-level packages, the ML library
knows nothing of rules, the ClientApp reaches rules only through the registry and the hook
interface, and every rule is one registered module with its YAML."""

import ast
from pathlib import Path

import pytest

from experiment_schema import available_choices, compose_config
from strategies import RULES, SUPPORT_MODULES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("experiment_schema", "finetune", "strategies", "server_app", "client_app", "launch", "benchmarks")
#: The modules of ``strategies`` the ClientApp may import: the registry and the hook interface
#: (and the wire protocol both sides speak). Anything else would be a rule's internals.
CLIENT_APP_MAY_IMPORT = {
    "strategies",
    "strategies.client",
    "strategies.protocol",
    "strategies.registry",
    "strategies.traffic",
}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages it imports."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        targets = set()
        for path in (ROOT / package).rglob("*.py"):
            targets |= {name.split(".")[0] for name in imports_of(path)}
        graph[package] = (targets & set(PACKAGES)) - {package}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_top_level_packages():
    graph = package_graph()
    assert find_cycle(graph) is None, graph


def test_the_schema_is_below_everything_and_the_ml_library_knows_nothing_of_rules_or_entry_points():
    graph = package_graph()
    assert graph["experiment_schema"] == set()
    assert graph["finetune"] == {"experiment_schema"}
    assert "launch" not in package_graph()["benchmarks"]  # library functions live in the library


def test_client_app_reaches_rules_only_through_the_registry_and_the_hooks():
    for path in (ROOT / "client_app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("strategies"):
                assert node.module in CLIENT_APP_MAY_IMPORT, (path.name, node.module)
                names = {alias.name for alias in node.names}
                assert not names & set(RULES), (path.name, names & set(RULES))  # a rule module
            elif isinstance(node, ast.Import):
                reached = {a.name for a in node.names if a.name.startswith("strategies")}
                assert reached <= CLIENT_APP_MAY_IMPORT, (path.name, reached)


def test_every_rule_module_registers_one_rule_with_its_yaml():
    modules = {p.stem for p in (ROOT / "strategies").glob("*.py")} - SUPPORT_MODULES - {"__init__"}
    assert modules == set(RULES)  # one module per rule, named after it
    assert set(available_choices("method")) == set(RULES)  # one YAML per rule
    for name, rule in RULES.items():
        assert rule.strategy.__module__ == rule.client.__module__ or rule.client.__module__.startswith(
            "strategies."
        )
        cfg = compose_config({"method": name})
        assert isinstance(cfg.method, rule.config) and cfg.method.name == name


@pytest.mark.parametrize("name", sorted(RULES))
def test_a_rule_config_refuses_options_it_does_not_have(name):
    from experiment_schema import ConfigError

    with pytest.raises(ConfigError, match="not_an_option"):
        compose_config({"method": name}, ["method.not_an_option=1"])


def test_rules_and_configs_load_without_the_ml_stack():
    """The command line validates a config in well under a second: composing it must not pull in
    torch, transformers or peft (rules import those where a client trains, not at import); and the
    schema finds the rules itself (no one has to import ``strategies`` first)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from experiment_schema import compose_config\n"
        "compose_config({'method': 'hlora'}, ['method.client_ranks=[2,4]'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
