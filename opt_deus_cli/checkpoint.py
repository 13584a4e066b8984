"""Reading tensors from a Hugging Face safetensors checkpoint, and writing one in Hugging Face's
layout, shard by shard, in order.

Reading: safetensors validates every shard's header when it is opened; each tensor's byte range
is then known, so a tensor is read into memory of its own only when needed (pread, freed when
dropped), and a tensor that goes to the output unchanged is never read at all: its bytes are
copied file to file by the kernel (os.copy_file_range, as `cp` does).

Writing: safetensors' own writer needs every tensor of a shard in memory at once (5 GB for a
default shard). Because every output shape and dtype is known from the plan before a byte is
written, the header of each shard is written first and tensors are then streamed into it in
order; the file format (8-byte little-endian header length, JSON header, raw data) is fixed by
the safetensors spec, and every written shard is re-opened with safetensors to check it.
Checksums are computed from the bytes as they are written (copied ranges through a read-only
memory map of the source, unmapped chunk by chunk, so memory does not grow with the model).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from concurrent.futures import ThreadPoolExecutor
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
    except OSError as e:
        raise OptDeusError(f"cannot read {path}: {e.strerror or e}")
    if not isinstance(config, dict) or "model_type" not in config:
        raise OptDeusError(f"{path} has no 'model_type'; opt-deus needs it to know the architecture")
    if not isinstance(config["model_type"], str):
        raise OptDeusError(f"{path}: 'model_type' must be a string like \"llama\", got {config['model_type']!r}")
    if config.get("quantization_config"):
        raise OptDeusError(f"{path} describes a quantized checkpoint; opt-deus needs unquantized weights (dequantize first)")
    return config


def _inside(model_dir: Path, name: str) -> Path:
    """The shard file `name` inside model_dir; refuses names that leave it (../, absolute, symlinks)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts or "/" in name or "\\" in name:
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
            raise OptDeusError(f"{path} is not a safetensors file or is truncated: header of {size} bytes in a file of {file_size}")
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
        need = TensorMeta(DTYPE_CODES[code], shape).nbytes
        if end - begin != need:
            raise OptDeusError(f"header of {path} lies about tensor {name}: {end - begin} bytes for shape {list(shape)} {code}, which needs {need}")
        if end > data_size:
            raise OptDeusError(f"tensor {name} in {path} needs bytes up to {end} of the data but the file holds {data_size}; it is truncated")
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
                raise OptDeusError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted")
            for name, where in self.weight_map.items():
                if where == shard and name not in checked:
                    raise OptDeusError(f"index says tensor {name} is in {shard}, but that shard does not hold it")
            for name, (code, shape) in checked.items():
                if self.weight_map.get(name) != shard:
                    continue
                if code not in DTYPE_CODES:
                    raise OptDeusError(f"tensor {name} has dtype {code}, which opt-deus cannot handle")
                meta = TensorMeta(DTYPE_CODES[code], shape)
                begin, end = header[name]["data_offsets"]
                if end - begin != meta.nbytes:
                    raise OptDeusError(f"header of {shard} gives tensor {name} {end - begin} bytes, its shape needs {meta.nbytes}")
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
                raise OptDeusError(f"{index} is not a valid safetensors index ({e}); re-save the model with save_pretrained")
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
                raise OptDeusError(f"{single} is not a readable safetensors file ({e}); it may be truncated or corrupted")
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
        meta = self._meta[name]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
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

    Call write(name, tensor) or copy_raw(...) for every planned tensor in order, then finish().
    Each file's sha256 is computed from the bytes as they are written, on a thread of its own
    (hashlib releases the GIL) so hashing overlaps the copying; one worker keeps the order."""

    def __init__(self, directory: Path, entries: list[tuple[str, TensorMeta]], max_shard_bytes: int):
        self.dir = Path(directory)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self._order = [(i, name, meta) for i, shard in enumerate(self.shards) for name, meta in shard]
        self._pos = 0
        self._file = None
        self._hash = None
        self._shard = -1
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self._pending = []  # futures of hashing work, checked for errors at finish()
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
        self._pending.append(self._hasher.submit(self._hash.update, data))  # holds `data` until hashed

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        size, name, hasher = self._file.tell(), self.file_names[self._shard], self._hash
        self._file.close()
        self._file = None
        self._pending.append(self._hasher.submit(lambda: self.digests.__setitem__(name, (size, hasher.hexdigest()))))

    def _next(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Check that `name` is the next planned tensor and open its shard if needed."""
        shard, expected, meta = self._order[self._pos]
        if name != expected or dtype != meta.dtype or shape != meta.shape:
            raise RuntimeError(f"writer expected {expected} {meta}, got {name} {dtype} {shape}")
        if shard != self._shard:
            if self._file is not None:
                self._close_shard()
            self._open_shard(shard)
        self._pos += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next(name, tensor.dtype, tuple(tensor.shape))
        # raw little-endian bytes of the tensor, without a copy when it is contiguous
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._put(memoryview(data))

    def copy_raw(self, name: str, meta: TensorMeta, fd: int, offset: int, nbytes: int) -> None:
        """Append bytes of an input file unchanged: copied by the kernel, hashed through a map."""
        self._next(name, meta.dtype, meta.shape)
        self._file.flush()
        out_fd, done = self._file.fileno(), 0
        while done < nbytes:
            n = os.copy_file_range(fd, out_fd, nbytes - done, offset + done)
            if n <= 0:
                raise OSError(f"copy of {name} stopped at {done} of {nbytes} bytes")
            done += n
        self._file.seek(0, os.SEEK_END)
        self._pending.append(self._hasher.submit(hash_range, self._hash, fd, offset, nbytes))

    def finish(self) -> dict[str, str]:
        """Close the last shard, check every shard reads back, write the index; returns weight_map."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer got {self._pos} of {len(self._order)} tensors")
        if self._file is not None:
            self._close_shard()
        for future in self._pending:
            future.result()  # re-raises a hashing error
        self._pending.clear()
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
        """Stop: close the open file and the hashing thread (finish() or not)."""
        try:
            if self._file is not None:
                self._file, file = None, self._file
                file.close()
        finally:
            self._hasher.shutdown(wait=True, cancel_futures=True)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


HASH_CHUNK = 1 << 26  # 64 MiB of a file mapped at a time


def hash_range(hasher, fd: int, offset: int, nbytes: int) -> None:
    """Feed bytes [offset, offset + nbytes) of a file to `hasher` through read-only maps of
    HASH_CHUNK bytes, each unmapped at once: no copy to user space, and no growth of memory."""
    end = offset + nbytes
    while offset < end:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps start page-aligned
        length = min(end, start + HASH_CHUNK) - start
        with mmap.mmap(fd, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ, offset=start) as mapped:
            with memoryview(mapped) as view:
                hasher.update(view[offset - start:length])
        offset = start + length


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    size = path.stat().st_size
    if size:
        fd = os.open(path, os.O_RDONLY)
        try:
            hash_range(hasher, fd, 0, size)
        finally:
            os.close(fd)
    return hasher.hexdigest()
