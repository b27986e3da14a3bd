"""Opening a source from its description: the CLI's ``--data`` (with ``--subdir``, ``--tfds-data-dir``,
``--class-names``) or the ``data_spec`` a run records in meta.json (``sources.source_spec``), so that later commands
(report, export) and ``subset.load_kept(...).open_source()`` open the same source again."""

from __future__ import annotations

from clipsel_jax import storage
from clipsel_jax.data.demo import demo
from clipsel_jax.data.sources import DEMO, Source, image_folder, tfds_source


def open_source(path: str, subdir: str | None = None, tfds_data_dir: str | None = None,
                class_names: str | None = None, max_image_pixels: int | None = None) -> Source:
    """The source a ``--data`` value names: a folder or .zip of ``<class>/<file>`` images (``archive.zip:inner``),
    ``tfds:NAME`` (subdir: the split, default train), or ``demo``. A zip may be a URL (``gs://bucket/set.zip``,
    any fsspec scheme): it is copied to a local cache once (again when the object changes) and read from there.
    class_names: a file of readable names (see clipsel_jax.text.readable_class_names); max_image_pixels: None keeps
    the source's default."""
    if path == DEMO:
        source = demo()
    elif path.startswith("tfds:"):
        source = tfds_source(path[len("tfds:"):], subdir or "train", data_dir=tfds_data_dir)
    elif storage.is_remote(path):
        if ".zip:" in path:
            url, inner = path.split(".zip:", 1)
            url += ".zip"
        elif path.endswith(".zip"):
            url, inner = path, subdir
        else:
            raise ValueError(f"--data {path}: images in a bucket are read from a zip (gs://bucket/set.zip, or "
                             "set.zip:inner/folder); zip the folder, or mount the bucket (gcsfuse) and give the path")
        source = image_folder(str(storage.local_copy(url)), inner)
        source.origin = url
    else:
        source = image_folder(path, subdir)
    if max_image_pixels is not None:
        source.max_image_pixels = max_image_pixels
    if class_names:
        from clipsel_jax.text import readable_class_names

        source.class_names = readable_class_names(source.class_names, class_names)
    return source
