"""Reading tensors from a Hugging Face safetensors checkpoint (writing one: shards.py).

Reading: safetensors validates every shard's header when it is opened; each tensor's byte range
is then known, so a tensor is read into memory of its own only when needed (pread, freed when
dropped), and a tensor that goes to the output unchanged is never read at all: its bytes are
copied file to file by the kernel (os.copy_file_range, as `cp` does).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .dtypes import DTYPE_CODES, torch_dtype
from .errors import OptDeusError
from .hashing import Hashing, HashStream, sha256_file  # noqa: F401  (sha256_file: readers of checksums import it from here)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".h5", ".msgpack", ".gguf", ".onnx") + PICKLE_SUFFIXES  # never side files

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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
        raise OptDeusError(f"{path} is not valid JSON ({e}); restore it from the model's source") from e
    except OSError as e:
        raise OptDeusError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise OptDeusError(f"{path} has no 'model_type'; opt-deus needs it to know the architecture")
    if not isinstance(config["model_type"], str):
        raise OptDeusError(f"{path}: 'model_type' must be a string like \"llama\", got {config['model_type']!r}")
    if config.get("quantization_config"):
        raise OptDeusError(
            f"{path} describes a quantized checkpoint; opt-deus needs unquantized weights (dequantize first)"
        )
    return config


def _inside(model_dir: Path, name: str) -> Path:
    """The shard file `name` inside model_dir; refuses names that leave it (../, absolute, symlinks)."""
    if (
        not isinstance(name, str)
        or not name
        or os.path.isabs(name)
        or ".." in Path(name).parts
        or "/" in name
        or "\\" in name
    ):
        raise OptDeusError(f"index names shard {name!r}, which is not a plain file name inside {model_dir}; refusing")
    return _no_escape(model_dir, model_dir / name)


def _no_escape(model_dir: Path, path: Path) -> Path:
    """`path`, unless it is a symlink leaving model_dir."""
    if path.is_symlink():
        target, home = path.resolve(), model_dir.resolve()
        # the Hugging Face hub cache links snapshots/<revision>/<file> to ../../blobs/<hash>
        blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
        if not (target.is_relative_to(home) or (blobs is not None and target.parent == blobs)):
            raise OptDeusError(f"{path.name} is a symlink leaving {model_dir} (to {target}); refusing")
    return path


MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts, checked
    tensor by tensor so that a problem names the tensor: known dtype, byte range matching the
    shape, inside the file (a truncated file ends before its last tensors)."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        size = int.from_bytes(f.read(8), "little")
        if file_size < 8 or size > min(MAX_HEADER, file_size - 8):
            raise OptDeusError(
                f"{path} is not a safetensors file or is truncated: header of {size} bytes in a file of {file_size}"
            )
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise OptDeusError(f"{path}: safetensors header is not a JSON object")
    data_size = file_size - 8 - size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise OptDeusError(f"{path}: header entry of tensor {name} is malformed: {info!r}")
        if code not in DTYPE_CODES:
            raise OptDeusError(f"tensor {name} in {path} has dtype {code}, which opt-deus cannot handle")
        need = math.prod(shape) * DTYPE_CODES[code][1]
        if end - begin != need:
            raise OptDeusError(
                f"header of {path} lies about tensor {name}: {end - begin} bytes for shape {list(shape)} {code}, which needs {need}"
            )
        if end > data_size:
            raise OptDeusError(
                f"tensor {name} in {path} needs bytes up to {end} of the data but the file holds {data_size}; it is truncated"
            )
    return header, 8 + size


class Checkpoint:
    """A model directory: config.json plus model.safetensors or a sharded index."""

    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        self.config = read_config(self.dir)
        self.weight_map = self._weight_map()
        self.files()  # refuse a symlink leaving the directory now, not once the shards are written
        self._meta: dict[str, TensorMeta] = {}
        self._where: dict[str, tuple[str, int]] = {}  # name -> (shard, absolute byte offset)
        self._fds: dict[str, int] = {}
        for shard in sorted(set(self.weight_map.values())):
            path = _inside(self.dir, shard)
            try:  # our check names the tensor at fault; safetensors' own check then covers the rest
                header, data_start = read_header(path)
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    checked = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in f.keys()}
            except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
                raise OptDeusError(
                    f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted"
                ) from e
            for name, where in self.weight_map.items():
                if where == shard and name not in checked:
                    raise OptDeusError(f"index says tensor {name} is in {shard}, but that shard does not hold it")
            for name, (code, shape) in checked.items():
                if self.weight_map.get(name) != shard:
                    continue
                if code not in DTYPE_CODES:
                    raise OptDeusError(f"tensor {name} has dtype {code}, which opt-deus cannot handle")
                meta = TensorMeta(torch_dtype(code), shape)
                begin, end = header[name]["data_offsets"]
                if end - begin != meta.nbytes:
                    raise OptDeusError(
                        f"header of {shard} gives tensor {name} {end - begin} bytes, its shape needs {meta.nbytes}"
                    )
                self._meta[name] = meta
                self._where[name] = (shard, data_start + begin)

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not a mapping of tensor names to file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as e:
                raise OptDeusError(
                    f"{index} is not a valid safetensors index ({e}); re-save the model with save_pretrained"
                ) from e
            for shard in set(weight_map.values()):
                if not _inside(self.dir, shard).is_file():
                    raise OptDeusError(f"index names shard {shard}, which is missing from {self.dir}")
            return dict(weight_map)
        single = self.dir / SINGLE_FILE
        if single.is_file():
            _inside(self.dir, SINGLE_FILE)  # before opening it: a symlink leaving the directory is refused
            try:
                with safe_open(str(single), framework="pt") as f:
                    return {name: SINGLE_FILE for name in f.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise OptDeusError(
                    f"{single} is not a readable safetensors file ({e}); it may be truncated or corrupted"
                ) from e
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

    def _fd(self, shard: str) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(_inside(self.dir, shard), os.O_RDONLY)
        return self._fds[shard]

    # ---- queries -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def raw(self, name: str) -> tuple[int, int, int]:
        """(open file descriptor, byte offset, byte length) of a tensor's data, for byte copies."""
        shard, offset = self._where[name]
        return self._fd(shard), offset, self._meta[name].nbytes

    def read(self, name: str) -> torch.Tensor:
        """One tensor in memory of its own (a private copy: safe to modify, freed when dropped)."""
        fd, offset, nbytes = self.raw(name)
        import torch

        meta = self._meta[name]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = buffer.numpy().data  # a memoryview of the tensor's bytes
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OptDeusError(f"cannot read tensor {name}: {self.weight_map[name]} ends early (truncated?)")
            done += got
        return buffer.view(meta.dtype).reshape(meta.shape)

    def files(self) -> list[Path]:
        """Top-level regular files of the model directory, sorted (recorded in the manifest, side
        files copied): a symlink leaving the directory is refused here as for a shard."""
        return sorted(_no_escape(self.dir, p) for p in self.dir.iterdir() if p.is_file())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# ---- writing -----------------------------------------------------------------------------
