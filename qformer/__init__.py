"""The qbridge model package. Importing it loads nothing heavy (no torch)."""

from pathlib import Path

# The embedded demo model (`qbridge demo build --install`): the default of `qbridge caption` and `qbridge serve`.
DEMO_BUNDLE = Path(__file__).resolve().parent / "demo" / "bundle"
