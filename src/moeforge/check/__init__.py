"""Proving a build: smoke test, verification against a lock, reports and figures."""
