"""Training the equilibrium transformer (and its backprop baseline) on a character corpus.

:class:`TrainConfig` holds every option (the ``gradstats eqprop train`` command line is built
from it); :func:`train` runs or resumes a run in its folder (``checkpoint.pt``,
``metrics.jsonl``, ``curves.png``); :func:`load_checkpoint` / :func:`build_from_checkpoint`
read a run back. Under ``torchrun --nproc_per_node N --no-python gradstats eqprop train ...``
(or any initialised process group) training is data-parallel, ``batch_size`` per rank.
"""

from gradstats.eqprop.train._checkpoint import build_from_checkpoint, load_checkpoint
from gradstats.eqprop.train._config import EP_METHODS, TRAIN_METHODS, TrainConfig
from gradstats.eqprop.train._evaluation import evaluate
from gradstats.eqprop.train._loop import TrainingDiverged, TrainResult, train
from gradstats.eqprop.train._metrics import plot_curves, read_metrics

__all__ = [
    "EP_METHODS",
    "TRAIN_METHODS",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_from_checkpoint",
    "evaluate",
    "load_checkpoint",
    "plot_curves",
    "read_metrics",
    "train",
]
