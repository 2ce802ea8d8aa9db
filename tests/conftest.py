"""Make the tests' own vfio-user client importable and log the server at DEBUG."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
logging.getLogger("vfio_ep").setLevel(logging.DEBUG)
