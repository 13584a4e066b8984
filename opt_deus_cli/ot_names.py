"""What the transport layer offers, by name: the cost kinds (ot.py) and the solvers (solvers.py).
Imports no torch: the recipe parser offers these as choices."""

from __future__ import annotations

COST_KINDS = ("euclidean", "sqeuclidean", "cosine")
SOLVERS = ("exact", "sinkhorn")
