import sys

from orchestrator.app.cli import main

sys.exit(main())
