"""zeroplane: a control plane for training and serving LLMs on Ray with DeepSpeed ZeRO."""

__version__ = "0.1.0"
