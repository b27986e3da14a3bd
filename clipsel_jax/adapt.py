"""Dataset adaptation (docs/method.md, "Dataset adaptation"): train the image and text adapters on
(image, class prompt) pairs.

Losses: "infonce" (default): symmetric InfoNCE between L2-normalised adapted image features and the adapted prompts
of their labels, learnable temperature; samples of the same class in a batch share one prompt, so every same-class
pair counts as a positive (a multi-positive target) instead of a false negative. "class": cross-entropy of each
image against all C prompts (CLIP zero-shot logits).
Refinement (an option, `refine=1`): the adapters learn from labels that may be wrong, so after a first fit the
samples it trusts (their closest prompt is their label's, and they are in the better-aligned half of their class)
train it on for a few more epochs (`refit_epochs`, from its weights, fresh optimiser state), and the refitted
adapters score every sample; `refine=0` is the paper's single fit.
Data-parallel over the mesh (batch split, weights replicated; by default all devices, but one on a single-process
CPU host: parallel.training_mesh); an orbax checkpoint at most every 30 s (and at the
end); a rerun with the same workdir resumes after the last saved epoch, and reuses a finished training as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clipsel_jax import checks, parallel
from clipsel_jax.ckpt import Checkpointer
from clipsel_jax.models.adapters import Adapters
from clipsel_jax.scores import alignment_and_preferred_class, l2_normalize
from clipsel_jax.workdir import RunDir, resume_state
from clipsel_jax.workdir_lock import with_workdir_lock


DEFAULT_REFINE = 0  # refits of method "clipsel": an option (docs/method.md, "Refinement": fewer mislabeled samples
#                    kept under class-dependent noise, but subsets of clean data trained a weaker model)
MAX_REFINE = 10
TRUSTED_SHARE = 0.5  # a refit trains on at most this share of each class: its best-aligned agreeing samples


@dataclass(frozen=True)
class AdaptConfig:
    loss: str = "infonce"  # "infonce" | "class"
    kind: str = "linear"  # "linear" | "mlp"
    shared_dim: int | None = None  # default: min(image dim, text dim)
    epochs: int = 30
    lr: float = 1e-4
    batch_size: int = 256
    seed: int | None = None  # None: the run's seed (select_from_embeddings' seed; 0 for train_adapters alone)
    refine: int | None = None  # refits on the trusted samples (see trusted_samples); None: the method's (0, a
    #                            single fit, for both methods today)
    refit_epochs: int = 5  # epochs of each refit, continuing from the last fit's weights

    def __post_init__(self):
        if self.loss not in ("infonce", "class"):
            raise ValueError(f"adapter loss must be 'infonce' or 'class', got {self.loss!r}")
        try:  # frozen: checked values are written back with object.__setattr__ (numpy scalars become Python ones)
            for name, bounds in (("epochs", dict(lo=0, integer=True)), ("batch_size", dict(lo=1, integer=True)),
                                 ("refit_epochs", dict(lo=1, integer=True)),
                                 ("lr", dict(lo=0, lo_open=True))):
                object.__setattr__(self, name, checks.number(name, getattr(self, name), **bounds))
            object.__setattr__(self, "seed", checks.optional_number("seed", self.seed, lo=0, integer=True))
            object.__setattr__(self, "shared_dim",
                               checks.optional_number("shared_dim", self.shared_dim, lo=1, integer=True))
            object.__setattr__(self, "refine", checks.optional_number("refine", self.refine, lo=0, hi=MAX_REFINE,
                                                                      integer=True))
        except ValueError as e:
            raise ValueError(f"bad adapter training settings: {e}") from None


def contrastive_loss(adapters: Adapters, x, y, valid, text, loss: str):
    """Mean loss over the valid rows of a (padded) batch."""
    u = l2_normalize(adapters.image(x))
    v = l2_normalize(adapters.text(text))
    scale = jnp.minimum(jnp.exp(adapters.logit_scale[...]), 100.0)  # CLIP's clamp
    w = valid.astype(jnp.float32)
    if loss == "class":
        ce = optax.softmax_cross_entropy_with_integer_labels(u @ v.T * scale, y)
        return jnp.sum(ce * w) / jnp.sum(w)
    # image i against the prompt of sample j's label: the C prompt columns gathered, not a (B, B, D) product
    logits = jnp.take(u @ v.T, y, axis=1) * scale
    pair_ok = valid[:, None] & valid[None, :]
    positive = (y[:, None] == y[None, :]) & pair_ok
    target = positive / jnp.maximum(positive.sum(1, keepdims=True), 1)
    masked = jnp.where(pair_ok, logits, -1e9)
    rows = -jnp.sum(target * jax.nn.log_softmax(masked, axis=1), axis=1)
    cols = -jnp.sum(target * jax.nn.log_softmax(masked.T, axis=1), axis=1)
    return jnp.sum((rows + cols) / 2 * w) / jnp.sum(w)


def _weights_fingerprint(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(image_emb, labels, text_emb) -> str:
    """Identity of the training inputs for checkpoint reuse: shapes, all labels, a strided sample of the features."""
    h = hashlib.sha256()
    for a in (image_emb, labels, text_emb):
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a[:: max(1, len(a) // 4096)]).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


@with_workdir_lock
def train_adapters(image_emb: np.ndarray, labels: np.ndarray, text_emb: np.ndarray, cfg: AdaptConfig = AdaptConfig(),
                   workdir: str | Path | None = None, mesh=None, train_indices: np.ndarray | None = None,
                   progress: bool = False, stop_after_epochs: int | None = None,
                   checkpoint_every: float = 30.0, fit: int = 0,
                   init: Adapters | None = None) -> tuple[Adapters, dict]:
    """Train adapters; returns (adapters, history {"loss": per-epoch means, "resumed_from": epoch or None,
    "devices": how many devices trained them}).

    mesh: the devices to split each batch over; None: parallel.training_mesh() (all devices, or one on a
    single-process CPU host).

    train_indices: train on these samples only (e.g. a small trusted subset); scores still cover every sample.
    stop_after_epochs: return after this many epochs of this call (the checkpoint allows resuming later).
    fit: which fit of a refinement this is (0: the first), i.e. where it is checkpointed (RunDir.adapter_fit).
    init: start from these adapters' weights (a refit) instead of the identity-initialised ones; Adam starts afresh.
    workdir: checkpoints under workdir/adapters (a refit: adapters_refit<fit>), held for the call (see
    clipsel_jax.workdir_lock): after the last epoch, before returning early, and otherwise at the end of an epoch
    once `checkpoint_every` seconds have passed since the last one (a checkpoint per epoch cost about 40% of the
    training time at N = 20,000). A finished training is reused by a call with the same inputs, settings, training
    rows and starting weights (e.g. another keep ratio): no epoch runs.
    """
    checkpoint_every = checks.number("checkpoint_every", checkpoint_every, lo=0)
    mesh = parallel.training_mesh(mesh)
    if cfg.seed is None:  # the settings (and checkpoints) record the seed actually used
        cfg = dataclasses.replace(cfg, seed=0)
    seed = cfg.seed
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    checks.finite_input("image_emb", image_emb)
    checks.finite_input("text_emb", text_emb, "re-encode the class prompts")
    labels = np.asarray(labels, np.int32)
    idx_all = np.arange(len(labels)) if train_indices is None else np.asarray(train_indices)
    adapters = Adapters(image_emb.shape[1], text_emb.shape[1], cfg.shared_dim, cfg.kind,
                        rngs=nnx.Rngs(seed))
    if init is not None:
        nnx.update(adapters, nnx.state(init))
    graphdef, params = nnx.split(adapters)
    tx = optax.adam(cfg.lr)
    rep = parallel.replicated(mesh)
    params = jax.device_put(params, rep)
    opt_state = jax.device_put(tx.init(params), rep)
    text = jax.device_put(text_emb, rep)
    history = {"loss": [], "resumed_from": None, "devices": int(mesh.devices.size)}
    start_epoch = 0
    ckpt = None
    fingerprint = data_fingerprint(image_emb, labels, text_emb)
    # What this one training depends on: not the refinement's settings (the first fit of refine=0 and of refine=1
    # is one training); the rows it trains on (a refit's trusted samples) and the weights it starts from do.
    settings = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("refine", "refit_epochs")},
                "fingerprint": fingerprint, "train_count": int(len(idx_all)),
                "train_rows": hashlib.sha256(np.ascontiguousarray(idx_all, np.int64).tobytes()).hexdigest()[:16],
                "init": None if init is None else _weights_fingerprint(params)}
    if workdir is not None and cfg.epochs > 0:
        ckpt = Checkpointer(RunDir(workdir).adapter_fit(fit))
        if resume_state(ckpt, settings, "adapters") is not None:
            state, meta = ckpt.restore(like={"params": params, "opt_state": opt_state})
            params, opt_state = state["params"], state["opt_state"]
            start_epoch = meta["epoch"]
            history = {**history, "loss": list(meta["loss"]), "resumed_from": start_epoch}

    @jax.jit
    def train_step(params, opt_state, x, y, valid, text):
        def loss_fn(p):
            return contrastive_loss(nnx.merge(graphdef, p), x, y, valid, text, cfg.loss)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = parallel.round_up(min(cfg.batch_size, max(1, len(idx_all))), mesh.devices.size)
    sharding = parallel.batch_sharding(mesh)
    bar = None
    if progress and start_epoch < cfg.epochs:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="adapters" + (f" (refit {fit})" if fit else ""),
                   unit="epoch")
    done_here = 0
    last_save = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epochs is not None and done_here >= stop_after_epochs:
            break
        order = idx_all[np.random.default_rng([seed, epoch]).permutation(len(idx_all))]
        losses = []
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            valid = np.zeros(batch, bool)
            valid[: len(rows)] = True
            x = jax.device_put(parallel.pad_rows(image_emb[rows], batch), sharding)
            y = jax.device_put(parallel.pad_rows(labels[rows], batch), sharding)
            params, opt_state, loss = train_step(params, opt_state, x, y, jax.device_put(valid, sharding), text)
            losses.append((loss, len(rows)))  # read at the epoch's end: a read per step would stall the queue
        mean = sum(float(l) * n for l, n in losses) / max(1, sum(n for _, n in losses))
        if not np.isfinite(mean):  # stop before NaN weights are checkpointed or used to score anything
            raise checks.StageOutputError(
                f"dataset adaptation: the adapter loss is {mean} at epoch {epoch + 1}. Likely cause: the learning rate "
                f"(lr={cfg.lr}) is too high for these embeddings; lower it (AdaptConfig.lr, --adapter-lr)")
        history["loss"].append(mean)
        done_here += 1
        stopping = epoch + 1 == cfg.epochs or (stop_after_epochs is not None and done_here >= stop_after_epochs)
        if ckpt is not None and (stopping or time.monotonic() - last_save >= checkpoint_every):
            ckpt.save(epoch + 1, {"params": params, "opt_state": opt_state},
                      {"epoch": epoch + 1, "loss": history["loss"], "settings": settings})
            last_save = time.monotonic()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}")
    if bar is not None:
        bar.close()
    if ckpt is not None:
        ckpt.close()
    return nnx.merge(graphdef, params), history


def apply_adapters(adapters: Adapters, image_emb: np.ndarray, text_emb: np.ndarray,
                   batch: int = checks.ROW_CHUNK):
    """Adapted features (u, v) as float32 numpy, images in chunks to bound memory."""
    graphdef, params = nnx.split(adapters)
    f_img = jax.jit(lambda p, x: nnx.merge(graphdef, p).image(x))
    f_txt = jax.jit(lambda p, t: nnx.merge(graphdef, p).text(t))
    u = np.concatenate([np.asarray(f_img(params, jnp.asarray(image_emb[i:i + batch], jnp.float32)))
                        for i in range(0, len(image_emb), batch)]) if len(image_emb) else np.zeros((0, 0), np.float32)
    v = np.asarray(f_txt(params, jnp.asarray(text_emb, jnp.float32)))
    for name, x in (("adapted image features", u), ("adapted prompt features", v)):
        checks.finite_output("dataset adaptation", name, x, "the adapter weights hold NaN or inf (a diverged "
                             "training: lower the learning rate), or the embeddings hold extreme values")
    return u, v


@dataclass
class Adapted:
    """The adaptation stage's output: image and prompt features in one shared space."""

    image: np.ndarray  # float32 (N, D): u_i = A_I(f_I(x_i)), or the encoder's features when not adapted
    text: np.ndarray  # float32 (C, D): v_c = A_T(f_T(p_c))
    config: AdaptConfig | None  # the settings used (seed resolved); None: not adapted
    history: dict | None  # the last fit's history (per-epoch loss, resumed_from) and "fits": per fit, the samples
    #                       it trained on, its epochs, the epoch it resumed from and its seconds; None: not adapted
    logit_scale: float | None = None  # the adapters' learned temperature (CLIP's clamp at 100); None: not adapted


def adapt(image_emb, labels, text_emb, cfg: AdaptConfig | None = AdaptConfig(), *, seed: int = 0,
          workdir: str | Path | None = None, mesh=None, progress: bool = False) -> Adapted:
    """The dataset-adaptation stage: train the adapters (cfg; its seed, if None, is `seed`; its refine, if None,
    DEFAULT_REFINE), refit them `refine` times for `refit_epochs` on the samples the last fit trusts
    (trusted_samples), and map the features into the last fit's shared space. cfg None (or 0 epochs) keeps the
    encoder's features, which must then share a dim. Each fit is checkpointed in its own folder of the workdir and
    reused by a rerun."""
    if cfg is None or cfg.epochs == 0:
        if np.shape(image_emb)[1] != np.shape(text_emb)[1]:
            raise ValueError(f"image dim {np.shape(image_emb)[1]} != text dim {np.shape(text_emb)[1]}: unaligned "
                             "encoders need adapters (adapter=AdaptConfig(...) with epochs > 0)")
        return Adapted(image_emb, np.asarray(text_emb, np.float32), None, None)
    cfg = dataclasses.replace(cfg, seed=seed if cfg.seed is None else cfg.seed,
                              refine=DEFAULT_REFINE if cfg.refine is None else cfg.refine)
    labels = np.asarray(labels)
    fits, adapters, u, v, scale = [], None, None, None, None
    for fit in range(cfg.refine + 1):
        t0 = time.perf_counter()
        rows = None if fit == 0 else np.flatnonzero(trusted_samples(u, v, labels, scale, mesh=mesh))
        adapters, history = train_adapters(image_emb, labels, text_emb,
                                           cfg if fit == 0 else dataclasses.replace(cfg, epochs=cfg.refit_epochs),
                                           workdir=workdir, mesh=mesh, progress=progress, train_indices=rows, fit=fit,
                                           init=None if fit == 0 else adapters)
        u, v = apply_adapters(adapters, image_emb, text_emb)
        scale = learned_scale(adapters)
        fits.append({"trained_on": len(labels) if rows is None else int(len(rows)),
                     "epochs": cfg.epochs if fit == 0 else cfg.refit_epochs,
                     "resumed_from": history["resumed_from"], "seconds": time.perf_counter() - t0})
    return Adapted(u, v, cfg, {**history, "fits": fits}, scale)


def trusted_samples(u, v, labels, temperature: float, share: float = TRUSTED_SHARE, mesh=None) -> np.ndarray:
    """bool (N,): the samples a refit trains on. A sample is trusted when its closest prompt is its label's (most
    mislabeled images stay closer to their true class's prompt: under 40% pair noise on CIFAR-10, 7.6% of the
    agreeing samples are mislabeled against 20% of all) and it is among the `share` of its class with the highest
    probability of its label (corrupted images often keep their label's prompt closest, with little confidence). A
    class where no sample agrees keeps its single best-aligned one. Measured in docs/method.md, "Refinement"."""
    _, prob, preferred, _ = alignment_and_preferred_class(u, v, labels, temperature=temperature, mesh=mesh)
    labels = np.asarray(labels)
    trusted = np.zeros(len(labels), bool)
    order = np.argsort(labels, kind="stable")  # the classes' members in one sort, not one pass over N per class
    classes, starts = np.unique(labels[order], return_index=True)
    for c, members in zip(classes, np.split(order, starts[1:])):
        agreeing = members[preferred[members] == c]
        pool, quota = (agreeing, max(1, int(share * len(members)))) if len(agreeing) else (members, 1)
        trusted[pool[np.argsort(-prob[pool], kind="stable")[:quota]]] = True
    return trusted


def learned_scale(adapters: Adapters) -> float:
    """The temperature the adapters learned for their cosines, clamped at 100 as in training (and CLIP)."""
    return float(min(np.exp(float(adapters.logit_scale[...])), 100.0))
