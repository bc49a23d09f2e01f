"""Shared test set-up: tools/ is importable (tools run as scripts and import `common` top-level)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "tools"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
