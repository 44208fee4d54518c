"""``torchrun -m metapo_fast.train`` (or ``python -m metapo_fast.train``): see :mod:`.cli`."""
import sys

from .cli import main

sys.exit(main())
