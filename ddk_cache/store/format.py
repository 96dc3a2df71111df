"""The on-disk contract of a ddk-cache store (Zarr v3); `docs/cache-format.md` is its prose twin.

Layout (format version 3)::

    <store>/                        root group, attrs["ddk_cache"] = header (provenance, capture, status)
      <domain>/                     one group per manifest domain, attrs["ddk_cache_domain"]
        train/ and valid/           one group per split, each holding:
          tokens           int32        [N, seq_len + 1]     packed window; targets are tokens[:, 1:]
          ids              uint16|int32 [N, seq_len, W]      entry token ids, ascending per position (delta*)
          logprobs         int16*       [N, seq_len, W]      raw log-probs (topk, topp; headtail: head, then tail log(count / draws)), quantized
          counts           uint8        [N, seq_len, W]      draws per id (sampled)
          n_entries        uint8|uint16 [N, seq_len]         valid entries per position
          rest_logprobs    float16      [N, seq_len]         log of the mass outside the entries (topk, topp), the tail's (headtail)
          target_logprobs  int32*       [N, seq_len]         log-prob of the actual next token
          shard_done       uint8        [n_shards]           1 once every array's shard i is written
          crc32/<array>    uint32       [n_chunks]           CRC-32 of each inner chunk's decoded values

(* stored integers whose rule back to the values is the array's `ddk_cache_encoding` attribute (`encodings.py`):
per-position deltas for the ids, integer x 1/scale for the log-probs. Every codec is a Zarr v3 core one, so any
Zarr v3 reader opens every array. Version 2 stores did the same transforms with numcodecs' `delta` and
`fixedscaleoffset` codecs inside zarr, which only zarr-python reads; they are still read here.)
The header and each domain's attribute are typed in `header.py` (`StoreHeader`, `DomainInfo`) and read
by `header_versions.py`.
Version 1 stores (rank-ordered `topk_ids` int32 and `topk_logprobs` float16, always k entries)
are still read. Arrays are sharded along windows: a shard (`shard_windows` windows) is the
unit of writing and of resume; inner chunks (`chunk_windows`) are the unit of reading.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ddk_cache.ranges import AT_LEAST_ONE, Range, check_ranges
from ddk_cache.store.capture import Capture
from ddk_cache.store.encodings import ENCODING_ATTR, Encoding
from ddk_cache.store.header import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS  # noqa: F401  (the header's typed metadata)
from ddk_cache.store.integrity import create_checksum_array

HEADER_ATTR = "ddk_cache"
DOMAIN_ATTR = "ddk_cache_domain"
SPLITS = ("valid", "train")  # valid first: the teacher's validation loss is known early

TOKENS = "tokens"
IDS = "ids"
LOGPROBS = "logprobs"
COUNTS = "counts"
N_ENTRIES = "n_entries"
REST_LOGPROBS = "rest_logprobs"
TARGET_LOGPROBS = "target_logprobs"
SHARD_DONE = "shard_done"
RESPONSE_MASK = "response_mask"  # rollout stores: 1 where the next token is one the student sampled
BEHAVIOUR_LOGPROBS = "behaviour_logprobs"  # rollout stores: the sampling student's log-prob of that token
SAMPLING_LOGPROBS = "sampling_logprobs"  # teacher-mixed rollout stores: the log-prob of that token under the mixture that drew it
V1_TOPK_IDS = "topk_ids"
V1_TOPK_LOGPROBS = "topk_logprobs"
V1_DATA_ARRAYS = (TOKENS, V1_TOPK_IDS, V1_TOPK_LOGPROBS, TARGET_LOGPROBS)

# The name stores written before 2026-12-02 carry in `layout.codec_profile` and `identity.layout`, whatever their
# arrays' blosc level (9, later 6): a constant, not a description. Headers now describe the arrays written
# (`codec_profile`), and a resumed dump compares identities without it (the codecs change no value).
HISTORICAL_CODEC_PROFILE = "v2: ids delta+blosc-zstd9-shuffle, log-probs fixed-scale int16+blosc-zstd9-bitshuffle, +crc32c"
TARGET_LOGPROB_SCALE = 1024  # actual-token log-probs are kept to 1/1024 nat (|error| <= 0.0005)
TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB of raw entry ids per inner chunk: one efficient streaming read
CHUNKS_PER_SHARD = 8


# Blosc maps its clevel 9 to zstd's maximum level (22), which compresses at 6-13 MB/s: one GPU
# scoring a 1B teacher produces targets faster than eight such threads can write them. clevel 6
# (zstd 11) writes 8-16x faster for 2 % more bytes (benchmarks/RESULTS.md, "Stage one on a GPU").
# Readers take the level from each array's zarr.json, so stores written at clevel 9 read the same.


@dataclass(frozen=True)
class ArraySpec:
    """One data array of a split: per-window trailing shape, logical dtype and codec chain."""

    trailing: tuple[int, ...]
    dtype: str  # what zarr decodes: the stored integers of an encoded array
    filters: tuple = ()  # format 2's numcodecs transforms (read, never written any more)
    compressor_dtype_size: int = 4
    shuffle: BloscShuffle = BloscShuffle.bitshuffle
    clevel: int = 6  # blosc's clevel 6 runs zstd at level 11 (blosc maps c to 2c - 1)
    encoding: Encoding | None = None  # format 3: the rule from the stored integers to the values

    def compressors(self) -> tuple:
        """blosc/zstd over the (filtered) bytes, then a checksum so corruption is detected on read."""
        blosc = BloscCodec(cname="zstd", clevel=self.clevel, shuffle=self.shuffle, typesize=self.compressor_dtype_size)
        return (blosc, Crc32cCodec())


# zarr warns, whenever it builds a numcodecs codec (writing or reading), that other Zarr
# implementations may lack it; docs/cache-format.md names each codec, so the warning is noise here.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def _numcodecs(name: str, **config: Any):
    """A numcodecs codec (shipped with numcodecs, registered in zarr) as a zarr v3 codec."""
    from zarr.codecs import numcodecs as zarr_numcodecs  # heavy: numcodecs' codecs only when a chunk is checked

    return getattr(zarr_numcodecs, name)(**config)


@dataclass(frozen=True)
class StoreLayout:
    """Array geometry and codecs shared by every split of a store."""

    seq_len: int
    capture: Capture
    vocab_size: int | None  # the teacher's; decides the id dtype (set once the engine is up)
    chunk_windows: int
    shard_windows: int
    format_version: int = FORMAT_VERSION  # the arrays' version: a format-2 store's are checked as format 2 wrote them

    @classmethod
    def choose(
        cls, seq_len: int, capture: Capture, vocab_size: int | None, chunk_windows: int | None = None, shard_windows: int | None = None
    ) -> "StoreLayout":
        """Defaults: ~1 MiB inner chunks of raw ids, 8 chunks per shard. Shards must be whole chunks."""
        if chunk_windows is None:
            chunk_windows = max(1, TARGET_CHUNK_BYTES // (seq_len * capture.width * 4))
            if shard_windows is not None:
                chunk_windows = math.gcd(chunk_windows, shard_windows)
        if shard_windows is None:
            shard_windows = chunk_windows * CHUNKS_PER_SHARD
        if chunk_windows <= 0 or shard_windows <= 0 or shard_windows % chunk_windows:
            raise ValueError(f"shard_windows ({shard_windows}) must be a positive multiple of chunk_windows ({chunk_windows})")
        return cls(seq_len=seq_len, capture=capture, vocab_size=vocab_size, chunk_windows=chunk_windows, shard_windows=shard_windows)

    def to_attrs(self) -> dict:
        attrs = asdict(self)
        attrs["capture"] = self.capture.to_attrs()
        del attrs["format_version"]  # the header's own key
        return attrs

    @property
    def width(self) -> int:
        return self.capture.width

    def n_shards(self, n_windows: int) -> int:
        return -(-n_windows // self.shard_windows)

    def shard_slice(self, shard: int, n_windows: int) -> slice:
        start = shard * self.shard_windows
        return slice(start, min(start + self.shard_windows, n_windows))

    def array_specs(self) -> dict[str, ArraySpec]:
        """The data arrays of one split, by name (which ones depends on the capture mode)."""
        length, width, capture = self.seq_len, self.width, self.capture
        if self.vocab_size is None:
            raise ValueError("the layout's vocab_size must be known before arrays are created")
        id_dtype = "uint16" if self.vocab_size <= 1 << 16 else "int32"
        id_size = np.dtype(id_dtype).itemsize
        v2 = self.format_version == 2
        specs = {
            TOKENS: token_spec(length),
            # sorted ids, delta-coded per position (format 2: along the flattened chunk, by numcodecs)
            IDS: (ArraySpec((length, width), id_dtype, (_numcodecs("Delta", dtype=np.dtype(id_dtype).str),), id_size, BloscShuffle.shuffle) if v2
                  else ArraySpec((length, width), id_dtype, (), id_size, BloscShuffle.shuffle, encoding=Encoding("delta"))),
            N_ENTRIES: ArraySpec((length,), "uint8" if width <= 255 else "uint16", compressor_dtype_size=1 if width <= 255 else 2),
            TARGET_LOGPROBS: _scaled((length,), TARGET_LOGPROB_SCALE, "int32", v2),
        }
        if capture.mode == "sampled":
            specs[COUNTS] = ArraySpec((length, width), "uint8", compressor_dtype_size=1, shuffle=BloscShuffle.noshuffle)
        else:
            if capture.logprob_scale:
                specs[LOGPROBS] = _scaled((length, width), capture.logprob_scale, "int16", v2)
            else:
                specs[LOGPROBS] = ArraySpec((length, width), "float16", compressor_dtype_size=2)
            specs[REST_LOGPROBS] = ArraySpec((length,), "float16", compressor_dtype_size=2, shuffle=BloscShuffle.shuffle)
        return specs


def _describe_codec(codec: dict[str, Any]) -> str | None:
    """One codec of a chain as a few words (None: `bytes`, which every chain has and which changes nothing)."""
    name, config = codec["name"], codec.get("configuration", {})
    if name == "bytes":
        return None
    if name == "blosc":
        return f"blosc({config['cname']} clevel {config['clevel']}, {config['shuffle']})"
    if name == "numcodecs.fixedscaleoffset":
        return f"fixedscaleoffset(x{config['scale']}, {config['astype']})"
    return name.removeprefix("numcodecs.")


def describe_codecs(array: zarr.Array) -> str:
    """An array's codec chain as its zarr.json records it, e.g. `[delta, uint16] > blosc(zstd clevel 6, shuffle) > crc32c`
    (in brackets: a format-3 array's encoding attribute and stored dtype; format 2 wrote `delta > blosc(...)`).

    Why read back instead of describing `ArraySpec`: the header's description is a promise to
    every later reader, and the arrays' own metadata is what they will decode with.
    """
    codecs = [codec.to_dict() for codec in array.metadata.codecs]
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":  # the chain of the inner chunks
        codecs = [codec if isinstance(codec, dict) else codec.to_dict() for codec in codecs[0]["configuration"]["codecs"]]
    encoding = array.attrs.get(ENCODING_ATTR)  # format 3: the stored integers' rule, applied by the reader
    stored = [] if encoding is None else [f"[{encoding['name']}{' x' + str(encoding['scale']) if encoding.get('scale') else ''}, {array.dtype}]"]
    return " > ".join(stored + list(filter(None, map(_describe_codec, codecs))))


def codec_profile(split: zarr.Group) -> str:
    """`layout.codec_profile`: each data array of a split and its codec chain, read from the arrays themselves."""
    return "; ".join(f"{name}: {describe_codecs(split[name])}" for name in sorted(split.array_keys()) if name != SHARD_DONE)


def token_spec(seq_len: int) -> ArraySpec:
    """`tokens`: seq_len + 1 int32 ids per window (the last position's next token included)."""
    return ArraySpec((seq_len + 1,), "int32", shuffle=BloscShuffle.shuffle, clevel=5)


def rollout_specs(seq_len: int, format_version: int = FORMAT_VERSION, teacher_mixed: bool = False) -> dict[str, ArraySpec]:
    """The arrays `ddk-cache rollout` writes beside `tokens` (MiniLLM rounds): which positions predict a sampled
    response token, and the sampling student's log-prob of it (1/1024 nat, as `target_logprobs`); with teacher-mixed
    sampling also the mixture's log-prob of it, the denominator of the update's importance ratios."""
    specs = {
        RESPONSE_MASK: ArraySpec((seq_len,), "uint8", compressor_dtype_size=1),
        BEHAVIOUR_LOGPROBS: _scaled((seq_len,), TARGET_LOGPROB_SCALE, "int32", format_version == 2),
    }
    if teacher_mixed:
        specs[SAMPLING_LOGPROBS] = _scaled((seq_len,), TARGET_LOGPROB_SCALE, "int32", format_version == 2)
    return specs


def _scaled(trailing: tuple[int, ...], scale: int, stored: str, v2: bool) -> ArraySpec:
    """Log-probs kept as integers x 1/scale: format 3 stores the integers (a `fixed_scale` encoding); format 2 had
    numcodecs' FixedScaleOffset turn them back to float32 inside zarr."""
    size = np.dtype(stored).itemsize
    if v2:
        return ArraySpec(trailing, "float32", (_numcodecs("FixedScaleOffset", offset=0, scale=scale, dtype="<f4", astype=np.dtype(stored).str),),
                         size)
    return ArraySpec(trailing, stored, (), size, encoding=Encoding("fixed_scale", scale))


def logprob_floor(scale: int, astype_bits: int = 16) -> float:
    """Most negative log-prob a fixed-scale integer of `astype_bits` holds (values below are clamped)."""
    return -float((1 << (astype_bits - 1)) - 1) / scale


@dataclass(frozen=True)
class LayoutSettings:
    """`--chunk-windows` / `--shard-windows` as given (None: `StoreLayout.choose`'s defaults for the capture)."""

    chunk_windows: int | None = None
    shard_windows: int | None = None

    RANGES: ClassVar[dict[str, Range]] = {"chunk_windows": AT_LEAST_ONE, "shard_windows": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        check_ranges({"chunk_windows": self.chunk_windows, "shard_windows": self.shard_windows}, self.RANGES)

    @property
    def given(self) -> bool:
        return self.chunk_windows is not None or self.shard_windows is not None


def zarr_store(url: str, read_only: bool, storage_options: dict | None = None):
    """A zarr store for a local path or an fsspec URL such as `s3://bucket/cache.zarr`."""
    if "://" in url and not url.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    return zarr.storage.LocalStore(url.removeprefix("file://"), read_only=read_only)



def create_split_arrays(group: zarr.Group, n_windows: int, layout: StoreLayout) -> None:
    """Create the data arrays and shard markers of one split with their final shapes.

    Shapes are fixed up front (never appended), so writers of different shards never touch
    shared metadata: that is what makes resume and multi-process writing safe.
    """
    create_token_array(group, n_windows, layout)
    create_target_arrays(group, n_windows, layout)


def create_token_array(group: zarr.Group, n_windows: int, layout: StoreLayout) -> None:
    """The packed windows alone (`ddk-cache pack`): what a teacher will score later."""
    _create(group, TOKENS, token_spec(layout.seq_len), n_windows, layout)


def create_target_arrays(group: zarr.Group, n_windows: int, layout: StoreLayout) -> None:
    """The teacher's arrays and the shard markers, beside an existing `tokens` array."""
    for name, spec in layout.array_specs().items():
        if name != TOKENS:
            _create(group, name, spec, n_windows, layout)
    group.create_array(SHARD_DONE, shape=(layout.n_shards(n_windows),), chunks=(1,), dtype="uint8", compressors=None, fill_value=0)


def create_rollout_arrays(group: zarr.Group, n_windows: int, layout: StoreLayout, teacher_mixed: bool = False) -> None:
    """A rollout store's split before scoring: `tokens`, `response_mask`, `behaviour_logprobs` (+ `sampling_logprobs`)."""
    create_token_array(group, n_windows, layout)
    for name, spec in rollout_specs(layout.seq_len, teacher_mixed=teacher_mixed).items():
        _create(group, name, spec, n_windows, layout)


def _create(group: zarr.Group, name: str, spec: ArraySpec, n_windows: int, layout: StoreLayout) -> None:
    """A data array, sharded along windows, and the checksums of its chunks (`integrity.py`)."""
    create_checksum_array(group, name, n_windows, layout.chunk_windows, layout.shard_windows)
    group.create_array(
        name,
        shape=(n_windows, *spec.trailing),
        chunks=(layout.chunk_windows, *spec.trailing),
        shards=(layout.shard_windows, *spec.trailing),
        dtype=spec.dtype,
        filters=list(spec.filters),
        compressors=spec.compressors(),
        fill_value=0,
        config={"write_empty_chunks": True},
        attributes={ENCODING_ATTR: spec.encoding.to_dict()} if spec.encoding is not None else None,
    )


def teacher_loss(target_logprobs: np.ndarray) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats) and perplexity from actual-token log-probs."""
    loss = float(-np.mean(target_logprobs, dtype=np.float64))
    return loss, float(math.exp(loss))
