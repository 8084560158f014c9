"""megatron-core objects of one rank: parallel state, model, DDP, optimizer, state shards."""
