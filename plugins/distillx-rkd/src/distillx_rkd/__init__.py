"""distillx-rkd: adds Relational Knowledge Distillation (``rkd``) to distillx.

This module is the plugin object named by the ``distillx`` entry point in pyproject.toml
(``rkd = "distillx_rkd"``); distillx imports it when it builds its plugin manager (never at
``import distillx``) and calls the hook below. Nothing else registers the method.

Paper: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019,
arXiv:1904.05068.
"""
from __future__ import annotations

from distillx.plugin import hookimpl

from .losses import angle_potential, distance_potential, rkd_angle_loss, rkd_distance_loss, rkd_loss
from .method import RKD

__version__ = "0.1.0"


@hookimpl
def distillx_register_methods(registry):
    registry.add(RKD.name, RKD)


__all__ = ["RKD", "rkd_loss", "rkd_distance_loss", "rkd_angle_loss", "distance_potential", "angle_potential",
           "distillx_register_methods"]
