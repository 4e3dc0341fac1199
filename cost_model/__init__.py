"""Cost model: memory (liveness over the training graph) and runtime (roofline) estimates, and solvers."""
