"""Segments: immutable sets of index files shared by versions, and searching a version across them.

A segment holds an HNSW graph labelled by chunk keys, the chunks' full-precision vectors, BM25
postings and term statistics as memory-mappable arrays, and the chunk table as Arrow IPC; it is
written once under a name of its own and never modified. A version is a manifest listing segments
and, per segment, the chunk keys deleted from it since it was written.
"""

from retrieval.segments.files import SEGMENT_MANIFEST, SegmentManifest, term_hashes
from retrieval.segments.manifest import SegmentRef, SegmentStore, VersionManifest
from retrieval.segments.search import SegmentedVersion, SegmentPool
from retrieval.segments.segment import Segment

__all__ = ["SEGMENT_MANIFEST", "Segment", "SegmentManifest", "SegmentPool", "SegmentRef", "SegmentStore",
           "SegmentedVersion", "VersionManifest", "term_hashes"]
