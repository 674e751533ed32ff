"""`python -m xllm ...` is the `xllm` command."""

import sys

from xllm.cli import main

sys.exit(main())
