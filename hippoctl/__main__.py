"""`python -m hippoctl`: the same as the `hippoctl` command."""

import sys

from hippoctl.main import main

sys.exit(main())
