"""The RL maths: group-relative advantages and the clipped policy loss. Pure functions, CPU-testable."""
