"""``python -m flexvision.benchmark``: see :mod:`flexvision.benchmark.cli`."""

from flexvision.benchmark.cli import run

if __name__ == "__main__":
    run()
