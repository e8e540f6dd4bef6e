"""AdaFocusV2+ early exit (SPEC §5); options in conf/early_exit.yaml.

python early_exit.py [dataset=... data_dir=DIR] ckpt_path=FILE
python early_exit.py calib_predictions=FILE eval_predictions=FILE [criterion=max_logit]
"""

import hydra
from omegaconf import DictConfig

from adafocus.tasks import early_exit
from adafocus.tasks.common import user_errors


@hydra.main(config_path="conf", config_name="early_exit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        early_exit(cfg)


if __name__ == "__main__":
    main()
