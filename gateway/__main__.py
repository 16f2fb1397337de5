"""`python -m gateway`: the same as the `batv-gateway` console script."""

import sys

from .cli import main

sys.exit(main())
