"""``python -m backprop.bench``: see :func:`backprop.bench.main`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
