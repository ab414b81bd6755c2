"""Saving and loading: bit-identical round trips, named errors on bad files, atomic writes."""

import hashlib
import io as bytes_io
import json
import struct
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural

import fhmv_jax
from fhmv_jax import io
from fhmv_jax.model.examples import example_model
from fhmv_jax.model.fhmv import raw_layout

DATA = Path(__file__).parent / "data"

EXTRA_SPECS = {
    "no-chains-driver": fhmv_jax.ModelSpec(
        num_features=3, num_regimes=3, num_chains=0, num_jump_states=2, num_components=1, driver_feature=2
    ),
    "no-jumps-family": fhmv_jax.ModelSpec(
        num_features=2,
        num_regimes=2,
        num_chains=2,
        num_jump_states=1,
        num_components=2,
        jump_mode="family",
        leverage="predictable",
        num_leverage_lags=1,
        dof_bounds=(3, 50),
    ),
    "family-student": fhmv_jax.ModelSpec(
        num_features=2,
        num_regimes=2,
        num_chains=1,
        num_jump_states=4,
        num_components=1,
        jump_mode="family",
        scale_mask=(False, True),
        tied_persistence=False,
    ),
}


class ParsedFile:
    """A model file split by an independent reader: preamble, header, payload, each digest checked."""

    def __init__(self, data: bytes):
        magic, self.version, length = struct.unpack_from("<8sIQ", data)
        assert magic == b"FHMVJAX\x00"
        end = 20 + length
        assert hashlib.sha256(data[:end]).digest() == data[end : end + 32]
        assert hashlib.sha256(data[:-32]).digest() == data[-32:]
        self.header_end = end
        self.header = json.loads(data[20:end])
        self.payload = data[end + 32 : -32]

    def build(self, version=None) -> bytes:
        """The file's bytes again, with valid digests, after the caller edited the fields."""
        header = json.dumps(self.header).encode()
        head = struct.pack("<8sIQ", b"FHMVJAX\x00", self.version if version is None else version, len(header)) + header
        body = head + hashlib.sha256(head).digest() + self.payload
        return body + hashlib.sha256(body).digest()


@pytest.fixture(scope="module")
def model():
    return example_model(jax.random.key(0))


@pytest.fixture
def saved(tmp_path, model):
    path = fhmv_jax.save(tmp_path / "m.fhmv", model, note="x")
    return path, path.read_bytes()


def _assert_same_leaves(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_identical_with_identical_filtering(tmp_path, model):
    sample = model.sample(jax.random.key(1), 200)
    metadata = {
        "regime_names": ["ST", "VT", "RC", "RHA", "HPEM", "AMB"],
        "standardizer": {"mean": np.arange(3.0), "scale": jnp.ones(2), "count": np.int64(7)},
        "training": {"iterations": 12, "converged": np.bool_(True), "history": (1.5, -2.0), "note": None},
        "scalar": np.float32(1.5),
    }
    path = fhmv_jax.save(tmp_path / "m.fhmv", model, **metadata)
    result = fhmv_jax.load(path)
    assert isinstance(result, fhmv_jax.SavedModel)
    assert result.model.spec == model.spec
    _assert_same_leaves(result.model, model)
    assert result.metadata == {
        "regime_names": metadata["regime_names"],
        "standardizer": {"mean": [0.0, 1.0, 2.0], "scale": [1.0, 1.0], "count": 7},
        "training": {"iterations": 12, "converged": True, "history": [1.5, -2.0], "note": None},
        "scalar": 1.5,
    }
    assert result.format_version == io.FORMAT_VERSION == 1 and result.library_version == fhmv_jax.__version__
    before = model.filter(sample.observations, sample.driver)
    after = result.model.filter(sample.observations, sample.driver)
    np.testing.assert_array_equal(before.joint, after.joint)
    np.testing.assert_array_equal(before.marginals.regime, after.marginals.regime)
    assert float(before.log_likelihood) == float(after.log_likelihood)


def test_file_layout_matches_the_documented_format(saved, model):
    _, data = saved
    parsed = ParsedFile(data)
    header = parsed.header
    assert parsed.version == 1 and header["format"] == "fhmv_jax.model" and header["format_version"] == 1
    assert fhmv_jax.ModelSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in header["spec"].items()}) == (
        model.spec
    )
    assert header["metadata"] == {"note": "x"} and header["payload_nbytes"] == len(parsed.payload)
    arrays = model.raw_arrays()
    for entry in header["params"]:
        value = arrays[entry["name"]]
        if value is None:
            assert entry["array"] is None
            continue
        layout = entry["array"]
        stored = parsed.payload[layout["offset"] : layout["offset"] + layout["nbytes"]]
        assert stored == np.asarray(value).astype("<f8").tobytes() and layout["shape"] == list(value.shape)


@pytest.mark.parametrize("name", sorted(TINY_SPECS) + sorted(EXTRA_SPECS))
def test_round_trip_for_every_spec_variant(tmp_path, name, rng):
    spec = {**TINY_SPECS, **EXTRA_SPECS}[name]
    model = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    arrays = model.raw_arrays()
    assert list(arrays) == list(raw_layout(spec)) == list(RELEASE_0_1_0_LAYOUT)
    fhmv_jax.save(tmp_path / "m.fhmv", model, spec_name=name)
    result = fhmv_jax.load(tmp_path / "m.fhmv")
    assert result.model.spec == spec and result.metadata == {"spec_name": name}
    _assert_same_leaves(result.model, model)
    for field, shape in raw_layout(spec).items():
        value = arrays[field]
        assert (value is None) if shape is None else value.shape == shape


RELEASE_0_1_0_LAYOUT = ("initial_logits", "transition_logits", "log_weights", "means", "chol_raw", "dof_raw",
                        "persistence_raw", "c1_raw", "theta_c_raw", "jump_q_raw", "jump_back_raw", "jump_phi_raw",
                        "m1_raw", "theta_m_raw", "l1_raw", "theta_l_raw", "leverage_raw")
"""The arrays of a model file as release 0.1.0 (one flat parameter module) wrote them."""


@pytest.mark.parametrize("name", ["markov", "family-mask-gaussian"])
def test_files_written_by_release_0_1_0_load_and_are_written_identically(tmp_path, name):
    """Files that release 0.1.0 wrote (tests/data; its model from the recorded natural parameters) load
    with the same natural parameters, and saving that model now writes the same bytes."""
    recorded = np.load(DATA / "reference_numbers.npz", allow_pickle=False)
    natural = {k.split("input.", 1)[1]: recorded[k] for k in recorded.files if k.startswith(f"{name}/input.")}
    model = fhmv_jax.FHMV.from_natural_parameters(TINY_SPECS[name], **natural)
    old_file = DATA / f"release-0.1.0-{name}.fhmv"
    loaded = fhmv_jax.load(old_file)
    assert loaded.library_version == "0.1.0" and loaded.metadata == {"spec_name": name}
    _assert_same_leaves(loaded.model, model)
    fhmv_jax.save(tmp_path / "now.fhmv", model, spec_name=name)
    assert (tmp_path / "now.fhmv").read_bytes() == old_file.read_bytes()


def test_float32_model_stays_float32(tmp_path, model):
    small = model.astype(jnp.float32)
    fhmv_jax.save(tmp_path / "m.fhmv", small)
    loaded = fhmv_jax.load(tmp_path / "m.fhmv").model
    assert loaded.dtype == jnp.float32
    _assert_same_leaves(loaded, small)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"info": {"when": object()}}, r"metadata\.info\.when: a object is not JSON-serialisable"),
        ({"names": ["a", {1, 2}]}, r"metadata\.names\[1\]: a set is not JSON-serialisable"),
        ({"score": float("nan")}, r"metadata\.score: nan is not representable"),
        ({"scale": np.array([1.0, np.inf])}, r"metadata\.scale\[1\]: inf is not representable"),
        ({"table": {3: "x"}}, r"metadata\.table: dictionary key 3 is not a string"),
        ({"raw": b"bytes"}, r"metadata\.raw: a bytes is not JSON-serialisable"),
    ],
)
def test_metadata_must_be_json(tmp_path, model, metadata, message):
    with pytest.raises(TypeError, match=message):
        fhmv_jax.save(tmp_path / "m.fhmv", model, **metadata)
    assert list(tmp_path.iterdir()) == []


def test_models_that_cannot_be_stored_are_refused(tmp_path, model):
    broken = eqx.tree_at(lambda m: m.emission.means, model, model.emission.means.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="parameter means has non-finite values"):
        fhmv_jax.save(tmp_path / "m.fhmv", broken)
    half = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), model)
    with pytest.raises(ValueError, match="parameter initial_logits has dtype float16"):
        fhmv_jax.save(tmp_path / "m.fhmv", half)
    with pytest.raises(TypeError, match="expects an FHMV model"):
        fhmv_jax.save(tmp_path / "m.fhmv", {"not": "a model"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        ("magic", "ends inside the magic bytes"),
        ("preamble", "ends inside the preamble"),
        ("header", "truncated or its header length is corrupted"),
        ("header_digest", "truncated or its header length is corrupted"),
        ("half", "truncated: its payload and checksum need"),
        ("payload_start", "truncated: its payload and checksum need"),
        ("last_byte", "truncated: its payload and checksum need"),
    ],
)
def test_truncated_files_are_named(saved, cut, message):
    path, data = saved
    header_end = ParsedFile(data).header_end
    end = {
        "magic": 4,
        "preamble": 12,
        "header": header_end - 20,
        "header_digest": header_end + 31,
        "half": len(data) // 2,
        "payload_start": header_end + 32,
        "last_byte": len(data) - 1,
    }[cut]
    path.write_bytes(data[:end])
    with pytest.raises(io.ModelFileError, match=message):
        fhmv_jax.load(path)


def test_every_flipped_byte_is_detected(saved):
    path, data = saved
    header_end = ParsedFile(data).header_end
    payload_end = len(data) - 32
    positions = sorted(
        {*range(header_end + 40), *range(header_end + 32, payload_end, 7), *range(payload_end, len(data))}
    )
    for position in positions:
        corrupt = bytearray(data)
        corrupt[position] ^= 0x10 if position % 2 else 0x01
        path.write_bytes(bytes(corrupt))
        header = position < header_end + 32
        where = (
            "wrong magic"
            if position < 8
            else "corrupted header|header length is corrupted"
            if header
            else "corrupted payload"
        )
        with pytest.raises(io.ModelFileError, match=where):
            fhmv_jax.load(path)


def _mkdir_pickle(marker) -> bytes:
    """A protocol-0 pickle stream that would call os.mkdir(marker) if it were ever unpickled."""
    return b"cos\nmkdir\n(V" + str(marker).encode() + b"\ntR."


def test_foreign_files_are_refused_without_executing_them(tmp_path):
    marker = tmp_path / "unpickled"
    archive = bytes_io.BytesIO()
    np.savez(archive, means=np.zeros(3))
    foreign = {
        "empty.fhmv": (b"", "is empty"),
        "image.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "not an fhmv_jax model file"),
        "arrays.npz": (archive.getvalue(), "not an fhmv_jax model file"),
        "model.pkl": (_mkdir_pickle(marker), "not an fhmv_jax model file"),
        "text.fhmv": (b"FHMVJAX is a library", "not an fhmv_jax model file"),
    }
    for name, (data, message) in foreign.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(io.ModelFileError, match=message):
            fhmv_jax.load(tmp_path / name)
    assert not marker.exists()
    with pytest.raises(io.ModelFileError, match="no model file at"):
        fhmv_jax.load(tmp_path / "missing.fhmv")
    with pytest.raises(io.ModelFileError, match="no model file at"):
        fhmv_jax.load(tmp_path)


def test_future_format_version_is_named(saved):
    path, data = saved
    parsed = ParsedFile(data)
    parsed.header["format_version"] = 7
    parsed.header["new_field"] = "from the future"
    parsed.payload = b"a layout this library does not know"
    path.write_bytes(parsed.build(version=7))
    with pytest.raises(io.ModelFileError, match="format version 7; this fhmv_jax reads format versions up to 1"):
        fhmv_jax.load(path)


def _set(mapping, key, value):
    mapping[key] = value


def _param(parsed, name):
    return next(e for e in parsed.header["params"] if e["name"] == name)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: _set(p.header, "format", "other"), "not a version-1 fhmv_jax.model header"),
        (lambda p: _set(p.header, "format_version", 2), "not a version-1 fhmv_jax.model header"),
        (lambda p: _set(p.header["spec"], "colour", "red"), r"spec fields this fhmv_jax does not know: \['colour'\]"),
        (lambda p: _set(p.header["spec"], "leverage", "sideways"), "invalid spec: ModelSpec.leverage must be one of"),
        (lambda p: _set(p.header["spec"], "num_regimes", 5), r"initial_logits is stored as .* needs shape \[5\]"),
        (lambda p: _set(p.header["spec"], "gaussian", True), "dof_raw is present but the saved spec does not use it"),
        (
            lambda p: _set(p.header["spec"], "leverage", "predictable"),
            "theta_l_raw is absent but the saved spec uses it",
        ),
        (lambda p: _set(_param(p, "means")["array"], "dtype", "int64"), "parameter means is stored as"),
        (lambda p: _set(_param(p, "means")["array"], "nbytes", 8), "means has an invalid offset or size"),
        (lambda p: _set(_param(p, "means")["array"], "offset", 10**6), "means lies outside the"),
        (lambda p: p.header["params"].pop(), "the parameter layout lists"),
        (lambda p: _set(p.header, "payload_nbytes", p.header["payload_nbytes"] - 8), "8 unexpected bytes after"),
        (lambda p: _set(p.header, "metadata", [1, 2]), "metadata that is not a JSON object"),
        (lambda p: setattr(p, "payload", p.payload[:-8] + struct.pack("<d", np.nan)), "has non-finite values"),
    ],
)
def test_inconsistent_files_with_valid_checksums_are_named(saved, edit, message):
    path, data = saved
    parsed = ParsedFile(data)
    edit(parsed)
    path.write_bytes(parsed.build())
    with pytest.raises(io.ModelFileError, match=message):
        fhmv_jax.load(path)


def _crash(*args, **kwargs):
    raise OSError("simulated crash")


@pytest.mark.parametrize("target", ["replace", "fsync"])
def test_crash_during_save_keeps_the_previous_file(tmp_path, model, monkeypatch, target):
    path = fhmv_jax.save(tmp_path / "m.fhmv", model, version=1)
    previous = path.read_bytes()
    monkeypatch.setattr(io.os, target, _crash)
    with pytest.raises(OSError, match="simulated crash"):
        fhmv_jax.save(path, example_model(jax.random.key(5)), version=2)
    monkeypatch.undo()
    assert path.read_bytes() == previous
    result = fhmv_jax.load(path)
    assert result.metadata == {"version": 1}
    _assert_same_leaves(result.model, model)
    assert [p.name for p in tmp_path.iterdir()] == ["m.fhmv"]


def test_save_replaces_an_existing_file(tmp_path, model):
    path = fhmv_jax.save(tmp_path / "m.fhmv", model, version=1)
    other = example_model(jax.random.key(5))
    fhmv_jax.save(str(path), other, version=2)
    result = fhmv_jax.load(str(path))
    assert result.metadata == {"version": 2}
    _assert_same_leaves(result.model, other)
    assert [p.name for p in tmp_path.iterdir()] == ["m.fhmv"]


def test_save_into_a_missing_directory_raises(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="directory .*nope does not exist"):
        fhmv_jax.save(tmp_path / "nope" / "m.fhmv", model)
    assert list(tmp_path.iterdir()) == []
