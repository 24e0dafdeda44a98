"""M2Rec's Feast definitions (`definitions.py`), installed with m2rec so a build finds them anywhere."""
