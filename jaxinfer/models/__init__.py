"""Functional Flax models of the Llama family."""
