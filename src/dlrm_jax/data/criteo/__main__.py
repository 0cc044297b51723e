"""`python -m dlrm_jax.data.criteo`: the command line of `cli.main`."""

import sys

from dlrm_jax.data.criteo.cli import main

if __name__ == "__main__":
  sys.exit(main())
