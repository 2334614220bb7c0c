"""The Hydra-aware entry points behind scripts/: train, evaluate, experts, serve."""
