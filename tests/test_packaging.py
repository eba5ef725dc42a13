"""Packages: ours as pip installs it from a wheel, apart from the repository, and the pinned files we take
out of others (`wheels`)."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_wheel_installed_apart_from_the_repository_has_the_default_drafter_and_the_kernels(tmp_path):
    """`pip install git+...` (no -e) builds a wheel: the default drafter (`--drafter` alone), the CPU kernels'
    sources and the console script must be in it, and the drafter must load from where the CLI looks."""
    source = tmp_path / "source"  # a copy, so that the build writes nothing into the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "redrafter_jax", "infer", "train", "drafters"):
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        scripts = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        z.extractall(tmp_path / "site")
    for folder in ("drafters/smollm2-135m", "redrafter_jax/csrc"):
        shipped = {os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(os.path.join(REPO, folder))
                   for f in fs}
        assert shipped and shipped <= names, sorted(shipped - names)
    assert "redrafter-generate = infer.generate:cli" in scripts
    probe = ("from redrafter_jax import cli; from redrafter_jax.checkpoint import load_drafter; "
             "print(cli.DEFAULT_DRAFTER, load_drafter(cli.DEFAULT_DRAFTER).config.draft_vocab_size)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}).stdout
    assert out.split() == [str(tmp_path / "site" / "drafters" / "smollm2-135m"), "4096"]


def test_a_file_or_a_folders_files_unpack_alike_from_a_wheel_and_a_source_archive(tmp_path):
    from redrafter_jax.wheels import _unpack, tree_sha256

    files = {"pkg-1.0/data/a.txt": b"a", "pkg-1.0/data/sub/b.bin": b"\0b", "pkg-1.0/other.txt": b"c"}
    with zipfile.ZipFile(tmp_path / "pkg.whl", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    with tarfile.open(tmp_path / "pkg.tar.gz", "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    folders = []
    for archive in ("pkg.whl", "pkg.tar.gz"):
        folders.append(tmp_path / f"{archive}-data")
        _unpack(str(tmp_path / archive), "pkg-1.0/data/", str(folders[-1]))
        got = {os.path.relpath(os.path.join(d, f), folders[-1]): open(os.path.join(d, f), "rb").read()
               for d, _, fs in os.walk(folders[-1]) for f in fs}
        assert got == {"a.txt": b"a", os.path.join("sub", "b.bin"): b"\0b"}
        _unpack(str(tmp_path / archive), "pkg-1.0/other.txt", str(tmp_path / f"{archive}-other"))
        assert (tmp_path / f"{archive}-other").read_bytes() == b"c"
        with pytest.raises(RuntimeError, match=f"{archive} has no pkg-1.0/missing/"):
            _unpack(str(tmp_path / archive), "pkg-1.0/missing/", str(tmp_path / "missing"))
    assert tree_sha256(str(folders[0])) == tree_sha256(str(folders[1]))
    (folders[1] / "sub" / "b.bin").write_bytes(b"changed")
    assert tree_sha256(str(folders[0])) != tree_sha256(str(folders[1]))
