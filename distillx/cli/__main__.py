"""``python -m distillx.cli COMMAND ...``: the ``distillx`` command without the console script."""
import sys

from . import main

sys.exit(main())
