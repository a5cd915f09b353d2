"""``python -m peqa_peft train|eval ...``"""

import sys

from .workflows.cli import main

sys.exit(main())
