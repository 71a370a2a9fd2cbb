"""The sample app is imported as its tests' neighbour (``import likes``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
