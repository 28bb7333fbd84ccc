"""``python -m zfserve.cli`` (what ``torchrun -m zfserve.cli train ...`` runs on every rank)."""

import sys

from . import main

sys.exit(main())
