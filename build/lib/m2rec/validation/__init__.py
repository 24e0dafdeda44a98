"""Data validation: Great Expectations suites over the canonical tables, and a readable report of the run."""
