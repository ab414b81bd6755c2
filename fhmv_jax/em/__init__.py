"""ECM training: E-step statistics, M-step updates, the jitted EM step and the fitting loop."""

from .fit import FitResult, IterationInfo, StepInfo, em_step, fit_em, print_progress
from .init import init_model, kmeans
from .m_step import CovariancePrior, m_step
from .stats import SequenceStats, batch_e_step, e_step

__all__ = [
    "CovariancePrior",
    "FitResult",
    "IterationInfo",
    "SequenceStats",
    "StepInfo",
    "batch_e_step",
    "e_step",
    "em_step",
    "fit_em",
    "init_model",
    "kmeans",
    "m_step",
    "print_progress",
]
