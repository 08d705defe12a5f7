"""Every test of the plugin builds its own plugin manager, without the caller's DISTILLX_DISABLE_PLUGINS."""
from distillx.testing import fresh_plugins  # noqa: F401  (autouse)
