"""M2Rec: multi-scale Mamba + Fourier + LLM-text sequential recommender."""
__version__ = "0.1.0"
