"""A backfill on a Ray cluster that consumes the daemon's own queue (``captiond backfill``).

The driver (:mod:`.driver`) runs on the daemon's host, next to its state database. It
leases the pending jobs of the chosen folders and generator in chunks, under its own
lease owner (so the daemon leaves them alone until the lease expires), plans each chunk
with the caption pipeline (targets; a person's caption that stays is acked at once) and
hands the rest to a pool of Ray Data actors (:mod:`.actor`) as small rows. Each actor
loads the generator once, reads and decodes its images confined to their roots on its
node and returns a raw caption or a classified error per image. The driver then
finishes each chunk with the same pipeline as the daemon (post-process, decide, stage,
record, rename, fsync) and acks it in one transaction.

Actors have no side effects on the dataset: Ray's at-least-once retries (a restarted
actor redoes its batch) can only repeat model work, never write a second or torn sidecar.

Ray is optional (the ``ray`` extra): no module here imports it at module level, so
the daemon (which shows a backfill's status, :mod:`.status`) never needs it; the Ray
parts (:mod:`.cluster`, the driver's :class:`~.driver.RayExecutor`, the actor's feeder
calls) import it where they run.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = (
    'captiond backfill needs Ray: pip install "captiond[ray]" '
    '(or pip install "ray[data]>=2.60") on this host and on every node of the cluster'
)


def ray_missing() -> str | None:
    """Why Ray cannot be used here (None when it can)."""
    try:
        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
            return INSTALL_HINT
    except (ImportError, ValueError):
        return INSTALL_HINT
    return None
