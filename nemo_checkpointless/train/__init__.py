"""The lean megatron-core training loop, a front-end of the recovery core."""
