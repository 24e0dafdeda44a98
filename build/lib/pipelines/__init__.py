"""Kubeflow pipelines of M2Rec, assembled from the components in `components/`."""
