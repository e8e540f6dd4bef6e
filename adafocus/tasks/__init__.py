"""The tasks the entry points run, each a plain function of the composed Hydra config that returns its
results: ``train`` (train.py), ``evaluate`` (evaluate.py), ``predict`` (python -m adafocus.tasks.predict),
``early_exit`` (early_exit.py). What they share is in :mod:`.common` and :mod:`.checkpoint`."""

from adafocus.tasks.early_exit import early_exit
from adafocus.tasks.evaluate import evaluate
from adafocus.tasks.predict import predict
from adafocus.tasks.train import train

__all__ = ["early_exit", "evaluate", "predict", "train"]
