"""Data layer: readers for common formats, the synthetic default, k-core filtering and the leave-one-out split."""
