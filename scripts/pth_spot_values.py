#!/usr/bin/env python3
"""Prints elements of tensors of a legacy (pre-zip) PyTorch checkpoint, read with Python's own
pickle module and no torch: an independent check of the Rust loader (tests/weights.rs takes its
EfficientNet-Lite0 spot values from here).

usage: python3 scripts/pth_spot_values.py FILE.pth KEY...
"""
import itertools
import pickle
import struct
import sys

ELEMENT = {"FloatStorage": ("f", 4), "LongStorage": ("q", 8)}


class StateDict(dict):
    pass


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name == "_rebuild_tensor_v2":
            return lambda *args: args
        if name == "OrderedDict":
            return lambda *args: StateDict()
        return (module, name)

    def persistent_load(self, pid):
        return pid  # ('storage', (module, class), key, location, numel, view)


def main(path, keys):
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        sd = Unpickler(f).load()
        order = pickle.load(f)
        storage_class = {v[0][2]: v[0][1][1] for v in sd.values()}
        raw = {}
        for key in order:
            (numel,) = struct.unpack("<q", f.read(8))
            raw[key] = f.read(numel * ELEMENT[storage_class[key]][1])
    for name in keys:
        storage, offset, size, stride = sd[name][:4]
        fmt, width = ELEMENT[storage[1][1]]
        data = raw[storage[2]]
        values = struct.unpack(f"<{len(data) // width}{fmt}", data)
        idx = list(itertools.product(*[range(n) for n in size]))
        picks = sorted({p for p in (0, 1, 2, len(idx) // 2, len(idx) - 1) if p < len(idx)})
        print(name, tuple(size), "stride", tuple(stride))
        for p in picks:
            pos = offset + sum(i * s for i, s in zip(idx[p], stride))
            print(f"  flat {p}: {values[pos]!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
