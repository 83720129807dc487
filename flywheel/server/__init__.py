"""The generation server: `flywheel serve` (FastAPI over data-parallel engine workers)."""
