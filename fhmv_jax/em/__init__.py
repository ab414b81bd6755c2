"""Training: E-step statistics, M-step updates, the jitted EM step, the fitting loop, and gradient fitting."""

from .fit import fit_em
from .gradient import fit_gradient
from .init import init_model, kmeans
from .loop import FitResult, IterationInfo, StepInfo, em_step, print_progress, run_em
from .m_step import CovariancePrior, m_step
from .split_merge import SplitMerge, merge_split_candidate
from .stats import SequenceStats, batch_e_step, e_step

__all__ = [
    "CovariancePrior",
    "FitResult",
    "IterationInfo",
    "SequenceStats",
    "SplitMerge",
    "StepInfo",
    "batch_e_step",
    "e_step",
    "em_step",
    "fit_em",
    "fit_gradient",
    "init_model",
    "kmeans",
    "m_step",
    "merge_split_candidate",
    "print_progress",
    "run_em",
]
