"""One process of a two-process job (jax.distributed on this machine, 4 CPU devices each), run by
test_sharding.py: `python -m tests.two_processes PROCESS_ID PORT`. Decodes and takes a training step
over one 2x4 mesh spanning both processes, each loading only its own rows of the training batch, and
prints the results as JSON for the test to compare with one device."""

import json
import sys

from redrafter_jax import sharding

if __name__ == "__main__":
    sharding.start_processes(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from redrafter_jax.generate import generate  # noqa: E402
from tests.mesh_cases import CFG, PARAMS, PROMPTS, TRAIN, proposers, train_steps  # noqa: E402


def main() -> dict:
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = sharding.make_mesh(2, 4)
    found = {}
    for name, kw in (("autoregressive", {}), ("speculative", proposers())):
        out = generate(PARAMS, CFG, PROMPTS, max_new_tokens=16, mesh=mesh, **kw)
        found[name] = [np.asarray(out.tokens[b, :out.lengths[b]]).tolist() for b in range(len(PROMPTS))]
    params, loss = train_steps(mesh)
    found["train_rows"] = sharding.local_rows(mesh, TRAIN.batch_size).tolist()
    found["train_params"] = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(params)]
    found["train_loss"] = np.asarray(loss).tolist()
    return found


if __name__ == "__main__":
    print(json.dumps({"process": jax.process_index(), **main()}))
