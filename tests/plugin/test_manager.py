"""The plugin manager: built-ins, entry points, failures, DISTILLX_DISABLE_PLUGINS, laziness."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import distillx
import distillx.methods
from distillx.plugin.builtins import BUILTIN_PLUGINS
from distillx.plugin import PluginLoadWarning, get_plugin_manager, get_registries, hookimpl, reset_plugins

from . import fakes


def test_builtins_are_plugins_registered_first():
    pm = get_plugin_manager()
    assert [name for name, _ in pm.list_name_plugin()][:2] == ["distillx.methods", "distillx.transfer"]
    assert pm.get_plugin("distillx.methods") is BUILTIN_PLUGINS[0] and BUILTIN_PLUGINS[0].module == "distillx.methods"
    assert get_registries().methods.get("kd") is distillx.methods.KD
    assert get_registries().methods.provider("kd") == "distillx.methods"
    assert pm.plugin_info["distillx.methods"].source == "builtin"
    assert pm.failed == []


def test_manager_is_cached_until_reset():
    pm = get_plugin_manager()
    assert get_plugin_manager() is pm and get_registries() is pm.registries
    reset_plugins()
    assert get_plugin_manager() is not pm


def test_entry_point_plugin_is_discovered(install_fake):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-object", "2.0", {"obj": "fake_object_mod:plugin"}, {"fake_object_mod": fakes.OBJECT})
    regs = get_registries()
    assert regs.methods.provider("fake_mse") == "good"
    assert regs.kernels.provider("fake_kernel") == "good"  # non-historic hook, same attribution
    assert regs.transfers.provider("fake_copy") == "obj"
    info = get_plugin_manager().plugin_info["good"]
    assert (info.source, info.distribution, info.version, info.target) == (
        "entrypoint", "fake-good", "1.2.3", "fake_good_mod")
    assert type(distillx.method("fake_mse", weight=0.5)).__name__ == "FakeMSE"


def test_import_failure_is_reported_by_name_and_others_load(install_fake):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-broken", "0.1", {"broken": "fake_broken_mod"}, {"fake_broken_mod": fakes.IMPORT_ERROR})
    expected = r"'broken' from fake-broken 0\.1 failed to import.*not_a_real_module_xyz"
    with pytest.warns(PluginLoadWarning, match=expected):
        pm = get_plugin_manager()
    (failure,) = pm.failed
    assert (failure.name, failure.stage, failure.distribution) == ("broken", "import", "fake-broken")
    assert "ModuleNotFoundError" in failure.error
    assert {"kd", "fake_mse"} <= set(get_registries().methods)
    assert not pm.has_plugin("broken") and "broken" not in pm.plugin_info


@pytest.mark.parametrize("source, error", [(fakes.ARGPARSE_AT_IMPORT, "SystemExit: 2"),
                                           (fakes.EXIT_AT_IMPORT, "SystemExit: 3")], ids=["argparse", "sys.exit"])
def test_system_exit_at_import_is_contained(install_fake, capsys, source, error):
    """A plugin that exits while importing (argparse on distillx's command line, sys.exit) is one failed
    plugin, reported by name; the manager and the other plugins keep working."""
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-exit", "0.3", {"exiter": "fake_exit_mod"}, {"fake_exit_mod": source})
    with pytest.warns(PluginLoadWarning, match=rf"'exiter' from fake-exit 0\.3 failed to import.*{error}"):
        pm = get_plugin_manager()
    assert [(f.name, f.stage, f.error) for f in pm.failed] == [("exiter", "import", error)]
    assert {"kd", "fake_mse"} <= set(get_registries().methods)
    assert not pm.has_plugin("exiter")


def test_keyboard_interrupt_at_import_is_not_swallowed(install_fake):
    install_fake("fake-ctrl-c", "0.1", {"ctrl_c": "fake_ctrl_c_mod"}, {"fake_ctrl_c_mod": fakes.INTERRUPT_AT_IMPORT})
    with pytest.raises(KeyboardInterrupt):
        get_plugin_manager()


@pytest.mark.parametrize("hook", ["methods", "augmentations"])
def test_raising_register_hook_is_reported_and_withdrawn(install_fake, hook):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-raiser", "0.2", {"raiser": "fake_raiser_mod"},
                 {"fake_raiser_mod": fakes.RAISING.replace("{hook}", hook)})
    with pytest.warns(PluginLoadWarning, match=r"'raiser' .*failed to register.*RuntimeError: boom in register"):
        pm = get_plugin_manager()
    assert [(f.name, f.stage) for f in pm.failed] == [("raiser", "register")]
    regs = get_registries()
    assert "half_added" not in regs.methods and "half_flip" not in regs.augmentations
    assert not pm.has_plugin("raiser")
    assert {"kd", "fake_mse"} <= set(regs.methods)


def test_duplicate_name_is_an_error_naming_both_plugins(install_fake):
    install_fake("fake-dup", "1.0", {"dup": "fake_dup_mod"}, {"fake_dup_mod": fakes.DUPLICATE_KD})
    with pytest.warns(PluginLoadWarning, match="'dup'"):
        pm = get_plugin_manager()
    (failure,) = pm.failed
    assert "DuplicateNameError" in failure.error
    assert "'distillx.methods'" in failure.error and "'dup'" in failure.error
    assert get_registries().methods.provider("kd") == "distillx.methods"


def test_third_party_overrides_builtin_only_when_asked(install_fake):
    install_fake("fake-over", "1.0", {"over": "fake_over_mod"}, {"fake_over_mod": fakes.OVERRIDE_KD})
    entry = get_registries().methods.entry("kd")
    assert entry.obj.__name__ == "MyKD" and entry.provider == "over" and entry.overrides == "distillx.methods"
    assert type(distillx.method("kd")).__name__ == "MyKD"


@pytest.mark.parametrize("source, message", [
    (fakes.MISSPELT_HOOK, "unknown hook 'distillx_register_method'"),
    (fakes.WRONG_ARGUMENT, "distillx_register_methods.*methods"),
])
def test_invalid_hook_is_blamed_on_its_plugin(install_fake, source, message):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-typo", "1.0", {"typo": "fake_typo_mod"}, {"fake_typo_mod": source})
    with pytest.warns(PluginLoadWarning, match=f"(?s)'typo'.*failed to register.*{message}"):
        pm = get_plugin_manager()
    assert [f.name for f in pm.failed] == ["typo"]
    assert "fake_mse" in get_registries().methods
    pm.check_pending()  # the offender is gone, so the whole-manager check passes


def test_plugin_name_clash_between_distributions(install_fake):
    install_fake("fake-a", "1.0", {"same": "fake_a_mod"}, {"fake_a_mod": fakes.GOOD})
    install_fake("fake-b", "1.0", {"same": "fake_b_mod"}, {"fake_b_mod": fakes.OBJECT})
    with pytest.warns(PluginLoadWarning, match="'same'.*already taken by same"):
        pm = get_plugin_manager()
    (failure,) = pm.failed
    loaded = pm.plugin_info["same"].distribution
    assert {loaded, failure.distribution} == {"fake-a", "fake-b"}
    assert f"({loaded} 1.0)" in failure.error


@pytest.mark.parametrize("value", ["1", "true", "ALL"])
def test_disable_plugins_skips_entry_points_not_builtins(install_fake, monkeypatch, value):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    monkeypatch.setenv("DISTILLX_DISABLE_PLUGINS", value)
    pm = get_plugin_manager()
    assert "fake_mse" not in get_registries().methods and "kd" in get_registries().methods
    assert "fake_good_mod" not in sys.modules  # not even imported
    assert "good" in pm.disabled and not pm.has_plugin("good")


def test_disable_plugins_by_name(install_fake, monkeypatch):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-object", "2.0", {"obj": "fake_object_mod:plugin"}, {"fake_object_mod": fakes.OBJECT})
    monkeypatch.setenv("DISTILLX_DISABLE_PLUGINS", "other, good")
    pm = get_plugin_manager()
    assert "good" in pm.disabled and "fake_mse" not in get_registries().methods
    assert "fake_copy" in get_registries().transfers


def test_disable_plugins_zero_loads_everything(install_fake, monkeypatch):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    monkeypatch.setenv("DISTILLX_DISABLE_PLUGINS", "0")
    assert "fake_mse" in get_registries().methods


def test_runtime_registration_runs_registration_hooks():
    class Runtime:
        @hookimpl
        def distillx_register_methods(self, registry):
            registry.add("late", type("Late", (distillx.methods.Method,), {"name": "late"}))

        @hookimpl
        def distillx_register_augmentations(self, registry):
            registry.add("late_flip", lambda batch: batch)

    pm = get_plugin_manager()
    assert pm.register(Runtime(), name="runtime-plugin") == "runtime-plugin"
    regs = get_registries()
    assert regs.methods.provider("late") == "runtime-plugin"  # historic replay
    assert regs.augmentations.provider("late_flip") == "runtime-plugin"
    assert pm.plugin_info["runtime-plugin"].source == "runtime"


def test_runtime_registration_failure_raises_and_withdraws():
    class Broken:
        @hookimpl
        def distillx_register_kernels(self, registry):
            registry.add("k", lambda x, z: x)
            raise RuntimeError("kernel bug")

    pm = get_plugin_manager()
    with pytest.raises(RuntimeError, match="kernel bug"):
        pm.register(Broken(), name="broken-runtime")
    assert "k" not in get_registries().kernels and not pm.has_plugin("broken-runtime")


def test_training_events_reach_plugins():
    events = []

    class Logger:
        @hookimpl
        def distillx_on_fit_start(self, distiller):
            events.append(("start", distiller))

        @hookimpl
        def distillx_on_epoch_end(self, epoch, metrics):  # a subset of the arguments is fine
            events.append(("epoch", epoch, metrics["loss"]))

        @hookimpl
        def distillx_on_fit_end(self, distiller, metrics):
            events.append(("end", distiller, metrics["loss"]))

    hook = get_plugin_manager().hook
    get_plugin_manager().register(Logger())
    hook.distillx_on_fit_start(distiller="d")
    hook.distillx_on_epoch_end(distiller="d", epoch=0, metrics={"loss": 1.0})
    hook.distillx_on_fit_end(distiller="d", metrics={"loss": 0.5})
    assert events == [("start", "d"), ("epoch", 0, 1.0), ("end", "d", 0.5)]


def test_import_distillx_loads_no_plugin(install_fake):
    root = install_fake("fake-lazy", "1.0", {"lazy": "fake_lazy_mod"}, {"fake_lazy_mod": fakes.GOOD})
    repo = Path(distillx.__file__).resolve().parents[1]
    env = dict(os.environ)
    env.pop("DISTILLX_DISABLE_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(repo), env.get("PYTHONPATH")]))
    code = (
        "import sys, distillx, distillx.plugin.manager as m\n"
        "assert m._manager is None, 'import distillx built the plugin manager'\n"
        "assert 'fake_lazy_mod' not in sys.modules, 'import distillx imported an entry-point plugin'\n"
        "distillx.method('fake_mse')\n"
        "assert m._manager is not None and 'fake_lazy_mod' in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
