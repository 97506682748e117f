"""Webhook delivery on the producer's side of the fleet.

* :mod:`.deliveries`: the outbox a worker's status changes land in, each delivery's attempts, and the
  dead letters (Redis keys ``darkroom:webhooks:*``).
* :mod:`.dispatcher`: the long-running service that signs and sends them, retried with back-off.
* :mod:`.cli`: ``darkroom dispatcher`` and ``darkroom webhooks``.

Signing and verification (what a receiver needs) live in :mod:`darkroom.common.webhooks`.
"""
