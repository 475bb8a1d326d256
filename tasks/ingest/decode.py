"""Decoding: each file validated, converted and stored in the dataset's private cache, in chunks.

Work is split in chunks of files; each chunk is one Prefect task run by the flow's task runner (a local decode pool,
or a Dask cluster). Each file's result is cached under private/cache by content hash and preprocessing settings, so
a re-run decodes only new or changed files. A file that cannot become an image is quarantined with a reason
(convert_file never raises for what a file holds).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.states import State

from data_schemas.dataset import DecodedFileRecord, QuarantineReason, WindowSpec
from data_schemas.files import atomic_write_bytes, sha256_json
from tasks.ingest.dataset_store import PRIVATE_FILE_MODE, make_private_dirs
from tasks.ingest.decode_pool import CHILD_BATCH_FILES, DecodePool, DecoderProcessDied, ProgressCallback, run_in_child
from tasks.ingest.dicom_io import Rejected, read_ct_file
from tasks.ingest.discover import SourceFile
from tasks.ingest.errors import OutputWriteError, writing_into
from tasks.ingest.preprocess import hu_frame_to_image

# Bump when the conversion recipe changes: it invalidates every cached decode.
PREPROCESS_VERSION = 2  # 2: every header value validated; burned-in annotation and secondary capture recorded
HU_SAMPLE_STRIDE = 8
# HU values kept for the dataset's fingerprint over the whole archive, as nnU-Net's fingerprint does (a fixed total
# of sampled voxels, 10e7 there, divided among the cases): memory then stays flat as the archive grows. 8e6 float64
# values are 64 MB; up to about 2,000 files of one 512 x 512 frame each every sampled value is kept.
HU_SAMPLE_BUDGET = 8_000_000


def preprocessing_signature(size: int, window: WindowSpec) -> str:
    """Identity of the conversion recipe; cached decodes are reused only under the same signature."""
    return sha256_json({"size": size, "window": window.model_dump(), "version": PREPROCESS_VERSION})[:16]


def cache_path(cache_dir: Path, content_sha256: str) -> Path:
    """Where one file's decoded result lives: private/cache/<recipe>/<sha[:2]>/<sha>.npz."""
    return Path(cache_dir) / content_sha256[:2] / f"{content_sha256}.npz"


@dataclass
class ConvertedFile:
    """One file after validation and conversion: its record, and its images and HU sample (empty if rejected)."""

    record: DecodedFileRecord
    images: np.ndarray  # (F, size, size) float16 in [0, 1]
    hu_sample: np.ndarray  # float32


def _rejected_file(source: SourceFile, size: int, reason: QuarantineReason, message: str) -> ConvertedFile:
    record = DecodedFileRecord(
        relative_path=source.relative_path,
        content_sha256=source.content_sha256,
        accepted=False,
        reason=reason,
        message=message,
    )
    return ConvertedFile(record=record, images=np.zeros((0, size, size), np.float16), hu_sample=np.zeros(0, np.float32))


def convert_file(source: SourceFile, size: int, window: WindowSpec) -> ConvertedFile:
    """Validate, decode and convert one file; never raises for anything the file holds (it is quarantined instead)."""
    try:
        decoded = read_ct_file(Path(source.path), source.relative_path)
        monochrome1 = decoded.record.photometric_interpretation == "MONOCHROME1"
        converted = [hu_frame_to_image(frame, window, size, monochrome1) for frame in decoded.hu_frames]
        images = np.stack([image for image, _ in converted]).astype(np.float16)
    except Rejected as rejected:
        return _rejected_file(source, size, rejected.reason, rejected.message)
    except MemoryError:
        raise  # the machine, not the file: let the task fail and be retried
    except Exception as error:  # a kind of broken file no check above foresaw: one file, not the whole run
        message = f"{source.relative_path}: could not be converted ({type(error).__name__})"
        return _rejected_file(source, size, QuarantineReason.DECODE_ERROR, message)
    hu_sample = decoded.hu_frames[:, ::HU_SAMPLE_STRIDE, ::HU_SAMPLE_STRIDE].ravel().astype(np.float32)
    record = decoded.record.model_copy(update={"content_sha256": source.content_sha256, "pads": converted[0][1]})
    return ConvertedFile(record=record, images=images, hu_sample=hu_sample)


def _store_in_cache(converted: ConvertedFile, cache_file: Path) -> CachedFile:
    """Store one file's images, HU sample and record (or its rejection) in the private cache; returns what the
    assembly needs of it (no images)."""
    # The images' hash is taken here, in the decode worker, so that ordering the dataset needs no image in memory.
    digest = image_hash(converted.images)
    record_json = converted.record.model_dump_json()
    buffer = io.BytesIO()
    np.savez(
        buffer,
        images=converted.images,
        hu_sample=converted.hu_sample,
        record=np.array(record_json),
        image_sha256=np.array(digest),
    )
    # No fsync: a cache entry lost in a crash is simply decoded again; the rename still keeps it whole.
    atomic_write_bytes(cache_file, buffer.getvalue(), durable=False, mode=PRIVATE_FILE_MODE)
    # The record as a later read of this entry gives it (same types), so a run's output does not depend on
    # whether a file was decoded now or earlier.
    return CachedFile(
        record=DecodedFileRecord.model_validate_json(record_json), image_sha256=digest, hu_sample=converted.hu_sample
    )


def decoding_marker(cache_file: Path) -> Path:
    """The file that exists while a process decodes into cache_file: left behind, it names the file whose decode
    killed its process."""
    return cache_file.with_suffix(".decoding")


def is_cached(source: SourceFile, cache_dir: str | Path) -> bool:
    """True when the file's decoded result (or its rejection) is in the cache."""
    return cache_path(Path(cache_dir), source.content_sha256).exists()


def was_being_decoded(source: SourceFile, cache_dir: str | Path) -> bool:
    """True when a process started decoding this file and died before storing its result."""
    cache_file = cache_path(Path(cache_dir), source.content_sha256)
    return decoding_marker(cache_file).exists() and not cache_file.exists()


def decode_files(sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec) -> dict[str, CachedFile]:
    """Validate and decode the files not yet in the content-addressed cache; returns those decoded now, by content
    hash (the others are read from the cache when needed). Each decode is bracketed by its decoding_marker, so a
    decode that kills the process is attributable to its file."""
    decoded = {}
    for source in sources:
        cache_file = cache_path(Path(cache_dir), source.content_sha256)
        if cache_file.exists():
            continue
        marker = decoding_marker(cache_file)
        with writing_into(cache_dir, "decoded images"):
            make_private_dirs(marker.parent)
            marker.touch()
            decoded[source.content_sha256] = _store_in_cache(convert_file(source, size, window), cache_file)
            marker.unlink(missing_ok=True)
    return decoded


def store_decoder_crash(source: SourceFile, cache_dir: str, size: int, how: str) -> CachedFile:
    """Quarantine a file whose decode killed the process decoding it alone (`how`: the signal or exit code), in the
    cache like any rejection, so that later runs never decode it again."""
    message = f"{source.relative_path}: decoding it killed its process ({how}), also when decoded alone"
    rejected = _rejected_file(source, size, QuarantineReason.DECODER_CRASHED, message)
    cache_file = cache_path(Path(cache_dir), source.content_sha256)
    with writing_into(cache_dir, "decoded images"):
        entry = _store_in_cache(rejected, cache_file)
    decoding_marker(cache_file).unlink(missing_ok=True)
    return entry


def decode_alone(source: SourceFile, cache_dir: str, size: int, window: WindowSpec) -> dict[str, CachedFile]:
    """Decode one file in a process of its own; if that process dies, the file is quarantined as decoder_crashed."""
    try:
        return run_in_child(decode_files, [source], cache_dir, size, window)
    except DecoderProcessDied as died:
        return {source.content_sha256: store_decoder_crash(source, cache_dir, size, died.how)}


def decode_isolating_crashes(
    sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec,
    decode_rest: Callable[[list[SourceFile]], dict[str, CachedFile]],
) -> dict[str, CachedFile]:
    """Decode the files not yet cached with decode_rest (in other processes); when one of those processes dies,
    decode each file left half-done (its decoding marker still there, from this or an earlier run) alone, then
    the rest again. A death with no file half-done twice running has no culprit to isolate: then each file left
    is decoded alone. Returns what the files decoded now hold, by content hash."""
    decoded: dict[str, CachedFile] = {}
    pending = [source for source in sources if not is_cached(source, cache_dir)]
    deaths_without_culprit, died = 0, False
    while pending:
        for source in [source for source in pending if was_being_decoded(source, cache_dir)]:
            decoded.update(decode_alone(source, cache_dir, size, window))
        rest = [source for source in pending if not is_cached(source, cache_dir)]
        if not rest:
            break
        if deaths_without_culprit >= 2:
            for source in rest:
                decoded.update(decode_alone(source, cache_dir, size, window))
            break
        try:
            decoded.update(decode_rest(rest))
            break
        except DecoderProcessDied:
            died = True
            pending = [source for source in rest if not is_cached(source, cache_dir)]
            culprit = any(was_being_decoded(source, cache_dir) for source in pending)
            deaths_without_culprit = 0 if culprit else deaths_without_culprit + 1
    if died:
        for source in sources:  # a sibling terminated after storing its result, before removing its marker
            if is_cached(source, cache_dir):
                decoding_marker(cache_path(Path(cache_dir), source.content_sha256)).unlink(missing_ok=True)
    return decoded


def decode_in_children(sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec,
                       on_progress: ProgressCallback | None = None) -> dict[str, CachedFile]:
    """Decode where there is no pool (one worker, a Dask worker): batches in forked children of this process, crashes
    isolated (decode_isolating_crashes); on_progress(n_files) after each batch."""
    decoded: dict[str, CachedFile] = {}
    for start in range(0, len(sources), CHILD_BATCH_FILES):
        batch = sources[start:start + CHILD_BATCH_FILES]
        decoded.update(decode_isolating_crashes(
            batch, cache_dir, size, window, lambda rest: run_in_child(decode_files, rest, cache_dir, size, window),
        ))
        if on_progress is not None:
            on_progress(len(batch))
    return decoded


def decode_on_pool(pool: DecodePool[CachedFile], sources: list[SourceFile], cache_dir: str, size: int,
                   window: WindowSpec) -> None:
    """Decode `sources` into the cache on the pool's workers (or in forked children with one worker); what the files
    decoded now hold for the assembly is kept in the pool until take_decoded. A file whose decode kills its process
    is quarantined as decoder_crashed and the others go on (decode_isolating_crashes)."""
    if pool.executor is None:
        pool.keep(decode_in_children(sources, cache_dir, size, window, pool.report))
        return
    reported = [0]
    pool.keep(decode_isolating_crashes(
        sources, cache_dir, size, window,
        lambda rest: pool.decode_on_workers(rest, (cache_dir, size, window), reported),
    ))
    pool.report(len(sources) - reported[0])  # files decoded alone or before a worker died


def _retry_unless_output_unwritable(task: object, task_run: object, state: State) -> bool:
    """Retry a failed chunk, except when the output folder cannot be written: retrying cannot help then."""
    try:
        state.result()
    except OutputWriteError:
        return False
    except Exception:
        return True
    return True


def chunk_cache_key(context: object, parameters: dict) -> str:
    """Prefect cache key of a chunk: its files' content hashes, the recipe and the cache location (no paths)."""
    return sha256_json({
        "files": sorted(source.content_sha256 for source in parameters["sources"]),
        "cache_dir": parameters["cache_dir"],
        "size": parameters["size"],
        "window": parameters["window"].model_dump(),
        "version": PREPROCESS_VERSION,
    })


@task(name="decode-chunk", retries=2, retry_delay_seconds=2, task_run_name="decode-chunk-{chunk_index}",
      cache_key_fn=chunk_cache_key, persist_result=True, retry_condition_fn=_retry_unless_output_unwritable)
def decode_chunk(chunk_index: int, sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec,
                 pool: DecodePool[CachedFile] | None = None) -> list[str]:
    """Decode one chunk of files into the dataset's private cache, on the flow's decode pool when given (else in
    children of this process: a Dask worker); the result holds only content hashes."""
    if pool is not None:  # run by a thread of the flow's process: the local decode pool does the work
        decode_on_pool(pool, sources, cache_dir, size, window)
    else:  # a Dask worker process: parallelism comes from the workers; each decode in a child of this process
        decode_in_children(sources, cache_dir, size, window)
    return [source.content_sha256 for source in sources]


def chunk_sources(sources: list[SourceFile], workers: int, max_chunk: int = 64) -> list[list[SourceFile]]:
    """Split files into chunks: at least 4 per worker for balance, at most max_chunk files each."""
    if not sources:
        return []
    n_chunks = max(workers * 4, -(-len(sources) // max_chunk))
    n_chunks = min(n_chunks, len(sources))
    return [sources[i::n_chunks] for i in range(n_chunks)]


def chunk_is_cached_on_disk(sources: list[SourceFile], cache_dir: Path) -> bool:
    """True when every file of the chunk has its decoded result in the cache (a Prefect cache hit is trusted only
    then)."""
    return all(cache_path(cache_dir, source.content_sha256).exists() for source in sources)


def image_hash(images: np.ndarray) -> str:
    """A file's image hash: the SHA-256 of its converted float16 images (its content key when ordering)."""
    return hashlib.sha256(images.tobytes()).hexdigest()


@dataclass
class CachedFile:
    """A decoded file as the assembly needs it, read from the cache without its images.

    Args:
        record: the file's record, with its current relative path.
        image_sha256: image_hash of its converted images.
        hu_sample: its HU sample (for the dataset's fingerprint).
    """

    record: DecodedFileRecord
    image_sha256: str
    hu_sample: np.ndarray


def hu_values_per_file(n_files: int) -> int:
    """How many of each file's HU sample values the fingerprint keeps: HU_SAMPLE_BUDGET shared by n_files."""
    return max(1, HU_SAMPLE_BUDGET // max(n_files, 1))


def thin_hu_sample(sample: np.ndarray, keep: int) -> np.ndarray:
    """At most `keep` values of a file's HU sample, evenly strided (deterministic); a copy, so the file's whole
    sample is not held by a view."""
    if sample.size <= keep:
        return sample
    return sample[:: -(-sample.size // keep)].copy()


def _read_cache_entry(cache_file: Path) -> CachedFile:
    """A cache entry's record, image hash and HU sample (its images stay on disk)."""
    with np.load(cache_file) as cached:
        record = DecodedFileRecord.model_validate_json(str(cached["record"]))
        # Entries written before the hash was cached get it from their images.
        digest = str(cached["image_sha256"]) if "image_sha256" in cached.files else image_hash(cached["images"])
        return CachedFile(record=record, image_sha256=digest, hu_sample=cached["hu_sample"])


def load_cached_files(sources: list[SourceFile], cache_dir: Path, hu_values: int | None = None,
                      pool: DecodePool[CachedFile] | None = None) -> list[CachedFile]:
    """Each file's record, image hash and HU sample, with its current relative path: handed over by the decode
    pool when it decoded the file during this run (no re-read), else read from the cache.

    hu_values: keep at most this many of each file's HU sample values (hu_values_per_file of the archive's file
    count); None keeps them all.
    """
    files = []
    for source in sources:
        entry = pool.take_decoded(source.content_sha256) if pool is not None else None
        if entry is None:  # decoded before this run, on Dask, or a second file with the same content
            entry = _read_cache_entry(cache_path(cache_dir, source.content_sha256))
        hu_sample = entry.hu_sample if hu_values is None else thin_hu_sample(entry.hu_sample, hu_values)
        record = entry.record.model_copy(update={
            "relative_path": source.relative_path,
            "message": entry.record.message.replace(entry.record.relative_path, source.relative_path, 1),
        })
        files.append(CachedFile(record=record, image_sha256=entry.image_sha256, hu_sample=hu_sample))
    return files
