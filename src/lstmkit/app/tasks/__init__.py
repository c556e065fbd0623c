"""Built-in benchmark tasks for lstmkit (data generators, encoders and metrics)."""
