"""``python main.py``: starts the proxy, as the original implementation did."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from first_hop_proxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
