"""Where bytes come from and go: model references and fetching, safetensors headers, atomic writes, hashes."""
