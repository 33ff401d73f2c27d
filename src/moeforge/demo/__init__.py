"""The demo's tiny models and their training."""
