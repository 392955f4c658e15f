"""A prelude for the scripts the distributed tests launch under torchrun: it records every file the process
opens for writing (an audit hook on Python's open, plus safetensors' save_file, which writes from Rust) in the
list `writes`, so a test can check that only rank 0 writes run files."""

WRITE_AUDIT = """
import json, os, sys
writes = []

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (any(c in mode for c in "wax+") if isinstance(mode, str)
                else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
            writes.append(os.path.realpath(os.fsdecode(args[0])))

sys.addaudithook(audit)
import safetensors.torch as st
_save_file = st.save_file

def save_file(tensors, filename, *a, **k):
    writes.append(os.path.realpath(os.fsdecode(filename)))
    return _save_file(tensors, filename, *a, **k)

st.save_file = save_file
"""
