import sys

from babydistill.workflows.cli import main

sys.exit(main())
