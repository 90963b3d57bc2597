"""Training for the inference stack: ``jaxinfer train-draft`` (EAGLE draft heads, :mod:`.train_draft`)."""
