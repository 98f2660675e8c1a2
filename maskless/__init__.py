"""The maskless app: the `maskless` CLI, the run configuration and the pipeline that wires the stages."""
__version__ = "0.1.0"
