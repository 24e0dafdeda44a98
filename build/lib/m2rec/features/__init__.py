"""Features through Feast: offline tables from the canonical data, the feature repository, and a small client."""
