"""``python -m models``: lists the command-line tools of the reference models."""

import sys

print(
    "usage: python -m models.train --help | python -m models.compress --help | "
    "python -m models.prior --help | python -m models.compare --help",
    file=sys.stderr,
)
sys.exit(2)
