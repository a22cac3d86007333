"""Fleet simulator: many simulated engines on one virtual clock, driven by a trace."""
