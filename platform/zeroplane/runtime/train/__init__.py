"""Ray Train + DeepSpeed ZeRO training runtime."""
