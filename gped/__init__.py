"""gped: online distillation of Bayesian posterior expectations (GPED, UAI 2020) as a distributed system."""

__version__ = "0.1.0"


def load_student(run_dir, name, device="cpu"):
    """Load a trained student from a run directory (see :mod:`gped.api`)."""
    from .api import load_student as _load

    return _load(run_dir, name, device)


def load_ensemble(run_dir):
    """The teacher ensemble's test (and OOD) statistics from a run directory (see :mod:`gped.api`)."""
    from .api import load_ensemble as _load

    return _load(run_dir)
