"""Reading a published version's files in tests: its chunk table, its segments, its searchable form."""

from pipeline.runner import artifact_store
from pipeline.segments.storage import SegmentArtifacts
from retrieval.segments.search import SegmentedVersion, SegmentPool


def files_of(registry, config):
    return SegmentArtifacts(artifact_store(config, registry.home), config.index)


def chunk_rows(registry, config, version):
    """The version's live chunk-table rows, by chunk key."""
    return files_of(registry, config).chunk_table(version).to_pylist()


def manifest_of(registry, config, version):
    return files_of(registry, config).read_version(version)


def opened(registry, config, version):
    """The version ready to search (segments opened from its store)."""
    files = files_of(registry, config)
    return SegmentedVersion(files.read_version(version), SegmentPool(files.local))


def segment_dir(registry, config, version, index=0):
    """The directory of the version's ``index``-th segment."""
    files = files_of(registry, config)
    return files.segment_path(files.read_version(version).segments[index].name)
