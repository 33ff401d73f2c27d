"""moeforge: build Mixture-of-Experts checkpoints from dense decoder-only checkpoints."""

__version__ = "0.1.0"
