"""`python -m gateway`: the same as the `batv-gateway` console script."""

import sys

from .cli.main import main

sys.exit(main())
