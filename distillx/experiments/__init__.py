"""Reproducible experiments built on distillx's public pieces (not part of the library API).

Each experiment is a module runnable with ``python -m distillx.experiments.<name>`` and exposing
``main(argv) -> int`` and ``run(...) -> dict``:

- :mod:`distillx.experiments.transfer_table`: student test accuracy at initialisation and after a
  short training, for random init and each weight transfer, with and without ``kd``, on the
  digits demo.
- :mod:`distillx.experiments.balance_table`: fixed loss weights against ``balance="auto"`` on a
  real sentence encoder (:mod:`distillx.experiments.encoder`) and on digits.
- :mod:`distillx.experiments.head_search`: the same head distilled on the teacher's features at
  several cuts, deployed with the teacher's trunk: params, latency and accuracy per cut
  (``distillx demo --mode head``).
"""
