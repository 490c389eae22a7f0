"""Training tasks the runner runs: each says what is specific (model, batches, loss, evaluation, export)."""
