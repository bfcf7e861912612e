"""The collector's read side: ``api`` (``/health``, ``/metrics``, ``/query`` and the
named ``reports``), ``sqlguard`` and ``sqlallow`` (what a user's SQL may do), ``jaeger``
(Jaeger's query API v1 and v3, clock-aligned by ``clockalign``), ``waterfall`` and ``ui``
(the latency page, its assets in ``ui_assets/``), and ``commands`` (``tokentrace query``,
``report``, ``trace``, ``traces``, ``ui``). Every read runs on the store's read session,
apart from ingest.
"""
