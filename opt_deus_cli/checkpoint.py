"""Reading tensors lazily from a Hugging Face safetensors checkpoint, and writing one in Hugging
Face's layout shard by shard.

Reading: the index maps each tensor to its shard; shards are opened with safetensors' memory
map and a tensor is materialised only when asked for, so memory holds what is in use now.

Writing: safetensors' own writer needs every tensor of a shard in memory at once (5 GB for a
default shard). Because every output shape and dtype is known from the plan before a byte is
written, the header of each shard is written first and tensors are then streamed into it in
order; the file format (8-byte little-endian header length, JSON header, raw data) is fixed by
the safetensors spec, and every written shard is re-opened with safetensors to check it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import OptDeusError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype code <-> torch dtype
DTYPE_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODE_OF_DTYPE = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise OptDeusError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise OptDeusError(f"{model_dir} is not a directory; give the folder holding config.json and *.safetensors")
    path = model_dir / "config.json"
    if not path.is_file():
        raise OptDeusError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptDeusError(f"{path} is not valid JSON ({e}); restore it from the model's source")
    if not isinstance(config, dict) or "model_type" not in config:
        raise OptDeusError(f"{path} has no 'model_type'; opt-deus needs it to know the architecture")
    if config.get("quantization_config"):
        raise OptDeusError(f"{path} describes a quantized checkpoint; opt-deus needs unquantized weights (dequantize first)")
    return config


def _inside(model_dir: Path, name: str) -> Path:
    """The shard file `name` inside model_dir; refuses names that leave it (../, absolute, symlinks)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts or "/" in name or "\\" in name:
        raise OptDeusError(f"index names shard {name!r}, which is not a plain file name inside {model_dir}; refusing")
    path = model_dir / name
    if path.is_symlink() and not path.resolve().is_relative_to(model_dir.resolve()):
        raise OptDeusError(f"shard {name} is a symlink leaving {model_dir}; refusing")
    return path


class Checkpoint:
    """A model directory: config.json plus model.safetensors or a sharded index."""

    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        self.config = read_config(self.dir)
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}
        self._meta: dict[str, TensorMeta] = {}
        for shard in sorted(set(self.weight_map.values())):
            handle = self._open(shard)
            names = set(handle.keys())
            for name, where in self.weight_map.items():
                if where == shard and name not in names:
                    raise OptDeusError(f"index says tensor {name} is in {shard}, but that shard does not hold it")
            for name in names:
                if self.weight_map.get(name) == shard:
                    sl = handle.get_slice(name)
                    code = sl.get_dtype()
                    if code not in DTYPE_CODES:
                        raise OptDeusError(f"tensor {name} has dtype {code}, which opt-deus cannot handle")
                    self._meta[name] = TensorMeta(DTYPE_CODES[code], tuple(sl.get_shape()))

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not a mapping")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise OptDeusError(f"{index} is not a valid safetensors index ({e}); re-save the model with save_pretrained")
            for shard in set(weight_map.values()):
                if not _inside(self.dir, shard).is_file():
                    raise OptDeusError(f"index names shard {shard}, which is missing from {self.dir}")
            return dict(weight_map)
        single = self.dir / SINGLE_FILE
        if single.is_file():
            with self._open_file(single) as f:
                return {name: SINGLE_FILE for name in f.keys()}
        shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if shards:
            raise OptDeusError(f"{self.dir} has {', '.join(shards)} but no {INDEX_FILE}; re-save with save_pretrained")
        pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise OptDeusError(
                f"{self.dir} holds only pickle weights ({', '.join(pickles)}); opt-deus never unpickles. "
                "Convert them to safetensors first (load in a trusted environment and save_pretrained(safe_serialization=True))"
            )
        raise OptDeusError(f"{self.dir} has no {SINGLE_FILE} or {INDEX_FILE}")

    @staticmethod
    def _open_file(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise OptDeusError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted")

    def _open(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = self._open_file(_inside(self.dir, shard)).__enter__()
        return self._handles[shard]

    # ---- queries -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def read(self, name: str) -> torch.Tensor:
        """Materialise one tensor (a private copy: safe to modify)."""
        handle = self._open(self.weight_map[name])
        try:
            return handle.get_tensor(name).clone()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise OptDeusError(f"cannot read tensor {name} from {self.weight_map[name]} ({e}); the shard may be corrupted")

    def files(self) -> list[Path]:
        """Top-level regular files of the model directory, sorted (recorded in the manifest)."""
        return sorted(p for p in self.dir.iterdir() if p.is_file())


# ---- writing -----------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (Hugging Face's decimal units; GiB/MiB are binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise OptDeusError(f"shard size {text!r} not understood; write e.g. 5GB, 500MB or 2GiB", exit_code=2)
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise OptDeusError(f"shard size {text!r} must be positive", exit_code=2)
    return size


def plan_shards(entries: list[tuple[str, TensorMeta]], max_bytes: int) -> list[list[tuple[str, TensorMeta]]]:
    """Split tensors, kept in order, into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for name, meta in entries:
        if shards[-1] and size + meta.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += meta.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Streams tensors, in the planned order, into Hugging Face-named shards in `directory`.

    Call write(name, tensor) for every planned tensor in order, then finish(); each file's
    sha256 is computed from the bytes as they are written (no second read)."""

    def __init__(self, directory: Path, entries: list[tuple[str, TensorMeta]], max_shard_bytes: int):
        self.dir = Path(directory)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self._order = [(i, name, meta) for i, shard in enumerate(self.shards) for name, meta in shard]
        self._pos = 0
        self._file = None
        self._hash = None
        self._shard = -1
        self.digests: dict[str, tuple[int, str]] = {}  # file -> (bytes, sha256)

    def _open_shard(self, i: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, meta in self.shards[i]:
            header[name] = {"dtype": CODE_OF_DTYPE[meta.dtype], "shape": list(meta.shape), "data_offsets": [offset, offset + meta.nbytes]}
            offset += meta.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors does
        self._file = open(self.dir / self.file_names[i], "wb")
        self._hash = hashlib.sha256()
        self._shard = i
        self._put(len(raw).to_bytes(8, "little") + raw)

    def _put(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        self._file = None
        self.digests[self.file_names[self._shard]] = (size, self._hash.hexdigest())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected, meta = self._order[self._pos]
        if name != expected or tensor.dtype != meta.dtype or tuple(tensor.shape) != meta.shape:
            raise RuntimeError(f"writer expected {expected} {meta}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if shard != self._shard:
            if self._file is not None:
                self._close_shard()
            self._open_shard(shard)
        # raw little-endian bytes of the tensor, without a copy when it is contiguous
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._put(memoryview(data))
        self._pos += 1

    def finish(self) -> dict[str, str]:
        """Close the last shard, check every shard reads back, write the index; returns weight_map."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer got {self._pos} of {len(self._order)} tensors")
        if self._file is not None:
            self._close_shard()
        weight_map = {}
        for file_name, shard in zip(self.file_names, self.shards):
            with safe_open(str(self.dir / file_name), framework="pt") as f:
                if set(f.keys()) != {name for name, _ in shard}:
                    raise RuntimeError(f"{file_name} does not read back with the planned tensors")
            weight_map.update({name: file_name for name, _ in shard})
        if len(self.file_names) > 1:
            total = sum(meta.nbytes for _, _, meta in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_json(self.dir / INDEX_FILE, index)
        return weight_map

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
