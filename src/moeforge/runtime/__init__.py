"""The shared engine: layer-streamed forward passes, key conversion, devices, memory budget, generation."""
