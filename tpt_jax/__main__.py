import sys

from tpt_jax.cli import main

sys.exit(main())
