"""Code that runs on the Ray cluster (imports ray.train, deepspeed, torch)."""
