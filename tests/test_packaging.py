"""The package as pip installs it from a wheel, apart from the repository."""

import os
import shutil
import subprocess
import sys
import zipfile

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
