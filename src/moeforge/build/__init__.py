"""Executing the plan: shard files, config translation, the assembled model directory and its lock."""
