"""Evaluate a checkpoint: `python evaluate.py ckpt_path=FILE [policy=learned|random|center]`."""

import hydra
from omegaconf import DictConfig

from adafocus.tasks import evaluate
from adafocus.tasks.common import user_errors


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
