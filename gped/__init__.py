"""gped: online distillation of Bayesian posterior expectations (GPED, UAI 2020) as a distributed system."""

__version__ = "0.1.0"
