"""visrep: learning visual representations and carrying them to new tasks."""

__version__ = "0.1.0"
