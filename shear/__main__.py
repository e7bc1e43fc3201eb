"""``python -m shear ...`` and ``accelerate launch -m shear ...``."""
import sys

from shear.cli import main

sys.exit(main())
