"""``python -m llm_server`` runs the daemon, like the ``llm-server`` script."""

import sys

from .cli import main

sys.exit(main())
