"""One process of a 2-process run on this CPU (localhost coordinator, gloo collectives), for test_multihost.py.

    python multihost_worker.py PROCESS_ID PORT OUT_DIR MODEL_DIR
"""

import json
import os
import sys

pid, port, out, model = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

import clipsel_jax as cs  # noqa: E402

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (23, 20, 26, 3), dtype=np.uint8)
images[7] = 0
src = cs.data.from_arrays(list(images[:7]) + [np.zeros((0, 5, 3), np.uint8)] + list(images[8:]),
                          rng.integers(0, 3, 23), ["a", "b", "c"])  # sample 7 cannot be read
reads = []
read_example = src.read_example
src.read_example = lambda i: (reads.append(int(i)), read_example(i))[1]
enc = cs.load_encoder(model, batch_size=8)
e = cs.embed(src, enc, os.path.join(out, f"work{pid}"), chunk_size=10, progress=False)
np.savez(os.path.join(out, f"emb{pid}.npz"), image_emb=e.image_emb, ids=e.ids, labels=e.labels, text=e.text_emb)
with open(os.path.join(out, f"info{pid}.json"), "w") as f:
    json.dump({"reads": reads, "unreadable": e.unreadable, "processes": jax.process_count(),
               "devices": jax.device_count()}, f)
