"""bench/ reuses the kernel tests' correctness rule (tests/kernel_check.py), the one place it is written."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
