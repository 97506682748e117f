"""The worker's inference path, on the engine thread.

* :mod:`.engine`: the engine thread and the task slots that feed it (:class:`~.engine.Engine`).
* :mod:`.batching`: the batching policy (which requests share a call, and when).
* :mod:`.executor`: what the engine does with one group: model, adapters, scheduler, call.
* :mod:`.call`: the pipeline call itself (a list of prepared jobs in, images per job out).
"""
