"""The event log: every interaction the service accepts, durable before the reply and applied once, read back by
serving (events since a feature build) and by retraining (every event up to a run's cutoff)."""
