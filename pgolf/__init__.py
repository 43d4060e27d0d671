"""pgolf: a staged pipeline for OpenAI's Parameter Golf challenge.

Importing pgolf is cheap and never touches CUDA; heavy modules (torch) are imported by the modules that need them.
"""

__version__ = "0.1.0"
