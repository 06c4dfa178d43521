"""Names shared by the two ends of the local generator bridge's HTTP API.

``capture.bridge`` (the server) and ``app.bridge_client`` (the dashboard's client) both import these,
so the dashboard needs no ``capture`` import (and no torch) to know what a job's ``state`` means.
Pure Python, no imports: it ships in the browser wheel with the rest of ``export``.
"""
from __future__ import annotations

#: A job's ``state`` in ``GET /jobs/{id}``: waiting, generating, and the three final states.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
#: Every state, in the order a job can pass through them.
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
#: States after which nothing about a job changes any more.
FINAL_STATES = (DONE, FAILED, CANCELLED)
