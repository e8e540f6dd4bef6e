"""Train AdaFocusV2: `python train.py [dataset=...] [backbone=...] [patch=...] [experiment=...]`."""

import hydra
from omegaconf import DictConfig

from adafocus.tasks import train
from adafocus.tasks.common import user_errors


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return train(cfg).get(f"best_{cfg.dataset.metric}")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
