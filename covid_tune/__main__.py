import sys

from covid_tune.cli import main

sys.exit(main())
