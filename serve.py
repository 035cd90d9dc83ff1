"""``python serve.py ckpt=path/to/last.ckpt`` (``--help`` lists the keys): the OpenAI-compatible speech
server of ``elise.serve`` (see README "Serving"). A user error prints one line on stderr and exits 2."""

from elise.cli import main

if __name__ == "__main__":
    main("serve")
