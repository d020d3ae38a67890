"""kuberl's operator: RLJob API models, the pure planner, kopf handlers and the CLI."""

__version__ = "0.1.0"
