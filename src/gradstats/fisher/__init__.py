"""Diagonal Fisher information from exact per-unit gradients, grouped, with its consumers.

* :class:`FisherCollector` — empirical / Monte-Carlo / exact Fisher (and the mistaken
  ``batch_grad_sq``, labelled) for classification, Gaussian regression, causal language models
  or a user loss; per-sample or per-token units; exact per-unit squares inside backward hooks.
  Its options are one frozen, validated :class:`FisherSpec`.
* :class:`FisherResult` — the statistics of a collection and all their reads (Fisher, signal,
  variance, standard errors, groups); :func:`load` reads a saved file as one, :func:`resume`
  keeps collecting from one.
* Groups from an architecture registry (:func:`register_architecture`): heads, KV heads, FFN
  neurons, channels, tokens; ``group_fisher(kind="trace" | "mask")``.
* Consumers: importance ranking and pruning masks (:func:`apply_masks` applies them to the
  model through hooks; :func:`rescale_masks` refits the kept mask values by least squares on
  layer outputs, as Kwon et al. 2022), EWC penalty, Fisher merging, task overlap.
"""

from gradstats.fisher._architectures import build_groups
from gradstats.fisher._collector import FisherCollector, resume
from gradstats.fisher._consumers import (
    ewc_penalty,
    fisher_merge,
    gradient_conflicts,
    importance_ranking,
    pruning_masks,
    task_overlap,
)
from gradstats.fisher._groups import (
    GroupFamily,
    GroupMap,
    Member,
    register_architecture,
    registered_architectures,
)
from gradstats.fisher._likelihoods import (
    CausalLMLikelihood,
    ClassificationLikelihood,
    Likelihood,
    RegressionLikelihood,
)
from gradstats.fisher._masking import MaskHandle, apply_masks
from gradstats.fisher._rescale import rescale_masks
from gradstats.fisher._result import FisherResult, load
from gradstats.fisher._spec import FisherSpec

__all__ = [
    "CausalLMLikelihood",
    "ClassificationLikelihood",
    "FisherCollector",
    "FisherResult",
    "FisherSpec",
    "GroupFamily",
    "GroupMap",
    "Likelihood",
    "MaskHandle",
    "Member",
    "RegressionLikelihood",
    "apply_masks",
    "build_groups",
    "ewc_penalty",
    "fisher_merge",
    "gradient_conflicts",
    "importance_ranking",
    "load",
    "pruning_masks",
    "register_architecture",
    "registered_architectures",
    "rescale_masks",
    "resume",
    "task_overlap",
]
