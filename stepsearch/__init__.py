"""StepSearch: search agents trained with StePPO (arXiv 2505.15107)."""
__version__ = "0.1.0"
