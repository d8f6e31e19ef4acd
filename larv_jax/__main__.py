import sys

from larv_jax.cli import main

sys.exit(main())
