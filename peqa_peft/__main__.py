"""``python -m peqa_peft train|eval ...``"""

import sys

from .cli import main

sys.exit(main())
