"""A compact veRL-style RL engine: DataProto, PPO/GRPO algorithms, workers, rollout backends, trainer."""
__version__ = "0.1.0"
