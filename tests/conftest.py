import atexit
import os
import shutil
import tempfile

# The suite runs in two worker processes (README): on a GPU, neither may take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# PyTorch (the transformers reference) in one thread: its OpenMP workers spin-wait after each operation and
# took the cores from JAX in the same process and from the other worker (the suite took minutes longer).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One persistent compilation cache for the whole run, made by the first process and inherited by the
# workers, the subprocesses and the notebook kernels: many of them compile the same programs of the real
# model (a tenth of the suite's time). It starts empty, so every run still compiles everything once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="redrafter-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# fixtures that download (once): the embedded model, llama.cpp's tokenizer test vocabularies
MODEL_FIXTURES = {"smollm_path", "smollm", "chat_prompts", "llama_cpp_vocabs"}
# The files that take over a minute of the suite, longest first (2-core CI machine, README command). The
# README's `--dist loadfile` hands whole files to the two workers as they free up: handed out by xdist's
# default order (most tests first), test_sharding.py (few tests, the longest fixture) started late and one
# worker idled for a minute or two at the end; longest first, the last files handed out are short ones.
LONGEST_FILES_FIRST = ("test_mtbench.py", "test_sharding.py", "test_sampling.py", "test_rows_matmul.py",
                       "test_train.py", "test_speculative.py", "test_model.py", "test_loaders.py", "test_generate.py",
                       "test_notebooks.py", "test_pipeline.py", "test_device_check.py", "test_prompt_cache.py",
                       "test_datastore.py", "test_continuous.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: hand out files in the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """Tests that use a download (`MODEL_FIXTURES`) are `slow`: `-m "not slow"` is the fast unit suite,
    which needs no download. The files run `LONGEST_FILES_FIRST`, then the others."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_within_the_map_limit():
    """Drops the compiled programs after a test file once they hold many memory maps: each XLA:CPU
    program holds hundreds to thousands, and a worker that ran many files reached the kernel's limit
    (vm.max_map_count, 65,530 by default) and crashed inside a compilation."""
    yield
    if os.path.exists("/proc/self/maps") and sum(1 for _ in open("/proc/self/maps")) > 30_000:
        jax.clear_caches()


@pytest.fixture(autouse=True)
def _compiled_loops_kept_within_a_test_file(monkeypatch):
    """generate keeps its compiled decode loops however many maps the worker holds
    (`generate._bound_compiled_loops`, tested on its own): the fixture above bounds them between test
    files instead, so that a test's compilations and its counts of compiled programs do not depend on
    what the tests before it compiled."""
    from redrafter_jax import generate as gen

    monkeypatch.setattr(gen, "_map_limit", lambda: None)


@pytest.fixture(scope="session")
def smollm_path():
    from redrafter_jax.loaders.embedded import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from redrafter_jax.loaders.gguf import load_gguf

    return load_gguf(smollm_path)


@pytest.fixture(scope="session")
def chat_prompts(smollm):
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Give me three tips for staying focused while studying.", "What is 12 times 7?"]
    return [smollm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
