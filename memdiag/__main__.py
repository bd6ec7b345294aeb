import sys

from memdiag.cli import main

sys.exit(main())
