"""Router training: the routers (and the shared expert's gate) fitted on the experts' own texts, everything
else frozen, between the gates (their initialisation) and the routers shard."""
