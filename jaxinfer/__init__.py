"""jaxinfer: LLM inference on JAX and Pallas."""
