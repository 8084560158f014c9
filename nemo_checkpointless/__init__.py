"""nemo-checkpointless: NeMo / Megatron-core pretraining that survives failures without a storage restart."""
