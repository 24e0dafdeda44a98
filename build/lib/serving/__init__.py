"""The BentoML service of M2Rec (a driver over m2rec.serving), installed with m2rec so it can be packaged."""
