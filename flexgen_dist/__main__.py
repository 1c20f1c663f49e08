import sys

from flexgen_dist.cli import main

sys.exit(main())
