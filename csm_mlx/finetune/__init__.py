"""Fine-tuning CSM on a user's clips: data preparation, batches, the training loop, adapters."""
