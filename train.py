"""python train.py trainer.devices=1 trainer.precision=bf16-mixed   |   python train.py -m optim.lr=1e-4,3e-4"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="elise/conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from elise.train import main as train_main  # imported here: --help and config errors stay fast

    return train_main(cfg)


if __name__ == "__main__":
    main()
