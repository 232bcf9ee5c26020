"""flow: turn a written spec into a reviewed commit on a new git branch."""

__version__ = "0.1.0"
