"""Router matrices: gate modes and the layer-streamed forward pass they run on the base model."""
