"""Indexing into segments: the segment writer, the merge of segments, the merge policy and the search breadth."""
