"""The pipeline's stages as plain functions; the CLI, DVC and Kubeflow components all call these."""
