"""``python train.py key=value ...`` (``--help`` lists the keys): see elise/conf/train.yaml."""

from elise.cli import main

if __name__ == "__main__":
    main("train")
