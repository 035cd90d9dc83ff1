"""``python -m elise.evaluate key=value ...`` (see ``elise/conf/evaluate.yaml`` or ``--help``)."""

from elise.cli import main

if __name__ == "__main__":
    main("evaluate")
