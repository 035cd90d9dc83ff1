"""``python synthesize.py ckpt=path/to/last.ckpt text="Hello there."`` (``--help`` lists the keys).

Any text or file name is taken as typed (see elise.cli). A user error prints one line on stderr and
exits with code 2.
"""

from elise.cli import main

if __name__ == "__main__":
    main("synthesize")
