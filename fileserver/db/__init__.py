"""What :class:`fileserver.repository.Repository` is made of, one concern per module.

* :mod:`~fileserver.db.rows`: the rows read and written (plain values);
* :mod:`~fileserver.db.statements`: the batched statements, built once;
* :mod:`~fileserver.db.deadlines`: connection options, the client-side deadline around
  every statement and the connections kept open for batches;
* :mod:`~fileserver.db.coalescer`: natural batching of concurrent calls.

Imports go one way: ``statements -> rows``; none of them imports the repository.
"""
