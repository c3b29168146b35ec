#!/usr/bin/env python3
"""Helpers of build-linux-guest.sh (standard library only, plus the `zstd` command).

  guest-tools.py vmlinux BZIMAGE OUT
      Writes the uncompressed ELF kernel embedded in an x86 bzImage to OUT.
  guest-tools.py modules MODTREE OUTDIR NAME...
      Copies the modules NAME... (and the modules they depend on) from the
      kernel module tree MODTREE (the lib/modules/<version> directory) into
      OUTDIR as uncompressed .ko files and writes OUTDIR/load-order, one file
      name per line, dependencies first.
"""

import lzma
import gzip
import os
import struct
import subprocess
import sys

# x86 boot protocol (Documentation/arch/x86/boot.rst): offsets in the setup header.
SETUP_SECTS = 0x1F1
HEADER_MAGIC = 0x202
PROTOCOL_VERSION = 0x206
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C

ELF_MAGIC = b"\x7fELF"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


class GuestToolError(Exception):
    """A malformed input; the message says what was wrong."""


def payload_of(image):
    """Returns the compressed kernel embedded in a bzImage (without the size trailer)
    and the uncompressed size the build recorded in that trailer."""
    if len(image) < 0x250 or image[HEADER_MAGIC:HEADER_MAGIC + 4] != b"HdrS":
        raise GuestToolError("not a bzImage: boot header signature 'HdrS' missing")
    (version,) = struct.unpack_from("<H", image, PROTOCOL_VERSION)
    if version < 0x208:
        raise GuestToolError(f"boot protocol {version:#x} too old: payload fields need >= 2.08")
    setup_sects = image[SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    start = pm_start + offset
    if length < 8 or start + length > len(image):
        raise GuestToolError(
            f"payload [{start:#x}, +{length:#x}) lies outside the {len(image):#x}-byte image"
        )
    payload = image[start:start + length]
    # The kernel build appends the uncompressed size (le32) to the compressed data.
    (size,) = struct.unpack_from("<I", payload, length - 4)
    return payload[:-4], size


def decompress(payload):
    """Decompresses a kernel payload, choosing the codec by its magic number."""
    if payload.startswith(ZSTD_MAGIC):
        out = subprocess.run(
            ["zstd", "-d", "-q", "-c"], input=payload, stdout=subprocess.PIPE, check=True
        )
        return out.stdout
    if payload.startswith(XZ_MAGIC):
        return lzma.decompress(payload, format=lzma.FORMAT_XZ)
    if payload.startswith(GZIP_MAGIC):
        return gzip.decompress(payload)
    raise GuestToolError(f"unsupported kernel compression (magic {payload[:6].hex()})")


def cmd_vmlinux(bzimage, out):
    with open(bzimage, "rb") as f:
        image = f.read()
    payload, size = payload_of(image)
    kernel = decompress(payload)
    if len(kernel) != size:
        raise GuestToolError(f"decompressed {len(kernel)} bytes, the image says {size}")
    if not kernel.startswith(ELF_MAGIC):
        raise GuestToolError("decompressed payload is not an ELF file")
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(kernel)
    os.replace(tmp, out)


def canonical(name):
    """Module names treat '-' and '_' alike; strip the .ko[.xz|.zst|.gz] suffix."""
    base = os.path.basename(name).split(".ko")[0]
    return base.replace("-", "_")


def module_index(tree):
    index = {}
    for root, _dirs, files in os.walk(tree):
        for f in files:
            if ".ko" in f:
                index[canonical(f)] = os.path.join(root, f)
    return index


def read_module(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return decompress(data)
    return data


def depends_of(module):
    """Reads the `depends=` entry of the module's .modinfo strings."""
    key = b"\x00depends="
    at = module.find(key)
    if at < 0:
        return []
    end = module.index(b"\x00", at + len(key))
    field = module[at + len(key):end].decode()
    return [canonical(d) for d in field.split(",") if d]


def cmd_modules(tree, outdir, names):
    index = module_index(tree)
    order, done = [], set()

    def visit(name, chain):
        if name in done:
            return
        if name in chain:
            raise GuestToolError(f"module dependency cycle: {' -> '.join(chain + [name])}")
        if name not in index:
            raise GuestToolError(f"module {name} not found under {tree} (built in?)")
        module = read_module(index[name])
        for dep in depends_of(module):
            visit(dep, chain + [name])
        with open(os.path.join(outdir, name + ".ko"), "wb") as f:
            f.write(module)
        done.add(name)
        order.append(name + ".ko")

    os.makedirs(outdir, exist_ok=True)
    for name in names:
        visit(canonical(name), [])
    with open(os.path.join(outdir, "load-order"), "w") as f:
        f.write("".join(m + "\n" for m in order))


def main(argv):
    try:
        if len(argv) == 4 and argv[1] == "vmlinux":
            cmd_vmlinux(argv[2], argv[3])
        elif len(argv) >= 5 and argv[1] == "modules":
            cmd_modules(argv[2], argv[3], argv[4:])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (GuestToolError, OSError, lzma.LZMAError, subprocess.CalledProcessError) as e:
        print(f"guest-tools.py {argv[1]}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
