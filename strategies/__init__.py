"""Aggregation rules. Each rule is one module of this package holding its pure tensor function(s),
its server Strategy, its client half and its config, and registering them as one
:class:`~strategies.registry.Rule`. Importing the package imports (and so registers) every rule
module; adding a rule is adding a module (and its YAML in ``conf/method/``)."""

from __future__ import annotations

import importlib
import pkgutil

from strategies.registry import RULES, Family, Rule, get_rule

#: Modules of this package that hold no rule.
SUPPORT_MODULES = frozenset(
    [
        "averaging",
        "bounds",
        "client",
        "engine",
        "lowrank",
        "merging",
        "nodes",
        "protocol",
        "ranks",
        "registry",
        "replies",
        "robust",
        "rule",
        "screening",
        "server_optim",
        "traffic",
        "validation",
    ]
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["RULES", "Family", "Rule", "get_rule"]
