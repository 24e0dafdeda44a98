"""Kubeflow components of the M2Rec pipeline: one per stage, thin wrappers over `m2rec.stages`."""
