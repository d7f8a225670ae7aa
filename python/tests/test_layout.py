"""The package layout: `lorafuse` is a Python package over the `lorafuse._lorafuse` extension,
re-exporting all of it, with the torch drop-in kept out of `import lorafuse`."""

import pathlib
import subprocess
import sys

import lorafuse


def test_import_lorafuse_does_not_import_torch():
    code = "import sys, lorafuse, lorafuse.nf4; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_extension_name_is_reexported():
    ext = lorafuse._lorafuse
    public = [n for n in dir(ext) if not n.startswith("_")]
    assert "lora_forward" in public and "nf4" in public
    for name in public + ["__version__"]:
        assert getattr(lorafuse, name) is getattr(ext, name), name
    assert lorafuse.nf4 is sys.modules["lorafuse.nf4"]


def test_stubs_and_marker_are_installed():
    pkg = pathlib.Path(lorafuse.__file__).parent
    assert (pkg / "py.typed").is_file()
    assert (pkg / "_lorafuse.pyi").is_file()
    assert "numpy" in (lorafuse.__doc__ or "")
