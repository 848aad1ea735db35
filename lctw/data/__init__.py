"""Data: long documents cut into training rows, planted facts and copy spans, batching.

* :mod:`.corpus`  ``LongDocuments`` (essays, local files or a Hub dataset → token rows of length N, cached
  with ``datasets``), the epoch sampler, ``collate``.
* :mod:`.facts`   keyed facts planted in prose at chosen distances (the miniature's recall task).
* :mod:`.copies`  copy spans (random tokens or the prose itself) restated at chosen distances, held-out spans.
* :mod:`.mixture` rows of several kinds (plain, facts, copies, repeats) drawn with given shares.

May import: :mod:`lctw.errors` and each other; never models, the method, training or the config layer.
"""

from lctw.data.corpus import SOURCES, EpochSampler, LongDocuments, collate, essays, essays_path

__all__ = ["SOURCES", "EpochSampler", "LongDocuments", "collate", "essays", "essays_path"]
