"""``python -m qtemperate`` (and ``torchrun ... -m qtemperate run RECIPE``): the command line."""

import sys

from qtemperate.cli import main

if __name__ == "__main__":
    sys.exit(main())
