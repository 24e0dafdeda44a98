"""Model components of M2Rec (selective scan, Mamba block, ...)."""
