"""`python -m jbert_ray.cli`: the `jbert` command, for where the console script is not on the PATH."""

import sys

from jbert_ray.cli import main

sys.exit(main())
