"""Development tooling for Darkroom: never installed on a fleet.

``make`` installs this distribution (``darkroom-dev``) beside the three runtime ones. It holds the
embedded services (a local Redis and S3-compatible server), the tiny-model builders, the demo and
the worker-process harness that tests, benchmarks and the demo start workers with.
"""
