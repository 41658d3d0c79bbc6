"""`python -m pyvlm`: command-line entry point."""

import sys

from pyvlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
