"""Object storage: everything that knows the S3 client is in this package.

* :mod:`~fileserver.storage.objects`: :class:`ObjectStore`, the adapter every command
  uses (boto3 in a thread pool: uploads, HEAD, listing, moves, the bucket check);
* :mod:`~fileserver.storage.s3_put`: the event-loop PUT path of
  ``FILESERVER_S3_TRANSPORT=http11`` (the default) and ``aiohttp`` (SigV4 signer,
  senders, the preflight's probe key, the proxy rule);
* :mod:`~fileserver.storage.http11`: the small HTTP/1.1 client of the ``http11`` sender
  (a keep-alive pool; responses parsed by httptools/llhttp);
* :mod:`~fileserver.storage.base`: what they share (no I/O).

Imports go one way, ``objects -> s3_put -> http11``, each of them to ``base``. What an
object's key and metadata are, and when a stored object matches its row, is not S3's
business: see :mod:`fileserver.layout`.
"""

from fileserver.storage.base import (
    CONTENT_TYPE,
    ListedObject,
    S3ErrorResponse,
    StoredObject,
    content_md5,
    etag_value,
    s3_errors,
    s3_unavailable,
)
from fileserver.storage.objects import FAST_PUT_MAX_BYTES, ObjectStore, head_object

__all__ = [
    "CONTENT_TYPE",
    "FAST_PUT_MAX_BYTES",
    "ListedObject",
    "ObjectStore",
    "S3ErrorResponse",
    "StoredObject",
    "content_md5",
    "etag_value",
    "head_object",
    "s3_errors",
    "s3_unavailable",
]
