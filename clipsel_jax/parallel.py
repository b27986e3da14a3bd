"""Device mesh and sharding helpers: data parallelism over a 1-D ('data',) mesh, declared once."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of every process) with the single axis 'data'."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA,))


def training_mesh(mesh: Mesh | None = None) -> Mesh:
    """The mesh a small model (the adapters) trains on when the caller names none: all devices, except on a
    single-process CPU host split into several JAX devices (--cpu-devices), where it is one device. There XLA
    already spreads each step's matmuls over the cores, and a split only adds a gradient reduction between the fake
    devices to every step: CIFAR-10's adapters (50,000 samples, 30 epochs) took 44 s on one device against 67 s on
    two on a 2-core host (README, "One whole selection on real embeddings"). An explicit mesh is used as given."""
    if mesh is not None:
        return mesh
    devices = jax.devices()
    if jax.process_count() == 1 and all(d.platform == "cpu" for d in devices):
        return data_mesh(devices[:1])
    return data_mesh(devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the mesh."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_batch_size(n: int, batch_size: int, n_devices: int) -> int:
    """The batch shape used for n items: the full batch, or for small inputs the next power of two.

    Either way a multiple of the device count, and only log2(batch_size) distinct shapes ever compile.
    """
    full = round_up(batch_size, n_devices)
    if n >= full:
        return full
    return min(full, round_up(1 << max(0, (n - 1).bit_length()), n_devices))


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x padded with zeros (or copies of nothing) to `rows` leading entries."""
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])


def global_batch(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A batch that every process holds whole -> a global array with the given sharding (each process places only
    its own devices' rows; on one process this is a device_put)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(y) -> np.ndarray:
    """A (possibly multi-process) device array -> the whole numpy array, on every process."""
    if jax.process_count() == 1:
        return np.asarray(y)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(y, tiled=True))


def default_cpu_devices() -> str | None:
    """The CLI's --cpu-devices when none is given: "auto" (one JAX CPU device per core), unless the CPU device
    count is already chosen elsewhere (JAX_NUM_CPU_DEVICES, --xla_force_host_platform_device_count in XLA_FLAGS,
    JAX already started in this process), the run is multi-process (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES
    set) or the host has an accelerator (its CPU devices do no work there, and a TPU VM may join a multi-host run
    without those variables), where it is left to JAX. One device per core measured faster on a 2-core CPU for embedding (1.23x
    PyTorch's throughput instead of 1.16x) and for SDS (1.28M samples, C = 10, scored and selected: 48.9 s instead of 55.5 s and 47.7 s instead of
    59.4 s in two runs; README, Benchmarks); it changes no result (the same mask on any device count is tested)."""
    import os

    if (os.environ.get("JAX_NUM_CPU_DEVICES") or "xla_force_host_platform_device_count" in os.environ.get(
            "XLA_FLAGS", "") or os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAX_NUM_PROCESSES")
            or _backends_started() or _accelerator_present()):
        return None
    return "auto"


def _backends_started() -> bool:
    """Whether JAX has created its backends (devices) in this process, found without creating them.

    JAX has no public query for this (jax._src.xla_bridge.backends_are_initialized is private). Its public config
    refuses any change of jax_num_cpu_devices once the backends exist (RuntimeError, JAX 0.6 to 0.12), so a change
    is tried and at once undone; before the backends exist that changes nothing."""
    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", max(current, 0) + 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def _accelerator_present() -> bool:
    """A TPU (/dev/accel*, /dev/vfio/* on newer TPU VMs) or NVIDIA GPU device file, checked without starting JAX."""
    import glob

    return any(glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"))


def use_cpu_devices(n: int | str = "auto") -> int:
    """Split this host's CPU into `n` JAX devices ("auto": one per core this process may run on); the data-parallel
    stages then run one shard per core. Returns the count. No effect on GPU/TPU devices, which stay the default
    when present. XLA already spreads matmuls and large elementwise loops over the cores of one device; what it
    runs on one thread (the encoder's normalisations, softmax, GELU; SDS's K-th search, on blocks of 8 rows) gains
    (see default_cpu_devices, which the CLI uses when --cpu-devices is not given).

    Must run before JAX initialises its backends (before the first array or device query); afterwards it only
    checks. The same as setting JAX_NUM_CPU_DEVICES=n in the environment.
    """
    import os

    if n == "auto":
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"--cpu-devices must be a positive integer or 'auto', got {n!r}") from None
    if n < 1:
        raise ValueError(f"--cpu-devices must be a positive integer or 'auto', got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)  # refused (RuntimeError) once JAX has created its backends
    except RuntimeError:
        try:
            have = len(jax.local_devices(backend="cpu"))
        except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS without cpu): nothing to split
            return n
        if have != n:
            raise ValueError(f"JAX already runs with {have} CPU device(s); asking for {n} must happen before the "
                             "first JAX computation (call use_cpu_devices first, or set JAX_NUM_CPU_DEVICES before "
                             "starting Python)") from None
    return n


def initialize_distributed(mode: str = "auto") -> bool:
    """Join a multi-process run (a TPU pod slice, or several hosts/processes with a coordinator); True if joined.

    mode "auto": initialise when the environment says this is one process of many: JAX_COORDINATOR_ADDRESS with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (any platform; on CPU the collectives go over gloo), or a Cloud TPU VM
    whose TPU_WORKER_HOSTNAMES lists several hosts (JAX finds the rest itself). "on": always (JAX's own
    auto-detection, e.g. Slurm or TPU); "off": never. Must run before anything touches the devices.
    """
    import os

    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if coordinator:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three "
                             "(coordinator host:port, number of processes, this process's index from 0)")
        # CPU devices need a collectives backend across processes; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    if mode == "on" or len(tpu_hosts) > 1:
        jax.distributed.initialize()
        return True
    return False
