"""Train a classifier on a subset (given by indices) and report its accuracy on a clean test split.

The standard CIFAR recipe: SGD with Nesterov momentum 0.9, weight decay, a cosine learning-rate schedule, random
crop (4-pixel zero padding) and horizontal flip. Data parallel: each global batch is split over the ('data',) mesh,
parameters are replicated, and batch-norm statistics are taken over the global batch (XLA inserts the
all-reduce). Everything is seeded: the same seed gives the same model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clipsel_jax import parallel
from clipsel_jax.data.preprocess import as_rgb_batch
from clipsel_jax.evaluate.models import make_model


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small_cnn"  # or "resnet18"
    width: int | None = None  # channels of the first stage (model default: 32 / 64)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # random crop (pad 4) + horizontal flip
    min_steps: int = 0  # train at least this many steps (tiny subsets: a fixed budget in steps, not epochs)
    # Train and test at this square size (the kept and test images resized once per run; area averaging when
    # shrinking). None: as given. Tiny-ImageNet's 64x64 at 32 makes a CPU step 6x cheaper (scripts/bench_train.py).
    image_size: int | None = None


@dataclass
class TrainResult:
    test_accuracy: float
    train_size: int
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: loss, lr
    config: dict = field(default_factory=dict)
    # With track_dynamics=True, per epoch (rows) and trained sample (columns, in `indices` order):
    # el2n ||softmax - onehot||, grand (last-layer gradient norm), correct (argmax == label).
    dynamics: dict | None = None


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3): PIL's box filter (the mean of the source pixels each target pixel
    covers) when shrinking, bicubic when enlarging; a non-square image is stretched to the square."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    resample = Image.BOX if size < max(images.shape[1:3]) else Image.BICUBIC
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), resample=resample))
    return out


def _augment(x, key):
    """Random crop with 4-pixel zero padding, and a horizontal flip with probability 1/2, per image."""
    b, h, w, _ = x.shape
    k1, k2, k3 = jax.random.split(key, 3)
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy = jax.random.randint(k1, (b,), 0, 9)
    dx = jax.random.randint(k2, (b,), 0, 9)
    crop = jax.vmap(lambda im, y, x_: jax.lax.dynamic_slice(im, (y, x_, 0), (h, w, im.shape[-1])))(padded, dy, dx)
    flip = jax.random.bernoulli(k3, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def cosine_lr(base: float, step: int, total: int) -> float:
    """optax.cosine_decay_schedule(base, total)(step): base * (1 + cos(pi * min(step, total) / total)) / 2."""
    return float(base * 0.5 * (1 + np.cos(np.pi * min(step, total) / total)))


def _scale_by_lr() -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by the `lr` passed to update() (optax.sgd(schedule)'s last step, lr from the caller)."""
    def update(updates, state, params=None, *, lr, **extra):
        return jax.tree.map(lambda u: lr * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, num_classes: int,
                     test_images: np.ndarray, test_labels: np.ndarray, indices: np.ndarray | None = None,
                     config: TrainConfig = TrainConfig(), seed: int = 0, mesh=None,
                     progress: bool = False, track_dynamics: bool = False) -> TrainResult:
    """Train `config.model` on train_images[indices] (all when None) with their (possibly noisy) labels;
    return the accuracy on the test split. Images are uint8 (N, H, W, 3) or grayscale (N, H, W[, 1]). track_dynamics: after every epoch,
    score every trained sample (EL2N, GraNd, correctness) for the training-dynamics baselines."""
    t0 = time.perf_counter()
    train_images = as_rgb_batch(train_images, "train_images")
    test_images = as_rgb_batch(test_images, "test_images")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"train and test images differ in size ({train_images.shape[1:3]} vs "
                         f"{test_images.shape[1:3]}); resize one split to the other's size")
    idx = np.arange(len(train_images)) if indices is None else np.asarray(indices, np.int64)
    if len(idx) == 0:
        raise ValueError("the subset to train on is empty")
    y_all = np.asarray(train_labels, np.int64)
    if config.image_size is not None:
        if not isinstance(config.image_size, (int, np.integer)) or config.image_size < 8:
            raise ValueError(f"image_size must be a whole number of pixels >= 8, got {config.image_size!r}")
        # Only the kept rows are resized; from here on the subset is rows 0..len(idx)-1 of the resized array.
        train_images, y_all = resize_images(train_images[idx], config.image_size), y_all[idx]
        test_images, idx = resize_images(test_images, config.image_size), np.arange(len(idx))
    mesh = mesh or parallel.data_mesh()
    n_dev = mesh.devices.size
    batch = parallel.round_up(min(config.batch_size, parallel.round_up(len(idx), n_dev)), n_dev)
    steps_per_epoch = max(1, len(idx) // batch)
    steps = max(config.epochs * steps_per_epoch, config.min_steps)
    epochs = -(-steps // steps_per_epoch)

    # Normalisation from the training subset's own statistics (what a user of the subset would do).
    sample = train_images[idx[:: max(1, len(idx) // 2000)]].astype(np.float32) / 255
    mean, std = sample.mean((0, 1, 2)), sample.std((0, 1, 2)) + 1e-3

    model = make_model(config.model, num_classes, config.width, seed)
    # SGD's last transform scales by the learning rate; here that factor is a step argument computed on the host
    # (the cosine schedule), not a constant of the compiled program: the program is then the same for every
    # number of steps (runs on subsets of other sizes hit the compilation cache instead of compiling again).
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(1.0, momentum=config.momentum, nesterov=True), _scale_by_lr())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    nnx.update(optimizer, jax.device_put(nnx.state(optimizer), rep))
    mean_d, std_d = jax.device_put(jnp.asarray(mean), rep), jax.device_put(jnp.asarray(std), rep)

    # mean/std are arguments, not closed-over constants, so that the compiled step is the same program for every
    # subset (a persistent compilation cache then serves repeated runs, e.g. scripts/bench_quality.py).
    @nnx.jit
    def train_step(model, optimizer, x, y, key, mean_d, std_d, lr):
        x = (x.astype(jnp.float32) / 255 - mean_d) / std_d
        if config.augment:
            x = _augment(x, key)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, lr=lr)
        return loss

    @nnx.jit
    def predict(model, x, mean_d, std_d):
        x = (x.astype(jnp.float32) / 255 - mean_d) / std_d
        return jnp.argmax(model(x), axis=-1)

    @nnx.jit
    def sample_scores(model, x, y, mean_d, std_d):
        """EL2N = ||p - onehot(y)||; GraNd here is the norm of the loss gradient w.r.t. the last layer,
        ||p - onehot|| * sqrt(||h||^2 + 1) (weights and bias), the usual cheap form of the per-sample gradient."""
        x = (x.astype(jnp.float32) / 255 - mean_d) / std_d
        h = model.features(x)
        p = jax.nn.softmax(model.head(h).astype(jnp.float32))
        err = jnp.linalg.norm(p - jax.nn.one_hot(y, num_classes), axis=-1)
        return err, err * jnp.sqrt(jnp.sum(h * h, axis=-1) + 1), jnp.argmax(p, -1) == y

    def score_all():
        model.eval()
        out = [], [], []
        for s in range(0, len(idx), eval_batch):
            rows = idx[s:s + eval_batch]
            xb = jax.device_put(parallel.pad_rows(train_images[rows], eval_batch), shard)
            yb = jax.device_put(parallel.pad_rows(y_all[rows], eval_batch), shard)
            for acc, v in zip(out, sample_scores(model, xb, yb, mean_d, std_d)):
                acc.append(np.asarray(v)[:len(rows)])
        model.train()
        return [np.concatenate(v) for v in out]

    eval_batch = parallel.round_up(256, n_dev)
    dynamics = {"el2n": [], "grand": [], "correct": []} if track_dynamics else None

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    history, step = [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"training {config.model}", unit="step")
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(idx)
        losses = []
        for b in range(steps_per_epoch):
            if step >= steps:
                break
            rows = order[b * batch:(b + 1) * batch]
            if len(rows) < batch:  # a subset smaller than one batch: sample it with replacement to fill the batch
                rows = rng.choice(idx, batch, replace=True)
            key, sub = jax.random.split(key)
            x = jax.device_put(train_images[rows], shard)
            y = jax.device_put(y_all[rows], shard)
            lr = np.float32(cosine_lr(config.lr, step, steps))
            losses.append(train_step(model, optimizer, x, y, sub, mean_d, std_d, lr))
            step += 1
            if bar is not None:
                bar.update(1)
        history.append({"epoch": epoch, "loss": float(np.mean([float(v) for v in losses])),
                        "lr": cosine_lr(config.lr, step, steps)})
        if dynamics is not None:
            for name, v in zip(("el2n", "grand", "correct"), score_all()):
                dynamics[name].append(v)
    if bar is not None:
        bar.close()

    model.eval()
    correct = 0
    for s in range(0, len(test_images), eval_batch):
        x = test_images[s:s + eval_batch]
        m = len(x)
        pred = predict(model, jax.device_put(parallel.pad_rows(x, eval_batch), shard), mean_d, std_d)
        correct += int((np.asarray(pred)[:m] == np.asarray(test_labels)[s:s + m]).sum())
    if dynamics is not None:
        dynamics = {k: np.stack(v) for k, v in dynamics.items()}
    return TrainResult(correct / max(1, len(test_images)), int(len(idx)), step,
                       round(time.perf_counter() - t0, 2), history, asdict(config), dynamics)
