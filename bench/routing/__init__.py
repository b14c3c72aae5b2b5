"""Routing-quality benchmark: the routing policy against baselines and the offline optimum."""
