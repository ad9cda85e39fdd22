"""Train a model with Soft Filter Pruning, shrink it, measure it and export it.

The checkout's entry point of `keras-sfp-train` (`keras_sfp.cli.train`; the
work is `keras_sfp.training.run.train_and_evaluate`):

    python train.py --train_limit=512 --test_limit=256 --epochs=2  # smoke run
    python train.py --helpfull                                     # every flag
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from keras_sfp.cli.train import run_main  # noqa: E402
from keras_sfp.training.config import TrainConfig  # noqa: E402
from keras_sfp.training.run import train_and_evaluate  # noqa: E402

__all__ = ["TrainConfig", "run_main", "train_and_evaluate"]

if __name__ == "__main__":
    run_main()
