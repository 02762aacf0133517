import sys

from sfpp_ray.cli import main

sys.exit(main())
