"""Model wrappers: the critic's causal LM with a scalar value head."""
from verl.models.value_model import CausalLMWithValueHead

__all__ = ["CausalLMWithValueHead"]
