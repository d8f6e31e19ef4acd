"""Raw tensor sources: safetensors files read lazily (no mmap, so reading K models tensor by
tensor keeps resident memory bounded) and torch state dicts (``.pt`` / ``.bin``, torch imported
lazily)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import numpy as np

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _st_dtype(name: str, file: Path, key: str):
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(_ST_DTYPES[name])
    except KeyError:
        raise ValueError(f"{file}: tensor {key!r} has unsupported dtype {name}") from None


class SafetensorsSource:
    """Tensors of one or more ``.safetensors`` files, read one at a time."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._entries: dict[str, tuple[Path, int, tuple[int, ...], np.dtype]] = {}
        for f in self.files:
            for key, (offset, shape, dtype) in _read_header(f).items():
                if key in self._entries:
                    raise ValueError(f"{f}: tensor {key!r} appears in more than one shard")
                self._entries[key] = (f, offset, shape, dtype)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][2]

    def dtype(self, key: str) -> str:
        return self._entries[key][3].name

    def span(self, key: str) -> tuple[Path, int, tuple[int, ...], np.dtype]:
        """Where tensor ``key`` lies: ``(file, byte offset, shape, dtype)``; its bytes are the
        C-order array (for readers that take a tensor in pieces, e.g. cache-sized chunks)."""
        return self._entries[key]

    def get(self, key: str, scratch: bool = False) -> np.ndarray:
        """One tensor. ``scratch=True`` reads into this thread's reusable buffer: the result is
        only valid until the next ``scratch`` read (for callers that convert it at once; fresh
        pages cost more than the read itself on this kind of VM)."""
        f, offset, shape, dtype = self._entries[key]
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self._scratch(n) if scratch else np.empty(n, np.uint8)
        with open(f, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != n:
                raise ValueError(f"{f}: truncated while reading tensor {key!r}")
        return buf.view(dtype).reshape(shape)

    def read_into(self, key: str, out: np.ndarray) -> bool:
        """Read tensor ``key`` straight into ``out`` (C-contiguous, the tensor's shape and
        dtype): one kernel copy, no user-space one. False (nothing read) when it does not fit."""
        f, offset, shape, dtype = self._entries[key]
        if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous \
                or not out.flags.writeable:
            return False
        n = out.nbytes
        with open(f, "rb") as fh:
            fh.seek(offset)
            if n and fh.readinto(memoryview(out.reshape(-1)).cast("B")) != n:
                raise ValueError(f"{f}: truncated while reading tensor {key!r}")
        return True

    def _scratch(self, n: int) -> np.ndarray:
        local = self.__dict__.setdefault("_local", threading.local())
        buf = getattr(local, "buf", None)
        if buf is None or buf.size < n:
            buf = local.buf = np.empty(max(n, 1 << 20), np.uint8)
        return buf[:n]


def _read_header(file: Path) -> dict[str, tuple[int, tuple[int, ...], np.dtype]]:
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: not a safetensors file (only {len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or 8 + n > size:
            raise ValueError(f"{file}: not a safetensors file or truncated (header length {n}, "
                             f"file size {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{file}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file (header is not a JSON object)")
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
            dtype = _st_dtype(meta["dtype"], file, key)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and "unsupported dtype" in str(e):
                raise
            raise ValueError(f"{file}: malformed safetensors entry for {key!r}") from None
        if 8 + n + end > size:
            raise ValueError(f"{file}: truncated (tensor {key!r} ends at byte {8 + n + end}, "
                             f"file has {size})")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{file}: tensor {key!r} byte range does not match shape {shape}")
        out[key] = (8 + n + begin, shape, dtype)
    return out


class DictSource:
    """An in-memory state dict of numpy arrays (from torch files). ``torchscript``: it came
    from a TorchScript archive (OpenAI's released ``.pt`` files, which are QuickGELU models)."""

    def __init__(self, tensors: dict[str, np.ndarray], file: Path, *, torchscript: bool = False):
        self.files = [Path(file)]
        self._t = tensors
        self.torchscript = torchscript

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> str:
        return self._t[key].dtype.name

    def get(self, key: str, scratch: bool = False) -> np.ndarray:
        del scratch  # already in memory
        return self._t[key]


def load_torch_file(file: Path, *, allow_pickle: bool = False) -> DictSource:
    """A ``.pt``/``.bin``: a state dict, an OpenAI TorchScript archive, or (with ``allow_pickle``)
    a whole pickled module such as the task_vectors / TSV checkpoints."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{file}: reading torch files needs torch "
                          "(pip install torch==2.13.0, or the larv_jax[torch] extra)") from None
    obj = None
    torchscript = _is_torchscript(file)
    try:
        if torchscript:  # torch.load would only warn and dispatch to torch.jit.load
            obj = torch.jit.load(str(file), map_location="cpu").state_dict()
        else:
            obj = torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except RuntimeError as e:
        if "TorchScript" in str(e) or "constants.pkl" in str(e):
            obj = torch.jit.load(str(file), map_location="cpu").state_dict()
            torchscript = True
        else:
            raise ValueError(f"{file}: cannot read torch file ({e})") from None
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError and others)
        if not allow_pickle and "weights_only" in str(e):
            raise ValueError(
                f"{file}: this is a pickled module, not a state dict (task_vectors / TSV style). "
                "Re-run with --allow-pickle if you trust the file (it executes code and needs the "
                "original source modules importable), or save model.state_dict() first.") from None
        raise ValueError(f"{file}: cannot read torch file ({type(e).__name__}: {e})") from None
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a state dict, found {type(obj).__name__}")
    tensors = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            continue
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        tensors[k] = v.numpy()
    return DictSource(_strip_common_prefix(tensors), file, torchscript=torchscript)


def _is_torchscript(file: Path) -> bool:
    """A TorchScript archive (OpenAI's released ``.pt`` files): a zip holding
    ``<name>/constants.pkl`` and ``<name>/code/``, which a plain ``torch.save`` never writes."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _strip_common_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in ("module.", "model."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


_NP_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
             "bool": "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (C-contiguous numpy arrays) as a ``.safetensors`` file, streaming.

    The format: an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
    ``data_offsets`` per tensor, optional ``__metadata__``) padded with spaces to a multiple of
    8 bytes, then the raw little-endian data in header order. Unlike ``safetensors.numpy``'s
    ``save_file``, nothing is copied into one big ``bytes`` object first.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        a = tensors[key]
        if not a.flags.c_contiguous:
            raise ValueError(f"tensor {key!r} is not C-contiguous")
        name = _NP_TO_ST.get(a.dtype.name)
        if name is None:
            raise ValueError(f"tensor {key!r} has unsupported dtype {a.dtype}")
        if a.dtype.byteorder == ">":
            raise ValueError(f"tensor {key!r} is big-endian")
        header[key] = {"dtype": name, "shape": list(a.shape),
                       "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            if a.size:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))  # raw bytes, any dtype
