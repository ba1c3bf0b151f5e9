"""The Flower internals the node runtime patches exist, with the parameters it passes: a Flower
upgrade that moves one fails here in seconds, naming it."""

import pytest

from launch.flower_contract import EXPECTED, Expected, broken, require


def test_every_flower_symbol_the_runtime_patches_exists_with_its_parameters():
    assert broken() == []
    require()  # raises nothing


def test_a_moved_or_changed_symbol_is_named_with_why_it_matters(monkeypatch):
    task = EXPECTED[0].module
    gone = Expected(task, "no_such_function", (), "the warm worker calls it")
    renamed = Expected(task, "run_clientapp", ("no_such_parameter",), "the warm worker calls it")
    missing = Expected("flwr.no_such_module", "x", (), "patched")
    assert gone.problem() == f"{task}.no_such_function: gone; the warm worker calls it"
    assert "run_clientapp: takes no no_such_parameter any more" in str(renamed.problem())
    assert "flwr.no_such_module.x: the module does not import" in str(missing.problem())
    monkeypatch.setattr("launch.flower_contract.EXPECTED", (gone,))
    with pytest.raises(RuntimeError, match=r"(?s)Flower .* lacks .*no_such_function: gone"):
        require()
