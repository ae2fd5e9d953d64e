"""Research tools around the clic method: the procedural toy world and its models (:mod:`clic_lab.toyworld`).

Nothing in :mod:`clic` imports this package; it imports :mod:`clic` like any user would.
"""
