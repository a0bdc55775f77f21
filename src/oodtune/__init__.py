"""oodtune: fine-tune image classifiers so they can say "I don't know" on out-of-distribution inputs.

Convention used everywhere: every OOD *score* is "higher = more in-distribution".
"""

__version__ = "0.1.0"
