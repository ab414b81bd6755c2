"""Saving and loading models in a format that never executes code.

Layout of a model file (every integer unsigned little-endian)::

    b"FHMVJAX\\0"     8 bytes, the magic
    format version    4 bytes
    header length     8 bytes
    header            UTF-8 JSON: format, format_version, library_version, spec, the layout
                      (name, dtype, shape, offset, nbytes) of every parameter array (``raw_layout``:
                      the parameter blocks' unconstrained fields, null where unused), payload_nbytes
                      and the caller's metadata
    header SHA-256    32 bytes, of everything before it
    payload           the parameter arrays' raw little-endian C-order bytes
    file SHA-256      32 bytes, of everything before it

Every later format version keeps everything up to the header digest, so a file from a newer
library is recognised as such. Loading checks the magic, both digests, the version and every
array against the header and the spec before a model is built: a truncated, corrupted,
foreign or future-version file raises ``ModelFileError`` naming the problem, and nothing is
half-loaded. Writes go to a temporary file that is fsynced and renamed over the target, so a
crash never damages the previous file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from ._version import __version__
from .model.fhmv import FHMV, raw_layout
from .model.params import as_array
from .model.spec import ModelSpec

MAGIC = b"FHMVJAX\x00"
FORMAT = "fhmv_jax.model"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")
_DIGEST_SIZE = hashlib.sha256().digest_size
_DTYPES = ("float32", "float64")


class ModelFileError(ValueError):
    """A model file that cannot be loaded: missing, truncated, corrupted, foreign or from a future version."""


class SavedModel(NamedTuple):
    """What ``load`` returns.

    Attributes:
        model: the FHMV model, every parameter bit-identical (same dtype) to the one saved.
        metadata: the keyword arguments given to ``save``, as JSON values (tuples and arrays become lists).
        library_version: the fhmv_jax version that wrote the file.
        format_version: the file's format version.
    """

    model: FHMV
    metadata: dict
    library_version: str
    format_version: int


def _json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (numpy/JAX scalars and arrays via ``tolist``); TypeError names ``where``."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        value = np.asarray(value).tolist()
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: dictionary key {bad[0]!r} is not a string")
        return {k: _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"{where}: {value} is not representable in JSON")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} is not JSON-serialisable")


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _as_lists(value: Any) -> Any:
    return [_as_lists(v) for v in value] if isinstance(value, tuple) else value


_LATER_FIELDS = {"zero_mean": False}
"""Spec fields added after format 1 and their defaults: left out at the default, so files of models that do
not use them are the bytes release 0.1.0 wrote."""


def _spec_fields(spec: ModelSpec) -> dict:
    return {f.name: _as_lists(getattr(spec, f.name)) for f in dataclasses.fields(spec)
            if _LATER_FIELDS.get(f.name, object()) != getattr(spec, f.name)}


def _encode_params(model: FHMV) -> tuple[list[dict], bytes]:
    """The header's parameter layout and the payload bytes."""
    layout, chunks, offset = [], [], 0
    for name, value in model.raw_arrays().items():
        if value is None:
            layout.append({"name": name, "array": None})
            continue
        array = np.asarray(value)
        if array.dtype.name not in _DTYPES:
            raise ValueError(f"parameter {name} has dtype {array.dtype}; a model file holds {_DTYPES}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"parameter {name} has non-finite values; refusing to save a broken model")
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entry = {"dtype": array.dtype.name, "shape": list(array.shape), "offset": offset, "nbytes": len(data)}
        layout.append({"name": name, "array": entry})
        chunks.append(data)
        offset += len(data)
    return layout, b"".join(chunks)


def _encode(model: FHMV, metadata: dict) -> bytes:
    layout, payload = _encode_params(model)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "spec": _spec_fields(model.spec),
        "params": layout,
        "payload_nbytes": len(payload),
        "metadata": metadata,
    }
    encoded = json.dumps(header, sort_keys=True, allow_nan=False).encode("utf-8")
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(encoded)) + encoded
    body = head + hashlib.sha256(head).digest() + payload
    return body + hashlib.sha256(body).digest()


def _fsync_directory(directory: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file in the same directory, renamed over it.

    On any error the temporary file is removed and an existing file at ``path`` is untouched.

    Args:
        path: the target file; its directory must exist.
        data: the complete file contents.

    Raises:
        FileNotFoundError: the directory does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: directory {path.parent} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save(path: str | os.PathLike, model: FHMV, **metadata) -> Path:
    """Save a model and JSON metadata atomically, in a format that loads without executing code.

    Args:
        path: the file to write (its directory must exist); an existing file is replaced only
            once the new one is complete on disk.
        model: the model (float32 or float64 parameters, all finite).
        **metadata: JSON-serialisable values (numpy/JAX arrays and scalars are converted with
            ``tolist``, tuples become lists), e.g. the standardizer, the feature transform,
            regime names, training information.

    Returns:
        The path written.

    Raises:
        TypeError: ``model`` is not an FHMV, or a metadata value is not JSON-serialisable (its key named).
        ValueError: a parameter with non-finite values or a dtype other than float32/float64.
        FileNotFoundError: the directory does not exist.
    """
    if not isinstance(model, FHMV):
        raise TypeError(f"save expects an FHMV model, got {type(model).__name__}")
    atomic_write_bytes(path, _encode(model, _json_value(metadata, "metadata")))
    return Path(path)


def _read_header(data: bytes, path) -> tuple[int, dict, int]:
    """Check the preamble and header digest; return the format version, the header and where the payload starts."""
    if not data:
        raise ModelFileError(f"{path} is empty (0 bytes): not an fhmv_jax model file")
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        raise ModelFileError(f"{path} is truncated: it ends inside the magic bytes")
    if not data.startswith(MAGIC):
        raise ModelFileError(f"{path} is not an fhmv_jax model file (wrong magic bytes {data[:8]!r})")
    if len(data) < _PREAMBLE.size:
        raise ModelFileError(f"{path} is truncated: it ends inside the preamble ({len(data)} bytes)")
    _, version, length = _PREAMBLE.unpack_from(data)
    end = _PREAMBLE.size + length
    if end + _DIGEST_SIZE > len(data):
        raise ModelFileError(
            f"{path} is truncated or its header length is corrupted: the header needs {length} bytes"
            f" but only {len(data) - _PREAMBLE.size} follow the preamble"
        )
    if hashlib.sha256(data[:end]).digest() != data[end : end + _DIGEST_SIZE]:
        raise ModelFileError(f"{path} has a corrupted header: its SHA-256 checksum does not match")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has format version {version}; this fhmv_jax reads format versions up to {FORMAT_VERSION}:"
            " upgrade fhmv_jax to load it"
        )
    try:
        header = json.loads(data[_PREAMBLE.size : end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path} has a header that is not UTF-8 JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("format_version") != version:
        raise ModelFileError(f"{path} has a header that is not a version-{version} {FORMAT} header")
    return version, header, end + _DIGEST_SIZE


def _check_payload(data: bytes, header: dict, start: int, path) -> memoryview:
    """Check the payload's length and the file digest; return the payload."""
    expected = header.get("payload_nbytes")
    if not isinstance(expected, int) or expected < 0:
        raise ModelFileError(f"{path} has an invalid payload_nbytes {expected!r} in its header")
    actual = len(data) - start - _DIGEST_SIZE
    if actual < expected:
        raise ModelFileError(
            f"{path} is truncated: its payload and checksum need {expected + _DIGEST_SIZE} bytes,"
            f" the file has {len(data) - start}"
        )
    if actual > expected:
        raise ModelFileError(f"{path} has {actual - expected} unexpected bytes after its payload")
    if hashlib.sha256(data[:-_DIGEST_SIZE]).digest() != data[-_DIGEST_SIZE:]:
        raise ModelFileError(f"{path} has a corrupted payload: its SHA-256 checksum does not match")
    return memoryview(data)[start:-_DIGEST_SIZE]


def _read_spec(fields: Any, path) -> ModelSpec:
    if not isinstance(fields, dict):
        raise ModelFileError(f"{path} has no spec in its header")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ModelSpec)})
    if unknown:
        raise ModelFileError(f"{path} has spec fields this fhmv_jax does not know: {unknown}")
    try:
        return ModelSpec(**{k: _as_tuples(v) for k, v in fields.items()})
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path} has an invalid spec: {error}") from None


def _read_array(name: str, entry: Any, shape: tuple[int, ...], payload: memoryview, path) -> np.ndarray:
    """One parameter array, checked against the header entry and the spec's shape."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES or entry.get("shape") != list(shape):
        raise ModelFileError(
            f"{path}: parameter {name} is stored as {entry}, the spec needs shape {list(shape)} in one of {_DTYPES}"
        )
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    offset, nbytes = entry.get("offset"), entry.get("nbytes")
    if not isinstance(offset, int) or not isinstance(nbytes, int) or nbytes != math.prod(shape) * dtype.itemsize:
        raise ModelFileError(f"{path}: parameter {name} has an invalid offset or size in {entry}")
    if offset < 0 or offset + nbytes > len(payload):
        raise ModelFileError(f"{path}: parameter {name} lies outside the {len(payload)}-byte payload")
    array = np.frombuffer(payload[offset : offset + nbytes], dtype=dtype).reshape(shape).astype(dtype.name)
    if not np.all(np.isfinite(array)):
        raise ModelFileError(f"{path}: parameter {name} has non-finite values")
    if array.dtype == np.float64 and not jax.config.jax_enable_x64:
        raise ModelFileError(
            f"{path}: parameter {name} is float64 but JAX float64 is disabled (jax_enable_x64); call"
            " fhmv_jax.enable_x64() to load the model bit-identically, then cast with FHMV.astype"
        )
    return array


def _read_params(header: dict, spec: ModelSpec, payload: memoryview, path) -> dict[str, np.ndarray | None]:
    """Every stored parameter array, checked against the spec's layout (``raw_layout``)."""
    entries = header.get("params")
    layout = raw_layout(spec)
    names = [e.get("name") if isinstance(e, dict) else None for e in entries] if isinstance(entries, list) else None
    if names is None or sorted(map(str, names)) != sorted(layout):
        raise ModelFileError(f"{path}: the parameter layout lists {names}, expected the fields {list(layout)}")
    arrays = {}
    for entry in entries:
        name, shape = entry["name"], layout[entry["name"]]
        if (entry.get("array") is None) != (shape is None):
            raise ModelFileError(
                f"{path}: parameter {name} is {'absent' if entry.get('array') is None else 'present'}"
                f" but the saved spec {'uses' if shape is not None else 'does not use'} it"
            )
        arrays[name] = None if shape is None else _read_array(name, entry["array"], shape, payload, path)
    return arrays


def load(path: str | os.PathLike) -> SavedModel:
    """Load a model saved by ``save``; every check passes before the model is built.

    Args:
        path: the model file.

    Returns:
        ``SavedModel(model, metadata, library_version, format_version)``.

    Raises:
        ModelFileError: a missing, truncated, corrupted, foreign or future-version file, or
            parameters that do not fit the saved spec; the message names the problem.
    """
    if not os.path.isfile(path):
        raise ModelFileError(f"no model file at {path}")
    data = Path(path).read_bytes()
    version, header, start = _read_header(data, path)
    payload = _check_payload(data, header, start, path)
    spec = _read_spec(header.get("spec"), path)
    arrays = _read_params(header, spec, payload, path)
    metadata = header.get("metadata")
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path} has metadata that is not a JSON object")
    try:
        model = FHMV.from_raw_arrays(spec, {k: as_array(a) for k, a in arrays.items()})
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: the parameters do not fit the saved spec ({error})") from None
    return SavedModel(model, metadata, str(header.get("library_version")), version)
