"""End-to-end workflows: training, evaluation, the CLI, datasets, model loading and the model zoo."""
