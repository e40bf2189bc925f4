"""``python -m qwen_vl_distributed ...`` (also what torchrun launches on each machine)."""

import sys

from .cli.main import main

sys.exit(main())
