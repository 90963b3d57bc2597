"""Generated gRPC stubs for ``jaxinfer.proto`` (regenerate with ``regenerate.sh``)."""
