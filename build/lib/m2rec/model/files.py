"""The files of a model folder (what `m2rec train --output DIR` writes): the one place their names are kept.
Stages, inference, the registry and serving import them from here."""

WEIGHTS_FILE = "model.safetensors"  # safetensors weights (no pickle)
CONFIG_FILE = "config.json"  # model type, sizes, ModelParams, dataset version, text model, train params
ITEMS_FILE = "items.parquet"  # the catalog: item_id <-> item_idx, titles, training popularity
METRICS_FILE = "metrics.json"  # validation and test metrics of the best epoch
HISTORY_FILE = "history.json"  # one record per epoch: loss, validation metrics, seconds
CHECKPOINT_FILE = "checkpoint.pt"  # the trainer's resumable state (weights_only load); not part of the model

MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE, METRICS_FILE, HISTORY_FILE)  # a finished model folder
SERVED_FILES = (WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE, METRICS_FILE)  # what a service needs
