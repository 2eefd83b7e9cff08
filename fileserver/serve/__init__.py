"""``fileserver serve``: a read API over ``recordings`` and a review page, as a process of
its own (the worker stays a worker).

* :mod:`~fileserver.serve.app`: the aiohttp application (routes, request log, metrics,
  probes) over :class:`fileserver.db.reads.Reads` and the S3 client of
  :func:`fileserver.runtime.open_serve_clients`;
* :mod:`~fileserver.serve.auth`: bearer tokens configured as SHA-256 hashes, with scopes;
* :mod:`~fileserver.serve.cursor`: the opaque keyset cursor;
* :mod:`~fileserver.serve.audio`: presigned URLs and the streamed proxy (HTTP Range);
* :mod:`~fileserver.serve.openapi`: the OpenAPI document;
* :mod:`~fileserver.serve.page`: the review page (one HTML file, no build step);
* :mod:`~fileserver.serve.command`: the verb (``add_parser``, ``run_command``).
"""
