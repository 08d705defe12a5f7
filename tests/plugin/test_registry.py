"""Registry: lookup, validation, provider attribution, duplicates, override and rollback."""
from __future__ import annotations

import pytest

from distillx.plugin import DuplicateNameError, Registry, UnknownNameError
from distillx.plugin.registry import DIRECT, Registries


def f():
    pass


def g():
    pass


def test_add_and_lookup():
    r = Registry("kernel")
    with r.providing("alpha"):
        assert r.add("rbf", f) is f
        r.add("linear", g)
    assert r.get("rbf") is f
    assert "rbf" in r and "poly" not in r and [] not in r
    assert r.names() == ["linear", "rbf"] and list(r) == ["linear", "rbf"] and len(r) == 2
    assert r.provider("rbf") == "alpha"
    assert r.entry("linear").overrides is None


def test_add_outside_a_plugin_is_attributed_to_a_direct_call():
    r = Registry("kernel")
    r.add("rbf", f)
    assert r.provider("rbf") == DIRECT


def test_duplicate_names_both_providers():
    r = Registry("method")
    with r.providing("first-plugin"):
        r.add("kd", f)
    with r.providing("second-plugin"), pytest.raises(DuplicateNameError) as err:
        r.add("kd", g)
    assert "'first-plugin'" in str(err.value) and "'second-plugin'" in str(err.value)
    assert "override=True" in str(err.value)
    assert r.get("kd") is f and r.provider("kd") == "first-plugin"


def test_duplicate_within_one_plugin_is_refused_too():
    r = Registry("method")
    with r.providing("p"):
        r.add("kd", f)
        with pytest.raises(DuplicateNameError, match="'p'"):
            r.add("kd", g)


def test_override_replaces_and_records_what_it_replaced():
    r = Registry("method")
    with r.providing("builtin"):
        r.add("kd", f)
    with r.providing("third-party"):
        r.add("kd", g, override=True)
    assert r.get("kd") is g
    assert r.provider("kd") == "third-party" and r.entry("kd").overrides == "builtin"


def test_unknown_name_lists_registered_names():
    r = Registry("method")
    r.add("kd", f)
    r.add("at", g)
    with pytest.raises(UnknownNameError) as err:
        r.get("kdd")
    assert str(err.value) == "unknown method 'kdd'; registered methods: 'at', 'kd'"
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(UnknownNameError, match="registered kernels: none"):
        Registry("kernel").provider("rbf")


@pytest.mark.parametrize("name, error", [("", ValueError), (" kd", ValueError), ("kd\n", ValueError),
                                         (None, TypeError), (3, TypeError)])
def test_names_must_be_non_empty_strings(name, error):
    r = Registry("method")
    with pytest.raises(error, match="method name"):
        r.add(name, f)
    assert len(r) == 0


def test_none_object_and_check_hook_are_enforced():
    def only_callables(name, obj):
        if not callable(obj):
            raise TypeError(f"{name} is not callable")

    r = Registry("kernel", only_callables)
    with pytest.raises(TypeError, match="must not be None"):
        r.add("a", None)
    with pytest.raises(TypeError, match="b is not callable"):
        r.add("b", 42)
    assert len(r) == 0


def test_failed_provider_block_is_undone():
    r = Registry("method")
    with r.providing("builtin"):
        r.add("kd", f)
    with pytest.raises(RuntimeError), r.providing("broken"):
        r.add("new", f)
        r.add("kd", g, override=True)
        raise RuntimeError("plugin bug")
    assert r.names() == ["kd"] and r.get("kd") is f and r.provider("kd") == "builtin"
    r.add("after", g)  # the provider is restored after the block
    assert r.provider("after") == DIRECT


def test_nested_success_is_undone_when_the_outer_block_fails():
    r = Registry("method")
    with pytest.raises(RuntimeError), r.providing("outer"):
        r.add("a", f)
        with r.providing("inner"):
            r.add("b", g)
        assert r.provider("b") == "inner"
        raise RuntimeError
    assert len(r) == 0


def test_registries_rollback_spans_all_kinds():
    regs = Registries()
    assert [kind for kind, _ in regs] == ["methods", "transfers", "kernels", "augmentations", "loggers"]
    with pytest.raises(RuntimeError), regs.providing("p"):
        regs.kernels.add("rbf", f)
        regs.augmentations.add("flip", g)
        regs.loggers.add("wandb", f)
        raise RuntimeError
    assert len(regs.kernels) == 0 and len(regs.augmentations) == 0 and len(regs.loggers) == 0
    with pytest.raises(TypeError, match="must be callable"):
        regs.transfers.add("copy", "not a function")
