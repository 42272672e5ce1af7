"""``python -m skipvlm.cli``: the ``skipvlm`` command."""

import sys

from skipvlm.cli import main

sys.exit(main())
