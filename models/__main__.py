import sys

print("usage: python -m models.train --help | python -m models.compress --help", file=sys.stderr)
sys.exit(2)
