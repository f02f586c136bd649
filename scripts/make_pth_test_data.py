#!/usr/bin/env python3
"""Writes small PyTorch checkpoints without torch, for the weights loader tests.

Stand-in `torch` modules make `pickle` emit exactly the globals and persistent ids that
`torch.save` emits (`torch._utils._rebuild_tensor_v2`, `('storage', torch.FloatStorage, key,
'cpu', numel)`, …), laid out as torch lays them out:

  legacy.pth     the pre-1.6 stream (magic, protocol, sys info, object, storage keys, storages),
                 reference wrapper {"epoch", "Blip2LightCir"}, DataParallel `module.` keys,
                 plus an optimizer tensor outside the state dict
  legacy_be.pth  the same, big-endian (sys info little_endian=False)
  zip.pth        the torch >= 1.6 zip archive, pickle protocol 2, LAVIS wrapper {"model", ...}
  zip_p4.pth     the zip archive with pickle protocol 4 (FRAME, MEMOIZE, SHORT_BINUNICODE),
                 {"state_dict"} wrapper, `_rebuild_from_type_v2` and `_rebuild_tensor_v3`
  bad_offset.pth, bad_dtype.pth  zip archives with a view past its storage's end and with a
                 complex storage: both must fail naming the tensor
  expected.safetensors  the logical value of every tensor, float32, keys without `module.`

Run from the repository root: python3 scripts/make_pth_test_data.py
"""
import collections
import itertools
import json
import pickle
import struct
import sys
import types
import zipfile

OUT = "tests/data/pth"


def fake_module(name):
    m = types.ModuleType(name)
    sys.modules[name] = m
    return m


torch = fake_module("torch")
torch_utils = fake_module("torch._utils")
torch_tensor = fake_module("torch._tensor")


def export(module, fn):
    fn.__module__ = module.__name__
    setattr(module, fn.__name__, fn)
    return fn


@lambda f: export(torch_utils, f)
def _rebuild_tensor_v2(*args):
    raise NotImplementedError


@lambda f: export(torch_utils, f)
def _rebuild_tensor_v3(*args):
    raise NotImplementedError


@lambda f: export(torch_utils, f)
def _rebuild_parameter(*args):
    raise NotImplementedError


@lambda f: export(torch_tensor, f)
def _rebuild_from_type_v2(*args):
    raise NotImplementedError


class Tensor:  # the `torch.Tensor` global of _rebuild_from_type_v2
    pass


Tensor.__module__ = "torch"
torch.Tensor = Tensor

# name: (struct format, element size)
STORAGES = {
    "FloatStorage": ("f", 4),
    "DoubleStorage": ("d", 8),
    "HalfStorage": ("e", 2),
    "BFloat16Storage": (None, 2),
    "LongStorage": ("q", 8),
    "IntStorage": ("i", 4),
    "ByteStorage": ("B", 1),
    "BoolStorage": ("?", 1),
    "UntypedStorage": ("B", 1),
    "ComplexFloatStorage": ("f", 4),  # unsupported by the loader
}
for name in STORAGES:
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)


class DType:
    __module__ = "torch"

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return self.name


torch.float16 = DType("float16")


class Storage:
    def __init__(self, key, cls, values):
        self.key, self.cls, self.values = key, cls, values

    @property
    def numel(self):
        return len(self.values)

    def raw(self, order):
        fmt, _ = STORAGES[self.cls]
        if self.cls == "BFloat16Storage":  # values are exact in bfloat16
            return b"".join(struct.pack(order + "f", v)[2:] if order == "<" else
                            struct.pack(order + "f", v)[:2] for v in self.values)
        return b"".join(struct.pack(order + fmt, v) for v in self.values)


class FakeTensor:
    def __init__(self, storage, offset, size, stride, parameter=False, subclass=False, v3=None):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.parameter, self.subclass, self.v3 = parameter, subclass, v3

    def __reduce_ex__(self, protocol):
        hooks = collections.OrderedDict()
        args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, hooks)
        if self.v3 is not None:
            return (_rebuild_tensor_v3, args + (self.v3,))
        if self.parameter:
            return (_rebuild_parameter, (FakeTensor(self.storage, self.offset, self.size,
                                                    self.stride), True, hooks))
        if self.subclass:
            return (_rebuild_from_type_v2, (_rebuild_tensor_v2, Tensor, args, {}))
        return (_rebuild_tensor_v2, args)

    def logical(self):
        """Row-major values of the view, as floats."""
        out = []
        for idx in itertools.product(*[range(n) for n in self.size]):
            pos = self.offset + sum(i * s for i, s in zip(idx, self.stride))
            out.append(float(self.storage.values[pos]))
        return out


def ramp(n, scale=0.125, shift=5):
    return [((i * 7) % 11 - shift) * scale for i in range(n)]


def state_dict():
    s_conv = Storage("140001", "FloatStorage", ramp(24))
    s_proj = Storage("140002", "FloatStorage", ramp(20, 0.5, 3))
    s_var = Storage("140003", "HalfStorage", [0.5, 1.25, 2.0, 0.75, 3.5])
    s_steps = Storage("140004", "LongStorage", [1234])
    s_emb = Storage("140005", "BFloat16Storage", [1.5, -2.25, 0.0078125, 96.0])
    s_ln = Storage("140006", "DoubleStorage", [0.1, -0.2, 0.3])
    s_u8 = Storage("140007", "ByteStorage", [0, 7, 255])
    s_i32 = Storage("140008", "IntStorage", [-3, 40000])
    s_bool = Storage("140009", "BoolStorage", [True, False, True, True])
    sd = collections.OrderedDict()
    sd["conv.weight"] = FakeTensor(s_conv, 0, [2, 3, 2, 2], [12, 4, 2, 1])
    sd["proj.weight"] = FakeTensor(s_proj, 4, [3, 4], [4, 1])
    sd["proj.weight_t"] = FakeTensor(s_proj, 4, [4, 3], [1, 4])  # transposed, shared storage
    sd["proj.row"] = FakeTensor(s_proj, 2, [2, 3], [0, 1])  # expanded (stride 0)
    sd["bn.running_var"] = FakeTensor(s_var, 0, [5], [1])
    sd["bn.num_batches_tracked"] = FakeTensor(s_steps, 0, [], [])
    sd["emb.weight"] = FakeTensor(s_emb, 0, [2, 2], [2, 1])
    sd["ln.weight"] = FakeTensor(s_ln, 0, [3], [1], parameter=True)
    sd["flags"] = FakeTensor(s_u8, 0, [3], [1])
    sd["counts"] = FakeTensor(s_i32, 0, [2], [1])
    sd["mask"] = FakeTensor(s_bool, 0, [4], [1])
    sd["empty"] = FakeTensor(s_conv, 0, [0, 3], [3, 1])
    sd["temp"] = FakeTensor(s_conv, 5, [], [])
    # _metadata is an OrderedDict attribute, pickled by BUILD: the loader must not see a key.
    return sd


class TorchPickler(pickle.Pickler):
    def __init__(self, f, protocol, legacy):
        super().__init__(f, protocol)
        self.legacy, self.storages = legacy, {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages[obj.key] = obj
        numel = obj.numel
        pid = ("storage", getattr(torch, obj.cls), obj.key, "cpu", numel)
        return pid + (None,) if self.legacy else pid


class StateDict(collections.OrderedDict):
    """Pickles as an OrderedDict with a `_metadata` attribute, like Module.state_dict()."""

    def __reduce__(self):
        return (collections.OrderedDict, (), {"_metadata": {"": {"version": 1}}}, None,
                iter(self.items()))


def prefixed(sd, prefix):
    return StateDict((prefix + k, v) for k, v in sd.items())


def extra_tensor():
    return FakeTensor(Storage("150000", "FloatStorage", ramp(6)), 0, [6], [1])


def write_legacy(path, sd, order):
    obj = {"epoch": 3, "Blip2LightCir": prefixed(sd, "module."),
           "optimizer": {"state": {0: {"exp_avg": extra_tensor()}}}}
    with open(path, "wb") as f:
        pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        sys_info = {"protocol_version": 1001, "little_endian": order == "<",
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}
        pickle.dump(sys_info, f, protocol=2)
        p = TorchPickler(f, 2, legacy=True)
        p.dump(obj)
        keys = sorted(p.storages)
        pickle.dump(keys, f, protocol=2)
        for k in keys:
            s = p.storages[k]
            f.write(struct.pack(order + "q", s.numel))
            f.write(s.raw(order))


def write_zip(path, obj, protocol):
    import io
    buf = io.BytesIO()
    p = TorchPickler(buf, protocol, legacy=False)
    p.dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for k, s in sorted(p.storages.items()):
            z.writestr(f"archive/data/{k}", s.raw("<"))
        z.writestr("archive/version", "3\n")


def write_safetensors(path, tensors):
    header, data = {}, b""
    for name, values, shape in tensors:
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def main():
    sd = state_dict()
    write_legacy(f"{OUT}/legacy.pth", sd, "<")
    write_legacy(f"{OUT}/legacy_be.pth", sd, ">")
    lavis = {"model": StateDict(sd), "optimizer": {"state": {0: {"exp_avg": extra_tensor()}}},
             "config": {"run": {"lr": 1e-5}}, "scaler": None, "epoch": 2}
    write_zip(f"{OUT}/zip.pth", lavis, 2)
    sd4 = StateDict(sd)
    s = sd4["conv.weight"]
    sd4["conv.weight"] = FakeTensor(s.storage, s.offset, s.size, s.stride, subclass=True)
    half = Storage("160000", "UntypedStorage", list(struct.pack("<3e", 0.5, -1.0, 4.0)))
    sd4["v3_half"] = FakeTensor(half, 0, [3], [1], v3=torch.float16)
    write_zip(f"{OUT}/zip_p4.pth", {"state_dict": sd4}, 4)
    short = Storage("170000", "FloatStorage", [1.0, 2.0, 3.0, 4.0])
    write_zip(f"{OUT}/bad_offset.pth", {"w": FakeTensor(short, 2, [3], [1])}, 2)
    cplx = Storage("180000", "ComplexFloatStorage", [1.0, 0.0])
    write_zip(f"{OUT}/bad_dtype.pth", {"ok": FakeTensor(short, 0, [4], [1]),
                                       "z": FakeTensor(cplx, 0, [1], [1])}, 2)
    expected = [(k, t.logical(), t.size) for k, t in sd.items()]
    expected.append(("v3_half", [0.5, -1.0, 4.0], [3]))
    write_safetensors(f"{OUT}/expected.safetensors", expected)


if __name__ == "__main__":
    main()
