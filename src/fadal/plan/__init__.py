"""Dataset fingerprints (per site, aggregate only) and the planner that turns them into a Plan."""
