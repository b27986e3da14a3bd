"""Judging a selection: downstream classifiers trained on the kept subset, evaluated on a clean test split."""

from clipsel_jax.evaluate.models import ResNet18, SmallCNN, make_model
from clipsel_jax.evaluate.train import TrainConfig, TrainResult, train_classifier

__all__ = ["ResNet18", "SmallCNN", "TrainConfig", "TrainResult", "make_model", "train_classifier"]
