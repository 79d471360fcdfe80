"""`python -m trust_fast.cli` (and `torchrun ... -m trust_fast.cli`): the `trust-fast` command."""
import sys

from . import main

sys.exit(main())
