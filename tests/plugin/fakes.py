"""Sources of the fake plugin modules the tests install with the ``install_fake`` fixture."""

GOOD = '''
from distillx.methods import Method
from distillx.plugin import hookimpl


class FakeMSE(Method):
    name = "fake_mse"

    def loss(self, student, teacher, batch=None):
        return ((student["logits"] - teacher["logits"]) ** 2).mean()


@hookimpl
def distillx_register_methods(registry):
    registry.add(FakeMSE.name, FakeMSE)


@hookimpl
def distillx_register_kernels(registry):
    registry.add("fake_kernel", lambda x, z: x @ z.T)
'''

# A plugin object (not a module) named by "module:attr".
OBJECT = '''
from distillx.plugin import hookimpl


class Plugin:
    @hookimpl
    def distillx_register_weight_transfers(self, registry):
        registry.add("fake_copy", lambda teacher, student, **options: None)


plugin = Plugin()
'''

IMPORT_ERROR = "import not_a_real_module_xyz\n"

# Parses the command line at import, as a script would: argparse exits (SystemExit 2) on distillx's arguments.
ARGPARSE_AT_IMPORT = '''
import argparse
parser = argparse.ArgumentParser(prog="fake-argparse")
parser.add_argument("--only-mine", required=True)
parser.parse_args(["--not-an-option"])
'''

# Exits at import with a status, and one that presses Ctrl-C (the user's interrupt must stop the load).
EXIT_AT_IMPORT = "import sys\nsys.exit(3)\n"
INTERRUPT_AT_IMPORT = "raise KeyboardInterrupt\n"

# Adds a method, then fails: the method must be withdrawn. {hook} picks the hook that raises.
RAISING = '''
from distillx.methods import Method
from distillx.plugin import hookimpl


class HalfAdded(Method):
    name = "half_added"


@hookimpl
def distillx_register_methods(registry):
    registry.add(HalfAdded.name, HalfAdded)
    if "{hook}" == "methods":
        raise RuntimeError("boom in register")


@hookimpl
def distillx_register_augmentations(registry):
    registry.add("half_flip", lambda batch: batch)
    if "{hook}" == "augmentations":
        raise RuntimeError("boom in register")
'''

DUPLICATE_KD = '''
from distillx.methods import KD
from distillx.plugin import hookimpl


@hookimpl
def distillx_register_methods(registry):
    registry.add("kd", KD)
'''

OVERRIDE_KD = '''
from distillx.methods import KD
from distillx.plugin import hookimpl


class MyKD(KD):
    """A replacement for the built-in kd."""


@hookimpl
def distillx_register_methods(registry):
    registry.add("kd", MyKD, override=True)
'''

MISSPELT_HOOK = '''
from distillx.plugin import hookimpl


@hookimpl
def distillx_register_method(registry):  # missing "s"
    pass
'''

WRONG_ARGUMENT = '''
from distillx.plugin import hookimpl


@hookimpl
def distillx_register_methods(methods):  # the argument is called "registry"
    pass
'''
