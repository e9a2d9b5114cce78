import importlib

import batchlab


def test_every_exported_name_imports():
    module = importlib.import_module("batchlab")
    assert module.__all__, "the public API must be curated"
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_all_has_no_duplicates_and_is_sorted():
    names = list(batchlab.__all__)
    assert len(set(names)) == len(names)
    assert names == sorted(names), "keep __all__ sorted (classes first: they sort before lowercase)"


def test_plan_refusal_is_catchable_from_the_top_level():
    """A user's `except batchlab.PlanRefused` needs no import from an internal module."""
    from batchlab.planner.measure import PlanRefused

    assert batchlab.PlanRefused is PlanRefused
    assert issubclass(batchlab.PlanRefused, batchlab.BatchlabError)
