"""Model registry in MLflow: one run per trained model, registered versions and the champion/challenger aliases."""
